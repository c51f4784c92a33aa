from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lqf_core.backbones import IMAGENET_MEAN, IMAGENET_STD
from lqf_core.data import Preprocess, open_image


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
