"""The trained-model record every method returns and every artifact holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lqf_core.config import Method, TrainConfig

LOO_OUTPUTS = "loo.outputs"


@dataclass
class TrainedModel:
    """What a training run learned, independent of how it is stored or served.

    tensors: the learned state (float32, CPU); its keys depend on the method:
      lqf          -- "head.weight", "head.bias" (ridge initialisation, part of w0) and
                      "delta.<param name>" for every linearized parameter (delta_w);
                      solver "exact" adds LOO_OUTPUTS, each training item's output
                      from the model trained without it (N, C), in training order
      linear_probe -- "head.weight", "head.bias"
      finetune     -- "net.<name>" for every parameter/buffer of backbone blocks + head
    temperature: softmax temperature fitted on the validation split (1.0 if none).
    info: free-form provenance (dataset id, parent model, forgotten item ids, ...).
    """

    method: Method
    config: TrainConfig
    class_names: list[str]
    tensors: dict[str, torch.Tensor]
    temperature: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # In the layout a saved artifact loads with: a transposed view (the ridge solve's
        # head) takes another matmul kernel and would answer differently in the last bit
        # from the model that is served.
        self.tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors.items()}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
