"""Seeded generators of small image datasets and hostile archives for the service tests."""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib

from PIL import Image, ImageDraw

# Three classes a tiny network tells apart at once: colour and shape both differ.
CLASSES = {"red_square": (220, 40, 40), "green_disc": (40, 200, 60), "blue_bar": (40, 70, 220)}


def make_image(label: str, rng: random.Random, size: int = 32) -> bytes:
    background = tuple(rng.randint(0, 60) for _ in range(3))
    img = Image.new("RGB", (size, size), background)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    colour = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in CLASSES[label])
    x, y = rng.randint(2, size // 3), rng.randint(2, size // 3)
    extent = rng.randint(size // 2, size - 4)
    box = (x, y, min(size - 1, x + extent), min(size - 1, y + extent))
    if label == "red_square":
        draw.rectangle(box, fill=colour)  # type: ignore[arg-type]
    elif label == "green_disc":
        draw.ellipse(box, fill=colour)  # type: ignore[arg-type]
    else:
        draw.rectangle((box[0], 0, box[0] + size // 4, size - 1), fill=colour)  # type: ignore[arg-type]
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def make_samples(per_class: int, seed: int, classes: list[str] | None = None
                 ) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    return [(label, make_image(label, rng))
            for label in (classes or list(CLASSES)) for _ in range(per_class)]


def folder_zip(samples: list[tuple[str, bytes]], prefix: str = "") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for i, (label, data) in enumerate(samples):
            zf.writestr(f"{prefix}{label}/img_{i:04d}.png", data)
    return out.getvalue()


def csv_zip(samples: list[tuple[str, bytes]], extra_rows: list[str] = ()) -> bytes:  # type: ignore[assignment]
    out = io.BytesIO()
    rows = ["filename,label"]
    with zipfile.ZipFile(out, "w") as zf:
        for i, (label, data) in enumerate(samples):
            zf.writestr(f"images/{i:04d}.png", data)
            rows.append(f"images/{i:04d}.png,{label}")
        zf.writestr("labels.csv", "\n".join([*rows, *extra_rows]) + "\n")
    return out.getvalue()


def zip_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out.getvalue()


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid small PNG whose header claims width x height pixels (a decompression bomb)."""
    raw = b"".join(b"\x00" + b"\x00" * 4 for _ in range(4))
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def digits_samples(per_class: int, size: int = 32) -> list[tuple[str, bytes]]:
    """scikit-learn's bundled 8x8 digits, the first `per_class` of each class, as
    `size`-px greyscale PNGs: a small real data set of 10 classes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out: list[tuple[str, bytes]] = []
    for label in range(10):
        rows = [i for i, t in enumerate(digits.target) if t == label][:per_class]
        for i in rows:
            pixels = (digits.images[i] * (255 / 16)).astype("uint8")
            img = Image.fromarray(pixels, mode="L").resize((size, size), Image.NEAREST)
            buffer = io.BytesIO()
            img.save(buffer, format="PNG")
            out.append((f"digit_{label}", buffer.getvalue()))
    return out


def many_class_samples(num_classes: int, per_class: int, seed: int = 0,
                       size: int = 32) -> list[tuple[str, bytes]]:
    """`num_classes` classes of coloured shapes (a hue per class, one of three shapes),
    for what grows with the number of classes."""
    import colorsys

    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    for c in range(num_classes):
        r, g, b = colorsys.hsv_to_rgb(c / num_classes, 0.9, 0.9)
        colour = (int(255 * r), int(255 * g), int(255 * b))
        for _ in range(per_class):
            img = Image.new("RGB", (size, size), tuple(rng.randint(0, 40) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            x, y = rng.randint(1, size // 4), rng.randint(1, size // 4)
            box = (x, y, x + size // 2, y + size // 2)
            if c % 3 == 0:
                draw.rectangle(box, fill=colour)
            elif c % 3 == 1:
                draw.ellipse(box, fill=colour)
            else:
                draw.chord(box, 0, 180, fill=colour)
            buffer = io.BytesIO()
            img.save(buffer, format="PNG")
            out.append((f"class_{c:03d}", buffer.getvalue()))
    return out
