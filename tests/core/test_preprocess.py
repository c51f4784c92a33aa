from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lqf_core.backbones import IMAGENET_MEAN, IMAGENET_STD
from lqf_core.data import Preprocess, check_image, open_image, short_sides
from lqf_core.errors import InvalidDataError


def reference(image: Image.Image, size: int) -> torch.Tensor:
    """The textbook pipeline: RGB, bilinear resize, /255, (x - mean) / std in float32."""
    rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    return torch.from_numpy(np.ascontiguousarray((x - mean) / std))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "I;16"])
def test_preprocess_equals_the_textbook_pipeline_bit_for_bit(mode):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    encoded = io.BytesIO()
    image.save(encoded, format="TIFF" if mode == "I;16" else "PNG")
    decoded = open_image(encoded.getvalue())
    assert decoded.mode in ("RGB", "L")
    preprocess = Preprocess(29, IMAGENET_MEAN, IMAGENET_STD)
    out = preprocess(decoded)
    assert out.dtype == torch.float32 and out.shape == (3, 29, 29) and out.is_contiguous()
    assert torch.equal(out, reference(decoded, 29))


def _encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: which way up it is shows in every pixel."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2, 0] = 255
    pixels[:, width // 2:, 2] = 255
    return Image.fromarray(pixels)


def test_exif_orientation_is_applied_as_a_viewer_shows_it():
    stored = _halves(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a phone held upright
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    decoded = open_image(_encoded(stored, exif=exif))
    assert decoded.size == (20, 40)
    assert np.array_equal(np.asarray(decoded), np.asarray(upright))
    as_jpeg = open_image(_encoded(stored, "JPEG", exif=exif, quality=95))
    assert as_jpeg.size == (20, 40)
    assert np.abs(np.asarray(as_jpeg, dtype=int) - np.asarray(upright, dtype=int)).mean() < 4
    assert open_image(_encoded(stored)).size == (40, 20)  # no tag: as stored


def test_sixteen_bit_levels_are_scaled_not_clipped():
    levels = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    decoded = open_image(_encoded(Image.fromarray(levels)))
    assert decoded.mode == "L"
    expected = np.round(levels / 257).astype(np.uint8)
    assert np.array_equal(np.asarray(decoded), expected)
    assert np.median(np.asarray(decoded)) == pytest.approx(127.5, abs=1)  # clipping: 255


def test_transparent_parts_are_white_whatever_colour_they_hide():
    def sticker(hidden: tuple[int, int, int]) -> Image.Image:
        image = Image.new("RGBA", (8, 8), (*hidden, 0))
        image.paste((200, 0, 0, 255), (2, 2, 6, 6))
        image.putpixel((0, 7), (255, 0, 0, 128))  # half-transparent red
        return image

    black, green = (open_image(_encoded(sticker(c))) for c in ((0, 0, 0), (0, 255, 0)))
    assert np.array_equal(np.asarray(black), np.asarray(green))
    pixels = np.asarray(black)
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[3, 3]) == (200, 0, 0)
    assert tuple(pixels[7, 0]) == pytest.approx((255, 127, 127), abs=1)
    palette = sticker((0, 0, 0)).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    transparent = palette.getpixel((0, 0))
    decoded = open_image(_encoded(palette, transparency=transparent))
    assert tuple(np.asarray(decoded)[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(decoded)[3, 3]) == (200, 0, 0)


def test_a_pil_image_given_directly_is_read_by_the_same_rules():
    sticker = Image.new("RGBA", (8, 8), (0, 255, 0, 0))
    sticker.paste((200, 0, 0, 255), (2, 2, 6, 6))
    preprocess = Preprocess(8, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(preprocess(sticker), preprocess(open_image(_encoded(sticker))))


def _photo(width: int, height: int) -> Image.Image:
    """Smooth gradients and a little noise: a photo's statistics, at any size."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.stack([127 + 100 * np.sin(xx / width * 6), 127 + 100 * np.cos(yy / height * 5),
                       127 + 60 * np.sin((xx + yy) / (width + height) * 9)], axis=-1)
    pixels += np.random.default_rng(0).normal(0, 4, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_a_large_jpeg_decodes_at_the_smallest_scale_that_covers_the_input_size():
    data = _encoded(_photo(1600, 1200), "JPEG", quality=90)
    assert open_image(data).size == (1600, 1200)
    assert open_image(data, jpeg_min_size=128).size == (200, 150)  # 1/8
    assert open_image(data, jpeg_min_size=200).size == (400, 300)  # 1/4: 1/8 is too small
    assert open_image(data, jpeg_min_size=1200).size == (1600, 1200)
    mpo = _encoded(_photo(1600, 1200), "MPO", save_all=True, append_images=[_photo(320, 240)])
    assert open_image(mpo, jpeg_min_size=128).size == (200, 150)  # a phone's multi-picture JPEG
    png = _encoded(_photo(400, 300))
    assert open_image(png, jpeg_min_size=64).size == (400, 300)  # only JPEGs have scales


def test_the_scaled_decode_gives_the_model_nearly_the_same_input():
    """What the network sees from a scaled decode differs from a full decode by a fraction
    of one 8-bit level on average (both are resized to the input size after)."""
    data = _encoded(_photo(1600, 1200), "JPEG", quality=90)
    scaled = Preprocess(128, IMAGENET_MEAN, IMAGENET_STD).load(data)
    full = Preprocess(128, IMAGENET_MEAN, IMAGENET_STD, jpeg_decode="full").load(data)
    level = 1 / 255 / min(IMAGENET_STD)  # one 8-bit level, normalised
    assert not torch.equal(scaled, full)
    assert float((scaled - full).abs().mean()) < 0.5 * level
    assert float((scaled - full).abs().max()) < 8 * level


def test_short_sides_come_from_the_headers():
    images = [_encoded(_photo(300, 200), "JPEG"), _encoded(_photo(50, 90)), b"not an image"]
    assert short_sides(images) == [200, 50]


def test_a_truncated_jpeg_is_refused_at_any_scale():
    data = _encoded(_photo(800, 600), "JPEG", quality=90)
    check_image(data)
    for check in (open_image, check_image):
        with pytest.raises(InvalidDataError, match="not a readable image"):
            check(data[: len(data) // 2], name="half.jpg")
