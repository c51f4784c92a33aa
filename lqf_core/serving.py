"""The narrow serving interface the app uses: load once, predict many.

`Predictor.preprocess` is cheap and thread-safe; `predict_batch` is the heavy part and
is serialised by a lock, so callers batch requests and run it in a worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lqf_core.artifacts import load_model, model_version, read_metadata
from lqf_core.backbones import Backbone, WeightsDirs, load_backbone
from lqf_core.classifier import build_classifier
from lqf_core.data import ImageSource
from lqf_core.device import resolve_device
from lqf_core.model import TrainedModel


class Predictor:
    """A trained model ready to predict. `model_version` is the artifact's content hash."""

    def __init__(self, model: TrainedModel, device: str = "auto",
                 weights_dir: WeightsDirs = None, model_version: str = "",
                 backbone: Backbone | None = None):
        self.model = model
        self.device = resolve_device(device)
        self.backbone = backbone or load_backbone(model.config.backbone, weights_dir)
        self.classifier = build_classifier(model, self.backbone, self.device)
        self._preprocess = self.backbone.preprocess(model.config.input_size,
                                                    model.config.jpeg_decode)
        self.model_version = model_version
        self._lock = threading.Lock()

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto",
             weights_dir: WeightsDirs = None) -> Predictor:
        version = model_version(read_metadata(directory))
        return cls(load_model(directory), device, weights_dir, model_version=version)

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, s, s) input tensor."""
        return self._preprocess(image)

    def load_image(self, source: ImageSource, name: str | None = None) -> torch.Tensor:
        """An image (path, bytes or PIL image) decoded as the model was trained -> (3, s, s);
        InvalidDataError if it cannot be."""
        return self._preprocess.load(source, name)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, s, s) -> temperature-scaled logits (n, C) on the CPU."""
        with self._lock, torch.no_grad():
            logits = self.classifier.logits(x.to(self.device))
        return logits.cpu() / self.model.temperature

    def predict_batch(self, x: torch.Tensor) -> np.ndarray:
        """(n, 3, s, s) -> class probabilities (n, C)."""
        return torch.softmax(self.predict_logits(x).double(), dim=1).numpy()

    def predict_proba(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Images (PIL / path / bytes) -> class probabilities (n, C)."""
        x = torch.stack([self.load_image(img) for img in images])
        return self.predict_batch(x)
