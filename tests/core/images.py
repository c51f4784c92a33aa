"""Generated image datasets: colour classes a tiny network separates easily."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}


def coloured_images(per_class: int = 12, size: int = 24, seed: int = 0,
                    classes: tuple[str, ...] = ("red", "green", "blue")
                    ) -> tuple[list[Image.Image], list[int], list[str]]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(classes):
        for _ in range(per_class):
            pixels = np.array(COLOURS[name]) + rng.normal(0, 35, (size, size, 3))
            images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
            labels.append(label)
    return images, labels, list(classes)


def write_image_folder(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    images, labels, names = coloured_images(per_class, seed=seed)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.png")
    return root
