"""Image loading and preprocessing shared by training, prediction and the CLI."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lqf_core.config import JpegDecode
from lqf_core.errors import InvalidDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Decompression-bomb guard: refuse images above this many pixels before decoding them.
MAX_IMAGE_PIXELS = 50_000_000

ImageSource = Image.Image | str | Path | bytes
# MPO: the JPEG of many phone cameras, with more pictures (depth, a preview) appended.
_JPEG_FORMATS = ("JPEG", "MPO")


def open_image(source: ImageSource, name: str | None = None,
               jpeg_min_size: int | None = None) -> Image.Image:
    """Decode an image (PIL image, path or raw bytes) to RGB or 8-bit grayscale ("L"), or
    raise InvalidDataError.

    jpeg_min_size: decode a JPEG at the smallest of 1/1, 1/2, 1/4 or 1/8 scale whose
    sides are both at least this (libjpeg's DCT scaling, Pillow's draft mode). A 12 MP
    photo that a model sees at 128 px then loads 4.5x faster (docs/method.md).

    Grayscale is not expanded here: Preprocess resizes its one channel and repeats it,
    the same numbers as resizing three equal channels (tests/core/test_preprocess.py).
    """
    if isinstance(source, Image.Image):
        return _rgb_or_gray(source)
    label = name or (str(source) if not isinstance(source, bytes) else "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
            with handle, Image.open(handle) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise InvalidDataError(
                        f"{label}: {img.width}x{img.height} pixels exceeds the limit of "
                        f"{MAX_IMAGE_PIXELS}"
                    )
                if jpeg_min_size is not None and img.format in _JPEG_FORMATS:
                    img.draft(None, (jpeg_min_size, jpeg_min_size))
                img.load()
                return _rgb_or_gray(img)
    except InvalidDataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidDataError(f"{label}: refused as a decompression bomb ({exc})") from None
    except FileNotFoundError:
        raise InvalidDataError(f"{label}: no such file") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidDataError(f"{label}: not a readable image ({exc})") from None


def check_image(source: ImageSource, name: str | None = None) -> None:
    """Raise InvalidDataError unless the image decodes (and is no decompression bomb). A
    JPEG is checked at its smallest DCT scale: all of its coded data is still read (a
    truncated file is refused), at a fraction of a full decode's time."""
    open_image(source, name=name, jpeg_min_size=1)


# The EXIF tag of the orientation; its values 2-8 ask for a transpose (1 is upright).
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _rgb_or_gray(image: Image.Image) -> Image.Image:
    """The image as a person looking at it sees it, in RGB or 8-bit grayscale.

    - upright: a phone's portrait JPEG carries its rotation in EXIF, and a viewer (and
      Label Studio, and the dashboard) applies it; unapplied, the model would learn and
      predict the picture on its side;
    - transparent parts over white: dropping alpha would show whatever colour the hidden
      pixels happen to hold (often black, sometimes not), so two files that look the same
      would give different inputs;
    - 16-bit levels scaled to 8 bits (v / 257): Pillow's own conversion clips them at 255,
      which turns all but the darkest 1/256 of a 16-bit image white.
    """
    if image.getexif().get(_EXIF_ORIENTATION, 1) in range(2, 9):
        image = ImageOps.exif_transpose(image)
    if image.mode in ("RGB", "L"):
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.round(np.clip(levels, 0, 65535) / 257).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def scan_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """List an ImageFolder tree (one sub-folder per class) -> (paths, labels, class_names).

    Raises InvalidDataError when the folder is missing, empty or has fewer than 2 classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidDataError(f"{root}: not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    class_names: list[str] = []
    for class_dir in class_dirs:
        files = sorted(
            p for p in class_dir.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            continue
        class_names.append(class_dir.name)
        paths.extend(files)
        labels.extend([len(class_names) - 1] * len(files))
    if not paths:
        raise InvalidDataError(f"{root}: no images found in class sub-folders")
    if len(class_names) < 2:
        raise InvalidDataError(
            f"{root}: need at least 2 classes (sub-folders with images), found {len(class_names)}"
        )
    return paths, labels, class_names


# Images whose sizes the input-size rule looks at: evenly spaced over the training set.
SIZE_SAMPLE = 256


def short_sides(images: Sequence[ImageSource]) -> list[int]:
    """The short side in px of up to SIZE_SAMPLE of the images, evenly spaced, from
    their headers (an unreadable image is reported when it is decoded for training)."""
    step = max(1, len(images) // SIZE_SAMPLE)
    return [side for image in list(images)[::step][:SIZE_SAMPLE]
            if (side := _short_side(image)) is not None]


def _short_side(source: ImageSource) -> int | None:
    if isinstance(source, Image.Image):
        return min(source.size)
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        with handle, Image.open(handle) as img:
            return min(img.size)  # the header's: the same whichever way EXIF turns it
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


class Preprocess:
    """PIL image -> normalised float tensor (3, size, size), as the backbone expects.

    jpeg_decode "scaled": `load` decodes a JPEG at the smallest DCT scale that still
    covers image_size (open_image's jpeg_min_size); "full": at its own size (models
    trained before the option existed, or who asks for it)."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 jpeg_decode: JpegDecode = JpegDecode.SCALED):
        self.image_size = image_size
        self.jpeg_min_size = image_size if jpeg_decode == JpegDecode.SCALED else None
        mean32 = np.asarray(mean, dtype=np.float32).reshape(3, 1)
        std32 = np.asarray(std, dtype=np.float32).reshape(3, 1)
        # (3, 256): the normalised value of every 8-bit level, per channel, computed as
        # ((v / 255) - mean) / std in float32. One table lookup per pixel then replaces
        # four passes over the image (the API does this on its event loop).
        levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
        self.table = (levels[None, :] - mean32) / std32

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # numpy, not torch: the API preprocesses in many request threads at once, and
        # small torch ops there start OpenMP thread teams that fight the model for cores.
        image = _rgb_or_gray(image)  # a PIL image given directly follows open_image's rules
        pixels = np.asarray(image.resize((self.image_size, self.image_size),
                                         Image.Resampling.BILINEAR))
        if pixels.ndim == 2:  # grayscale: the same level in all three channels
            return torch.from_numpy(np.stack([row[pixels] for row in self.table]))
        return torch.from_numpy(np.stack([row[pixels[..., c]]
                                          for c, row in enumerate(self.table)]))

    def load(self, source: ImageSource, name: str | None = None) -> torch.Tensor:
        """Decode one image (InvalidDataError if it cannot be) -> (3, size, size)."""
        return self(open_image(source, name=name, jpeg_min_size=self.jpeg_min_size))

    def batch(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Decode and stack images into (n, 3, size, size)."""
        if len(images) == 0:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack([self.load(img) for img in images])
