"""What the linear-quadratic model answers in closed form (docs/method.md).

For a trained LQF model the loss is an exact quadratic with constant Hessian
H = J^T J / N + R, R = lambda I (isotropic regularizer) or mu (K + lambda I) (the
default "kfac" one, K the K-FAC curvature fixed at training; written lambda I below), so:

* posterior: with a Gaussian likelihood the Laplace approximation is exact,
  dw ~ N(dw*, (sigma^2 / N) H^-1); the predictive covariance of a test image's outputs
  is proportional to  J_* H^-1 J_*^T  (C x C);
* influence of training item i on test output k, for removing i from the sum-form
  objective  sum_j ||r_j||^2 / 2 + (N lambda / 2) ||dw||^2  (the prior strength is
  kept fixed, as in the classical ridge leave-one-out formula):
      exact (Sherman-Morrison-Woodbury):  -(1/N) q_i^T (I - L_ii)^-1 e_i
      first order:                        -(1/N) q_i^T e_i
  with q_i = J_i H^-1 J_*^T e_k,  L_ii = J_i H^-1 J_i^T / N  (leverage, C x C),
  e_i = kappa onehot(y_i) - f_lin(x_i)  (training residual);
* self-influence: the leave-one-out residual (I - L_ii)^-1 e_i of each training item.

H^-1 v is a preconditioned CG solve (exact to its tolerance) or, as a faster option,
the K-FAC approximation (one application of the preconditioner).

Every query can be interrupted: inside `with posterior.interruptible(should_stop)`, the
solves and the loops over items poll `should_stop` and raise `Cancelled` when it says
so (a service's deadline), leaving the posterior's caches as they were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lqf_core.backbones import Backbone
from lqf_core.config import Method, Regularizer
from lqf_core.errors import Cancelled, IncompatibleModelError, InvalidDataError
from lqf_core.linearize import batches
from lqf_core.lqf import (
    CurvatureApproximation,
    LQFSetup,
    build_lqf_problem,
    fit_lqf_head,
    regularize,
)
from lqf_core.model import LOO_OUTPUTS, TrainedModel
from lqf_core.solve import conjugate_gradient


def noise_variance(residuals: torch.Tensor, kappa: float) -> float:
    """sigma^2 of the Gaussian likelihood: the mean squared training residual per output,
    floored so that a model that interpolates keeps some uncertainty."""
    return max(float((residuals**2).mean()), 1e-3 * kappa**2)


@dataclass(frozen=True)
class Influence:
    """Scores of every training item (N,) on one test output."""

    output_class: int
    first_order: torch.Tensor
    exact: torch.Tensor | None  # None when leverages were not computed


@dataclass(frozen=True)
class Uncertainty:
    """Posterior predictive of m test inputs."""

    mean: torch.Tensor  # (m, C) outputs f_lin
    covariance: torch.Tensor  # (m, C, C)
    probabilities: torch.Tensor  # (m, C), uncertainty-aware and temperature-scaled
    ood_score: torch.Tensor  # (m,) their entropy over log C, in [0, 1]
    variance_ratio: torch.Tensor  # (m,) covariance trace over the median training item's


class LQFPosterior:
    """A trained LQF model together with its training data, ready for exact queries.

    z_train: frozen-prefix outputs of the training items in `model.info['train_item_ids']`
    order; labels: their class indices. The linearization point is rebuilt from them
    and checked against the model, so queries use exactly the model's quadratic.
    """

    def __init__(self, model: TrainedModel, backbone: Backbone, z_train: torch.Tensor,
                 labels: torch.Tensor, device: torch.device | None = None,
                 tol: float = 1e-5, max_iters: int = 500, precondition: bool = True,
                 dtype: torch.dtype = torch.float64,
                 should_stop: Callable[[], bool] | None = None):
        """`should_stop` is polled between the steps of the build (Cancelled if true)."""
        if model.method != Method.LQF:
            raise InvalidDataError(
                f"exact queries need an lqf model, this one is {model.method.value}"
            )
        self.model = model
        self.device = device or z_train.device
        # float64 for CG: it reaches tight tolerances only in double precision. float32 is
        # enough for the K-FAC approximation and several times faster on CPU (float64
        # depthwise convolutions take a slow path).
        self.dtype = dtype
        self.tol = tol
        self.max_iters = max_iters
        # Without a preconditioner CG needs at most N*C + 1 iterations in exact arithmetic
        # (H is lambda I plus a rank-N*C term): the better choice for small training sets.
        self.precondition = precondition
        self._should_stop = should_stop
        z_cast = z_train.to(self.device, self.dtype)
        labels = labels.to(self.device)
        self._check()
        refit = fit_lqf_head(backbone, z_cast, labels, model.num_classes, model.config, self.device)
        stored = (model.tensors["head.weight"], model.tensors["head.bias"])
        weight_scale = float(refit[0].abs().max()) + 1e-12
        if stored[0].shape != refit[0].shape or float(
            (stored[0].to(refit[0]) - refit[0]).abs().max()
        ) > 1e-3 * weight_scale:
            raise IncompatibleModelError(
                "the training data given do not reproduce the model's linearization point "
                "(ridge head differs): were items added or removed since it was trained?"
            )
        self._check()
        # Linearize at the model's own w0 so that queries describe the served model.
        self.setup: LQFSetup = build_lqf_problem(
            backbone, z_cast, labels, model.num_classes, model.config, self.device, head=stored,
        )
        self.problem = self.setup.problem
        self.lin = self.setup.lin
        space = self.lin.space
        self.delta = space.flatten(
            {n: model.tensors[f"delta.{n}"].to(self.setup.head_weight) for n in space.names}
        )
        self._check()
        self.train_outputs = self.jacobian_products(self.delta) + self.problem.output0
        self.residuals = self.problem.targets - self.train_outputs  # e_i, (N, C)
        self.labels = labels
        self._curvature: CurvatureApproximation | None = None
        if model.config.resolved_regularizer == Regularizer.KFAC:
            # Part of the objective itself (its Hessian), so it is needed before any solve.
            self._curvature = regularize(self.problem, model.config,
                                         on_batch=lambda *_: self._check())
        self._leverages: dict[bool, torch.Tensor] = {}  # by exactness
        self._reference_trace: float | None = None
        self._should_stop = None  # queries set their own (interruptible)

    @contextlib.contextmanager
    def interruptible(self, should_stop: Callable[[], bool] | None) -> Iterator[None]:
        """Queries inside the block stop (raise Cancelled) once `should_stop()` is true."""
        previous, self._should_stop = self._should_stop, should_stop
        try:
            yield
        finally:
            self._should_stop = previous

    def _check(self) -> None:
        if self._should_stop is not None and self._should_stop():
            raise Cancelled("the query was stopped before it finished")

    @property
    def n(self) -> int:
        return self.problem.n

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    # -- linear algebra ------------------------------------------------------------
    def jacobian_products(self, v: torch.Tensor) -> torch.Tensor:
        """J_train v for every training item, (N, C)."""
        return self.problem.jacobian_products(v)

    def inverse_hessian(self, exact: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> H^-1 v, by PCG to `tol` (exact) or by the K-FAC approximation."""
        kfac = self.curvature()
        if not exact:
            return kfac

        def solve(v: torch.Tensor) -> torch.Tensor:
            result = conjugate_gradient(self.problem.hessian_matvec, v,
                                        preconditioner=kfac if self.precondition else None,
                                        tol=self.tol, max_iters=self.max_iters,
                                        should_stop=self._should_stop)
            return result.x

        return solve

    def curvature(self) -> CurvatureApproximation:
        """The K-FAC approximation of H (computed once, on the training data)."""
        if self._curvature is None:
            self._curvature = regularize(self.problem, self.model.config,
                                         on_batch=lambda *_: self._check())
        return self._curvature

    def _kfac_forms(self, z: torch.Tensor) -> torch.Tensor:
        """J(z_i) K^-1 J(z_i)^T with K the K-FAC approximation of H, (m, C, C)."""
        approx = self.curvature()
        return approx.scale * approx.kfac.output_forms(self.lin, z.to(self.device, self.dtype),
                                                       on_batch=self._check)

    def _output_gradients(self, z: torch.Tensor) -> torch.Tensor:
        """J(z)^T e_c for one input z (1, ...) and every output c, (C, P)."""
        eye = torch.eye(self.num_classes, dtype=z.dtype, device=z.device)
        return torch.stack([self.lin.vjp(z, eye[c:c + 1]) for c in range(self.num_classes)])

    # -- uncertainty ----------------------------------------------------------------
    def outputs(self, z: torch.Tensor) -> torch.Tensor:
        """f_lin at test inputs z (m, ...) -> (m, C)."""
        return self.lin.forward(z.to(self.device, self.dtype), self.delta)

    def predictive_covariance(self, z: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """J_* H^-1 J_*^T for each test input, (m, C, C)."""
        if not exact:
            return self._kfac_forms(z)
        solve = self.inverse_hessian(exact)
        out = []
        for i in range(z.shape[0]):
            self._check()
            zi = z[i:i + 1].to(self.device, self.dtype)
            grads = self._output_gradients(zi)
            columns = torch.stack([solve(g) for g in grads])  # (C, P): H^-1 J^T e_c
            out.append(grads @ columns.T)
        return torch.stack(out)

    def noise_variance(self) -> float:
        return noise_variance(self.residuals, self.model.config.kappa)

    def uncertainty(self, z: torch.Tensor, exact: bool = False) -> Uncertainty:
        """Posterior predictive of test inputs z (m, ...).

        Output covariance (sigma^2 / N) J_* H^-1 J_*^T; class probabilities by the probit
        approximation softmax(mu_c / sqrt(1 + pi/8 var_c) / T) with the model's fitted
        temperature T; ood_score = the entropy of those probabilities over log C (0: one
        class certain, 1: uniform); variance_ratio = the covariance's trace relative to the
        median over (up to 32) training items, about 1 in distribution.

        Why two scores (docs/method.md, "The OOD score"): on images like the training
        ones but of other classes (Fashion-MNIST against digits, dev data) the entropy
        told them apart far better (AUROC 0.91-0.98 against 0.78-0.79 at 96 px). Far
        outside the data, a ReLU network's probit confidence tends to a constant while
        its variance keeps growing: there the variance ratio is the signal.
        """
        predictive_covariance_scale = self.noise_variance() / self.n
        cov = self.predictive_covariance(z, exact) * predictive_covariance_scale
        mean = self.outputs(z)
        var = torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0)
        scaled = mean / torch.sqrt(1 + torch.pi / 8 * var) / self.model.temperature
        probs = torch.softmax(scaled.double(), dim=1)
        entropy = -(probs * probs.clamp_min(1e-300).log()).sum(1)
        ood = (entropy / math.log(max(self.num_classes, 2))).clamp(0, 1) + 0.0  # no -0
        reference = self.reference_trace(exact)
        ratio = torch.diagonal(cov, dim1=1, dim2=2).sum(1) / max(reference, 1e-30)
        return Uncertainty(mean, cov, probs, ood, ratio)

    def reference_trace(self, exact: bool = False) -> float:
        """The median predictive variance (trace) over up to 32 training items: what
        variance_ratio is relative to. Computed once."""
        if self._reference_trace is None:
            sample = self.problem.z[: min(32, self.n)]
            traces = torch.diagonal(self.predictive_covariance(sample, exact), dim1=1, dim2=2)
            scale = self.noise_variance() / self.n
            self._reference_trace = float(traces.sum(1).median()) * scale
        return self._reference_trace

    def prepare(self, exact: bool = False,
                should_stop: Callable[[], bool] | None = None, leverages: bool = True) -> None:
        """Compute now what the first queries would: the K-FAC factors (every query's
        preconditioner or approximation) and, for K-FAC answers, the OOD reference and
        (with `leverages`) the leverages (exact leave-one-out influence, mislabel scores);
        with CG those cost N*C solves, left to the queries that need them."""
        with self.interruptible(should_stop):
            self.curvature()
            if not exact:
                self.reference_trace(exact)
                if leverages and self.needs_kfac_leverages:
                    self.leverages(exact)

    @property
    def needs_kfac_leverages(self) -> bool:
        """Whether K-FAC leave-one-out answers still need the leverages computed (not for
        a model that stores its exact leave-one-out outputs, nor once they are)."""
        return self.stored_loo_outputs is None and False not in self._leverages

    def kfac_leverage_steps(self, batch_size: int = 32) -> Iterator[int]:
        """The K-FAC leverages (leverages(exact=False)) a batch of items at a time: yields
        how many items are done after each batch, then caches the result. A caller can
        let other queries use the posterior between batches: with C outputs the forms
        cost C backward passes and C x C contractions per item (minutes for C = 101)."""
        parts = []
        for sl in batches(self.n, batch_size):
            self._check()
            parts.append(self._kfac_forms(self.problem.z[sl]) / self.n)
            yield sl.stop
        m = torch.cat(parts)
        # K-FAC stands in for H_-i, the curvature without item i (one item of N barely
        # moves it); SMW then gives L_ii = M (I + M)^-1 with M = J_i H_-i^-1 J_i^T / N, in
        # [0, 1) as a leverage must be. Using K-FAC for H itself instead gave "leverages"
        # of 20 and more on MobileNetV2.
        m = 0.5 * (m + m.transpose(1, 2))
        eye = torch.eye(self.num_classes, dtype=m.dtype, device=m.device)
        self._leverages[False] = torch.linalg.solve(eye + m, m)

    # -- influence -------------------------------------------------------------------
    def leverages(self, exact: bool = True) -> torch.Tensor:
        """L_ii = J_i H^-1 J_i^T / N for every training item, (N, C, C). Exact: N*C CG
        solves. K-FAC (approximate): C backward passes per batch of items. Computed once."""
        if exact not in self._leverages:
            if exact:
                solve = self.inverse_hessian(exact)
                out = []
                for i in range(self.n):
                    self._check()
                    grads = self._output_gradients(self.problem.z[i:i + 1])
                    columns = torch.stack([solve(g) for g in grads])
                    out.append(grads @ columns.T / self.n)
                self._leverages[exact] = torch.stack(out)
            else:
                for _ in self.kfac_leverage_steps():
                    pass
        return self._leverages[exact]

    def influence(self, z: torch.Tensor, output_class: int | None = None,
                  exact: bool = True, with_loo: bool = True) -> Influence:
        """Change of the test output `output_class` (default: the predicted class) if each
        training item were removed: first order, and exact leave-one-out when `with_loo`."""
        z = z[:1].to(self.device, self.dtype)
        if output_class is None:
            output_class = int(self.outputs(z).argmax(1))
        grads = self._output_gradients(z)
        s = self.inverse_hessian(exact)(grads[output_class])
        q = self.jacobian_products(s)  # (N, C): J_i H^-1 J_*^T e_k
        first = -(q * self.residuals).sum(1) / self.n
        loo = None
        if with_loo:
            loo_res = self.loo_residuals(exact)
            loo = -(q * loo_res).sum(1) / self.n
        return Influence(output_class, first, loo)

    @property
    def stored_loo_outputs(self) -> torch.Tensor | None:
        """The exact solver's leave-one-out outputs, stored with the model (N, C)."""
        stored = self.model.tensors.get(LOO_OUTPUTS)
        if stored is None or stored.shape != self.problem.targets.shape:
            return None
        return stored.to(self.problem.targets)

    def loo_residuals(self, exact: bool = True) -> torch.Tensor:
        """(I - L_ii)^-1 e_i: each training item's residual under the model trained
        without it, (N, C). A model of the exact solver stores them, exact."""
        stored = self.stored_loo_outputs
        if stored is not None:
            return self.problem.targets - stored
        lev = self.leverages(exact)
        eye = torch.eye(self.num_classes, dtype=lev.dtype, device=lev.device)
        return torch.linalg.solve(eye - lev, self.residuals.unsqueeze(-1)).squeeze(-1)

    def self_influence(self, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Mislabel scores: (score (N,), label the model trained without i gives (N,)).

        score = ||LOO residual||^2 / kappa^2: how surprising each given label is to the
        model that never saw it.
        """
        loo = self.loo_residuals(exact)
        loo_outputs = self.problem.targets - loo
        score = (loo**2).sum(1) / self.model.config.kappa**2
        return score, loo_outputs.argmax(1)
