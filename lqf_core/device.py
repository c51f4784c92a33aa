"""Device names as configs and settings give them -> torch devices: one rule everywhere."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when present, else the CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def is_gpu(name: str) -> bool:
    return resolve_device(name).type == "cuda"
