"""LQF: Linear Quadratic Fine-Tuning (Achille et al., CVPR 2021) as a plain torch library.

Public surface:
    TrainConfig, Method                 -- lqf_core.config
    train_model(images, labels, ...)    -- lqf_core.train
    save_model / load_model             -- lqf_core.artifacts
    Predictor                           -- lqf_core.serving (load once, predict many)
"""

from lqf_core.config import Method, TrainConfig

__all__ = ["Method", "TrainConfig"]
__version__ = "0.1.0"
