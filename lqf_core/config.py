"""Training configuration: one frozen dataclass for every method.

Defaults are the ones `bench/transfer.py` supports (see docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from lqf_core.errors import InvalidConfigError


class Method(StrEnum):
    LQF = "lqf"
    FINETUNE = "finetune"
    LINEAR_PROBE = "linear_probe"


class LQFLoss(StrEnum):
    MSE = "mse"
    CE = "ce"  # ablation only: cross-entropy on the linearized model


class Regularizer(StrEnum):
    """The penalty on dw = w - w0."""

    # lambda/2 ||dw||^2. PCG does not converge on it at real scale (it stalls near 1e-2),
    # so its default is an early stop of 10 iterations that regularises by stopping.
    ISOTROPIC = "isotropic"
    # mu/2 dw^T (K + lambda I) dw, K the K-FAC approximation of J^T J / N: the generalised
    # ridge that early-stopped K-FAC-preconditioned CG approximates (docs/method.md). The
    # preconditioned system is well conditioned, so the solve converges to `tol`. The
    # default wherever K-FAC preconditions the MSE fit.
    KFAC = "kfac"


# What each regularizer's solve runs to when max_iters / tol are unset: the kfac one to
# its optimum (500 is a cap, reached only if it fails to converge; 1,000 items take about
# 45 iterations), the isotropic one for its measured early stop.
DEFAULT_MAX_ITERS = {Regularizer.KFAC: 500, Regularizer.ISOTROPIC: 10}
DEFAULT_TOL = {Regularizer.KFAC: 1e-4, Regularizer.ISOTROPIC: 1e-3}


class Solver(StrEnum):
    """How the LQF quadratic is solved (docs/method.md)."""

    PCG = "pcg"  # K-FAC-preconditioned CG to tol (at most max_iters iterations)
    # The unique optimum by one Cholesky factor of the N*C x N*C Gram matrix (exact.py),
    # with exact leave-one-out outputs; every item is trained on (no held-out fifth).
    EXACT = "exact"


class Calibration(StrEnum):
    """Where a job's temperature and held-out metrics came from (info.calibration)."""

    HOLDOUT = "holdout"  # val_fraction of the items kept out of training
    # every item trained on; 5-fold out-of-fold outputs (crossfit.py)
    CROSSFIT = "crossfit"
    LOO = "loo"  # solver "exact": every item trained on; exact leave-one-out outputs


# When calibration and val_fraction are unset, an LQF job (solver pcg) on up to this many
# items trains on every item and calibrates by cross-fitting (5 more fits on 80 % of the
# items each), where a held-out fifth costs the most accuracy and extra fits cost the
# least. So does a job of up to CROSSFIT_FEW_PER_CLASS_MAX_ITEMS whose classes average
# fewer than FEW_PER_CLASS items: at 100 classes of 6 images (600 items) cross-fitting
# gained 3 dev points and calibrated as well, for 6x the job's time (docs/benchmarks.md,
# "Many classes"). Other jobs hold out DEFAULT_VAL_FRACTION; `calibration` overrides.
CROSSFIT_CALIBRATION_MAX_ITEMS = 500
CROSSFIT_FEW_PER_CLASS_MAX_ITEMS = 1000
FEW_PER_CLASS = 10
DEFAULT_VAL_FRACTION = 0.2


class JpegDecode(StrEnum):
    """How a JPEG is decoded before it is resized to the input size."""

    # At the smallest of 1/1, 1/2, 1/4, 1/8 scale whose sides both cover image_size
    # (libjpeg's DCT scaling): a 12 MP photo seen at 128 px loads 4.5x faster.
    SCALED = "scaled"
    FULL = "full"  # at its own size: models saved before the option read as this


class ProbeKind(StrEnum):
    RIDGE = "ridge"
    LOGISTIC = "logistic"


# The weight decay each solver is measured at (docs/benchmarks.md). The early stop needs
# little (it regularises by stopping); the exact optimum at 1e-3 interpolates the few
# training images, and 0.1 was best by leave-one-out and by dev accuracy at 100 shots.
DEFAULT_WEIGHT_DECAY = {Solver.PCG: 1e-3, Solver.EXACT: 0.1}


MAX_WORKERS = 64


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. `from_dict` validates user input."""

    method: Method = Method.LQF
    backbone: str = "mobilenet_v2"
    # Square input side in px. None: the backbone's rule on the training images (their
    # median short side, clamped: 96-128 px for the ImageNet backbones; backbones.py).
    # The trained model records the value used.
    image_size: int | None = None
    # "scaled": JPEGs decode at the smallest DCT scale that covers image_size (JpegDecode).
    jpeg_decode: JpegDecode = JpegDecode.SCALED
    seed: int = 0
    # Fraction of the training items held out to fit the softmax temperature and report
    # validation metrics; 0 trains on everything and skips calibration. None: cross-fit
    # small LQF jobs and those of few images a class, else hold out DEFAULT_VAL_FRACTION
    # (see `calibration`). Solver "exact" ignores it: its leave-one-out outputs calibrate
    # it.
    val_fraction: float | None = None
    # Where the temperature comes from (Calibration). None: by the job's size and images
    # per class (the rule above CROSSFIT_CALIBRATION_MAX_ITEMS); "holdout" holds out
    # val_fraction (a fifth when unset); "crossfit" trains on every item at any size
    # (LQF, solver pcg, one worker); "loo" is solver "exact"'s, and its only one.
    calibration: Calibration | None = None
    batch_size: int = 64
    device: str = "auto"

    # LQF (docs/method.md)
    leaky_slope: float = 0.1  # 0 keeps the original ReLU (ablation)
    # Last k feature blocks linearized, plus the head. None: the backbone's own default
    # (mobilenet_v2: 4, which bench.transfer's validation chose in every 100-shot run and
    # tied with 2 below that; resnets and tiny_cnn: 2). The trained model records the value.
    suffix_blocks: int | None = None
    kappa: float = 5.0  # targets are kappa * onehot
    # lambda in lambda/2 ||delta_w||^2. None: the solver's default (DEFAULT_WEIGHT_DECAY);
    # the trained model records the value.
    weight_decay: float | None = None
    # Ridge penalty of the head initialisation, relative to the feature scale (see probe.py).
    # Strong: a head that already interpolates the few training images leaves the
    # linearized suffix nothing to learn.
    probe_l2: float = 10.0
    loss: LQFLoss = LQFLoss.MSE
    use_kfac: bool = True
    # None: "kfac" for the MSE fit by K-FAC-preconditioned CG (solved to its optimum),
    # else "isotropic". The trained model records the value.
    regularizer: Regularizer | None = None
    solver: Solver = Solver.PCG
    # mu of the "kfac" regularizer: 10 was as accurate as the isotropic early stop on dev at
    # 10, 25 and 100 shots, 1 no better and slower, 100 less accurate (docs/method.md).
    metric_strength: float = 10.0
    # PCG iterations at most (or optimiser steps for the CE ablation). None: the
    # regularizer's DEFAULT_MAX_ITERS (the isotropic one's 10 are an early stop:
    # validation accuracy peaked after 5-10 iterations, bench.solver). Recorded.
    max_iters: int | None = None
    # Stop when ||grad|| / ||grad at dw = 0|| <= tol. None: the regularizer's DEFAULT_TOL.
    tol: float | None = None
    # Processes that share the fit, each a shard of the items (distributed.py): the same
    # model to rounding, sooner on a host with cores or GPUs to spare. LQF with solver pcg.
    workers: int = 1

    # Non-linear fine-tuning baseline
    lr: float = 1e-5  # Adam; 1e-4 and above wrecked 5-shot fine-tuning (bench/transfer.py)
    epochs: int = 30
    train_blocks: int = 0  # 0 = whole network, k = last k feature blocks + head
    patience: int = 5  # early stopping on the validation split

    # Linear probe baseline
    probe: ProbeKind = ProbeKind.RIDGE

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from user input (JSON / CLI), rejecting unknown keys and bad values."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InvalidConfigError(
                f"unknown hyperparameter(s) {unknown}; known: {sorted(known)}"
            )
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            kwargs[name] = _coerce(name, known[name].type, value)
        config = cls(**kwargs)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, Enum):
                out[key] = value.value
        return out

    @property
    def suffix(self) -> int:
        """suffix_blocks once resolved (train_model fills it in from the backbone)."""
        if self.suffix_blocks is None:
            raise InvalidConfigError("suffix_blocks is unset: resolve it from the backbone "
                                     "(Backbone.default_suffix_blocks) first")
        return self.suffix_blocks

    @property
    def input_size(self) -> int:
        """image_size once resolved (train_model chooses it from the images)."""
        if self.image_size is None:
            raise InvalidConfigError("image_size is unset: resolve it from the images "
                                     "(Backbone.auto_image_size) first")
        return self.image_size

    @property
    def ridge(self) -> float:
        """weight_decay, or the solver's default when it is unset."""
        if self.weight_decay is not None:
            return self.weight_decay
        return DEFAULT_WEIGHT_DECAY[self.solver]

    @property
    def resolved_regularizer(self) -> Regularizer:
        """regularizer, or the default where it is unset: "kfac" wherever K-FAC
        preconditions an MSE fit by PCG (the converged objective), else "isotropic"."""
        if self.regularizer is not None:
            return self.regularizer
        converges = (self.method == Method.LQF and self.loss == LQFLoss.MSE and self.use_kfac
                     and self.solver == Solver.PCG)
        return Regularizer.KFAC if converges else Regularizer.ISOTROPIC

    @property
    def resolved_max_iters(self) -> int:
        if self.max_iters is not None:
            return self.max_iters
        return DEFAULT_MAX_ITERS[self.resolved_regularizer]

    @property
    def resolved_tol(self) -> float:
        return self.tol if self.tol is not None else DEFAULT_TOL[self.resolved_regularizer]

    def resolved_solver_settings(self) -> TrainConfig:
        """This config with the regularizer, max_iters and tol it runs with filled in
        (train_model records them in the model)."""
        return self.replace(regularizer=self.resolved_regularizer,
                            max_iters=self.resolved_max_iters, tol=self.resolved_tol)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        checks = [
            ("image_size", self.image_size is None or 16 <= self.image_size <= 1024,
             "null (chosen from the images) or between 16 and 1024"),
            ("val_fraction", self.val_fraction is None or 0.0 <= self.val_fraction < 0.9,
             "null (chosen by the job's size) or in [0, 0.9)"),
            ("batch_size", 1 <= self.batch_size <= 4096, "between 1 and 4096"),
            ("leaky_slope", 0.0 <= self.leaky_slope < 1.0, "in [0, 1)"),
            ("suffix_blocks", self.suffix_blocks is None or 0 <= self.suffix_blocks <= 64,
             "null (the backbone's default) or between 0 and 64"),
            ("kappa", self.kappa > 0, "positive"),
            ("weight_decay", self.weight_decay is None or self.weight_decay > 0,
             "null (the solver's default) or positive"),
            ("metric_strength", self.metric_strength > 0, "positive"),
            ("probe_l2", self.probe_l2 > 0, "positive"),
            ("max_iters", self.max_iters is None or 1 <= self.max_iters <= 100_000,
             "null (the regularizer's default) or between 1 and 100000"),
            ("tol", self.tol is None or 0 < self.tol < 1,
             "null (the regularizer's default) or in (0, 1)"),
            ("lr", 0 < self.lr < 10, "in (0, 10)"),
            ("epochs", 1 <= self.epochs <= 10_000, "between 1 and 10000"),
            ("train_blocks", 0 <= self.train_blocks <= 64, "between 0 and 64"),
            ("patience", 1 <= self.patience <= 10_000, "between 1 and 10000"),
            ("workers", 1 <= self.workers <= MAX_WORKERS, f"between 1 and {MAX_WORKERS}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise InvalidConfigError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if self.regularizer == Regularizer.KFAC and not (
                self.use_kfac and self.loss == LQFLoss.MSE):
            raise InvalidConfigError("regularizer 'kfac' needs use_kfac true and loss 'mse'")
        isotropic = self.resolved_regularizer == Regularizer.ISOTROPIC
        if self.solver == Solver.EXACT and not (self.loss == LQFLoss.MSE and isotropic):
            raise InvalidConfigError("solver 'exact' needs loss 'mse' and regularizer "
                                     "'isotropic'")
        self._validate_calibration()
        if self.workers > 1 and not (self.method == Method.LQF and self.solver == Solver.PCG
                                     and self.loss == LQFLoss.MSE):
            raise InvalidConfigError("workers > 1 needs method 'lqf' with solver 'pcg' and "
                                     "loss 'mse' (the sums a distributed fit splits)")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise InvalidConfigError(
                f"device must be 'auto', 'cpu' or 'cuda[:n]', got {self.device!r}"
            )

    def _validate_calibration(self) -> None:
        """Refuse a calibration the job cannot run (train._calibration trusts this)."""
        if self.calibration is None:
            return
        exact = self.method == Method.LQF and self.solver == Solver.EXACT
        if exact != (self.calibration == Calibration.LOO):
            raise InvalidConfigError(
                "solver 'exact' calibrates on its leave-one-out outputs: leave calibration "
                "unset or 'loo'" if exact else
                "calibration 'loo' needs method 'lqf' with solver 'exact'")
        if self.calibration == Calibration.HOLDOUT and self.val_fraction == 0.0:
            raise InvalidConfigError("calibration 'holdout' needs val_fraction unset (a "
                                     "fifth) or above 0; val_fraction 0 skips calibration")
        if self.calibration == Calibration.CROSSFIT:
            if not (self.method == Method.LQF and self.solver == Solver.PCG
                    and self.workers == 1):
                raise InvalidConfigError("calibration 'crossfit' needs method 'lqf' with "
                                         "solver 'pcg' and workers 1")
            if self.val_fraction is not None:
                raise InvalidConfigError("calibration 'crossfit' trains on every item: "
                                         "leave val_fraction unset")


_ENUMS: dict[str, type[Enum]] = {"Method": Method, "LQFLoss": LQFLoss, "ProbeKind": ProbeKind,
                                  "Regularizer": Regularizer, "Solver": Solver,
                                  "JpegDecode": JpegDecode, "Calibration": Calibration}


def _coerce(name: str, type_name: Any, value: Any) -> Any:
    type_name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
    if type_name.endswith(" | None"):
        return None if value is None else _coerce(name, type_name.removesuffix(" | None"), value)
    if type_name in _ENUMS:
        enum = _ENUMS[type_name]
        try:
            return enum(value)
        except ValueError:
            choices = [e.value for e in enum]  # type: ignore[attr-defined]
            raise InvalidConfigError(f"{name} must be one of {choices}, got {value!r}") from None
    if type_name == "bool":
        if isinstance(value, bool):
            return value
        raise InvalidConfigError(f"{name} must be true or false, got {value!r}")
    if type_name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if type_name == "str":
        if not isinstance(value, str):
            raise InvalidConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value
