"""Fashion-MNIST from Debian's `dataset-fashion-mnist` (idx files, read offline)."""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lqf_core.backbones import Backbone
from lqf_core.config import TrainConfig

DEFAULT_DIR = Path(os.environ.get("LQF_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str, directory: Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 28, 28), labels int64 (n,)) for split 'train' or 't10k'."""
    images = directory / f"{split}-images-idx3-ubyte.gz"
    labels = directory / f"{split}-labels-idx1-ubyte.gz"
    if not images.is_file():
        raise FileNotFoundError(
            f"{images} not found: install it with `apt-get install -y dataset-fashion-mnist` "
            "or set LQF_FASHION_MNIST_DIR"
        )
    return _read_idx(images), _read_idx(labels).astype(np.int64)


# Fashion-MNIST's images are 28 x 28.
IMAGE_SIDE = 28


def input_size(config: TrainConfig, backbone: Backbone) -> int:
    """The config's image_size, or what a job would choose for these 28 px images."""
    if config.image_size is not None:
        return config.image_size
    return backbone.auto_image_size([IMAGE_SIDE])


def to_tensor(images: np.ndarray, image_size: int,
              mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Grayscale uint8 (n, 28, 28) -> normalised RGB (n, 3, s, s), bilinear resize."""
    x = torch.from_numpy(images.copy()).float().div(255).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                        align_corners=False, antialias=True)
    x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """`shots` random training indices per class."""
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), shots, replace=False)
              for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def dev_indices(labels: np.ndarray, shots: int, seeds: Sequence[int], size: int) -> np.ndarray:
    """`size` training-pool indices outside every seed's few-shot draw: development images
    for choosing defaults, so that the t10k test set is never looked at."""
    used = np.unique(np.concatenate([few_shot_indices(labels, shots, s) for s in seeds]))
    rest = np.setdiff1d(np.arange(len(labels)), used)
    return np.random.default_rng(12345).choice(rest, size, replace=False)
