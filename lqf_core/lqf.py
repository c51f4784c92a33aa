"""LQF training on cached prefix outputs: the quadratic problem and its solvers.

    L(dw) = 1/(2N) sum_i ||f_lin(z_i; w0 + dw) - kappa onehot(y_i)||^2 + R(dw)
    grad L(dw) = H dw - b,   b = J^T (Y - f(w0)) / N

with the regularizer (config.regularizer)
    isotropic:  R = lambda/2 ||dw||^2,               H = J^T J / N + lambda I
    kfac:       R = mu/2 dw^T (K + lambda I) dw,     H = J^T J / N + mu (K + lambda I)
where K is the K-FAC approximation of J^T J / N (kfac.py). The optimum solves H dw = b;
PCG preconditioned by K-FAC reaches it to a stated tolerance. With the kfac regularizer
the preconditioned matrix (K + lambda I)^-1 H / (1 + mu) has every eigenvalue at least
mu / (1 + mu), so the solve converges in tens of iterations instead of stalling.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lqf_core.backbones import Backbone
from lqf_core.classifier import lqf_network
from lqf_core.config import LQFLoss, Regularizer, Solver, TrainConfig
from lqf_core.distributed import Shard
from lqf_core.errors import InvalidConfigError, TrainingCancelled
from lqf_core.exact import DualFactor
from lqf_core.gram import gram_matrix, layer_signals
from lqf_core.kfac import KFACPreconditioner, compute_kfac_factors
from lqf_core.linearize import LinearizedNet, batches
from lqf_core.model import TrainedModel
from lqf_core.probe import RidgeMoments, fit_ridge, fit_ridge_from_moments
from lqf_core.signals import SignalProducts
from lqf_core.solve import SolveResult, conjugate_gradient

StepCallback = Callable[[int, float], None]


@dataclass
class QuadraticProblem:
    """The LQF objective over N cached inputs. z (N, ...), targets (N, C)."""

    lin: LinearizedNet
    z: torch.Tensor
    targets: torch.Tensor
    weight_decay: float
    batch_size: int = 256

    cache: bool = True
    # Record the layer signals and take J's products from them (signals.py) instead of
    # cached linear maps, where they fit; the pass also yields the K-FAC factors.
    signals: bool = False
    on_signals: Callable[[int, int], None] | None = None
    # The kfac regularizer: mu (K + lambda I) replaces lambda I (see the module docstring).
    metric: KFACPreconditioner | None = None
    metric_strength: float = 0.0
    # A distributed fit (distributed.py): z holds this rank's items only, and the sums over
    # items are completed across ranks; n is then every rank's items together.
    shard: Shard | None = None

    def __post_init__(self) -> None:
        self.n_local = self.z.shape[0]
        self.n = self.n_local if self.shard is None else int(
            self.shard.total(float(self.n_local)))
        self.slices = list(batches(self.n_local, self.batch_size))
        self.products: SignalProducts | None = None
        self._maps = None
        if self.signals and SignalProducts.fits(self.lin, self.z, self.targets.shape[1]):
            self.products = SignalProducts.record(self.lin, self.z, on_batch=self.on_signals)
            self.output0 = self.products.output0
        elif self.cache:
            # H is constant, so each batch's forward and backward linear maps can be built
            # once and replayed by every solver iteration (memory: the suffix activations).
            self._maps = [self.lin.linear_maps(self.z[sl]) for sl in self.slices]
            self.output0 = torch.cat([out for out, _, _ in self._maps])
        else:
            self.output0 = torch.cat([self.lin.output0(self.z[sl]) for sl in self.slices])

    @property
    def products_kind(self) -> str:
        """Where J's products come from: "signals", "linear maps" or "network passes"."""
        if self.products is not None:
            return "signals"
        return "linear maps" if self._maps is not None else "network passes"

    def hessian_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v = J^T J v / N + (the regularizer's Hessian) v."""
        total = self.transpose_products(self.jacobian_products(v))
        return self.over_items(total) / self.n + self.regularizer_matvec(v)

    def over_items(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over this process's items -> the sum over every item (all ranks')."""
        return partial if self.shard is None else self.shard.all_reduce(partial)

    def regularizer_matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self.metric is not None:
            return self.metric_strength * self.metric.matvec(v)
        return self.weight_decay * v

    def jacobian_products(self, v: torch.Tensor) -> torch.Tensor:
        """J v for every cached input, (N, C)."""
        if self.products is not None:
            return self.products.forward(v)
        if self._maps is not None:
            return torch.cat([jvp_map(v) for _, jvp_map, _ in self._maps])
        return torch.cat([self.lin.jvp(self.z[sl], v)[1] for sl in self.slices])

    def rhs(self) -> torch.Tensor:
        """b = J^T (Y - f(w0)) / N: minus the gradient at dw = 0."""
        return self.over_items(self.transpose_products(self.targets - self.output0)) / self.n

    def transpose_products(self, u: torch.Tensor) -> torch.Tensor:
        """J^T u summed over the cached inputs, u (N, C) -> (P,)."""
        if self.products is not None:
            return self.products.transpose(u)
        total = torch.zeros(self.lin.num_params, dtype=self.z.dtype, device=self.z.device)
        u = u.to(self.z.dtype)
        for index, sl in enumerate(self.slices):
            if self._maps is not None:
                total += self._maps[index][2](u[sl])
            else:
                total += self.lin.vjp(self.z[sl], u[sl])
        return total

    def outputs(self, delta_w: torch.Tensor) -> torch.Tensor:
        """f_lin on every cached input (of this rank), (N, C)."""
        if self.products is not None:
            return self.output0 + self.products.forward(delta_w)
        return torch.cat([self.lin.forward(self.z[sl], delta_w) for sl in self.slices])

    def loss(self, delta_w: torch.Tensor, outputs: torch.Tensor | None = None) -> float:
        """The objective at delta_w (`outputs`: its f_lin on the inputs, if known)."""
        residual = (self.outputs(delta_w) if outputs is None else outputs) - self.targets
        penalty = 0.5 * delta_w @ self.regularizer_matvec(delta_w)
        squares = self.over_items((residual**2).sum().reshape(1))
        return float(0.5 * squares[0] / self.n + penalty)


# Frozen-prefix outputs by training item id: they depend on the image only, so they can be
# reused by every later job on the same backbone, image size and suffix (e.g. unlearning).
PrefixCache = MutableMapping[str, torch.Tensor]


@dataclass
class LQFSetup:
    """The linearization point w0 (backbone + ridge head) and the quadratic around it."""

    lin: LinearizedNet
    problem: QuadraticProblem
    head_weight: torch.Tensor
    head_bias: torch.Tensor

    def tensors(self, delta_w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The learned state as TrainedModel tensors (see model.py)."""
        out = {"head.weight": self.head_weight.cpu(), "head.bias": self.head_bias.cpu()}
        for name, value in self.lin.space.unflatten(delta_w).items():
            out[f"delta.{name}"] = value.detach().cpu()
        return out

    def warm_start_from(self, parent: TrainedModel) -> torch.Tensor:
        """A starting dw that reproduces the parent's weights w0' + dw' as closely as the
        new linearization point allows: same suffix deltas, same total head."""
        names = self.lin.space.names
        start = {n: parent.tensors[f"delta.{n}"].to(self.head_weight) for n in names}
        head = [n for n in names if n.startswith(HEAD_PREFIX)]
        for name in head:
            field = name.removeprefix(HEAD_PREFIX)
            start[name] = start[name] + parent.tensors[f"head.{field}"].to(start[name]) - (
                self.head_weight if field == "weight" else self.head_bias
            )
        return self.lin.space.flatten(start)


# The head is the last module of the (suffix, head) network: parameter names "1.weight/bias".
HEAD_PREFIX = "1."


def fit_lqf_head(backbone: Backbone, z: torch.Tensor, y: torch.Tensor, num_classes: int,
                 config: TrainConfig, device: torch.device, shard: Shard | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ridge probe on the (leaky) suffix features at w0: the head part of w0."""
    dim = backbone.feature_dim
    zeros = (torch.zeros(num_classes, dim), torch.zeros(num_classes))
    _, net0 = lqf_network(backbone, config.suffix, config.leaky_slope, *zeros)
    suffix = net0[0].to(device=device, dtype=z.dtype)
    with torch.no_grad():
        phi = torch.cat([suffix(z[sl]) for sl in batches(len(z), 256)])
    targets = config.kappa * F.one_hot(y, num_classes).to(z.dtype).to(device)
    if shard is not None:
        return fit_ridge_from_moments(
            RidgeMoments.of(phi, targets).reduced(shard.all_reduce), config.probe_l2,
            phi.dtype)
    return fit_ridge(phi, targets, config.probe_l2)


def build_lqf_problem(backbone: Backbone, z: torch.Tensor, y: torch.Tensor, num_classes: int,
                      config: TrainConfig, device: torch.device,
                      head: tuple[torch.Tensor, torch.Tensor] | None = None,
                      shard: Shard | None = None, signals: bool = False,
                      on_signals: Callable[[int, int], None] | None = None) -> LQFSetup:
    """Everything that depends on the training data: the ridge head (part of w0), the
    network linearized at w0 and the quadratic. A pure function of (z, y, config);
    `head` supplies an already fitted head (e.g. a saved model's) instead. With `shard`,
    (z, y) are this rank's items and the sums are completed across ranks. `signals`:
    J's products from recorded layer signals where they fit (QuadraticProblem)."""
    targets = config.kappa * F.one_hot(y, num_classes).to(z.dtype).to(device)
    if head is None:
        head = fit_lqf_head(backbone, z, y, num_classes, config, device, shard)
    head_weight, head_bias = (t.to(device=device, dtype=z.dtype) for t in head)
    _, net = lqf_network(backbone, config.suffix, config.leaky_slope,
                         head_weight, head_bias)
    net.to(device=device, dtype=z.dtype)
    lin = LinearizedNet(net)
    problem = QuadraticProblem(lin, z, targets, config.ridge, batch_size=SOLVER_BATCH,
                               shard=shard, signals=signals, on_signals=on_signals)
    return LQFSetup(lin, problem, head_weight.to(device), head_bias.to(device))


# Inputs per linearized pass in the solver: large batches amortise per-call overhead.
SOLVER_BATCH = 256


def kfac_preconditioner(
    problem: QuadraticProblem, on_batch: Callable[[int, int], None] | None = None
) -> KFACPreconditioner:
    """(K + lambda I)^-1 with K the K-FAC approximation of J^T J / N on the problem's data."""
    reduce = None if problem.shard is None else problem.shard.all_reduce
    if problem.products is not None:
        factors = problem.products.factors(reduce)
    else:
        factors = compute_kfac_factors(problem.lin, problem.z, batch_size=problem.batch_size,
                                       on_batch=on_batch, reduce=reduce)
    return KFACPreconditioner(problem.lin, factors, damping=problem.weight_decay)


@dataclass
class CurvatureApproximation:
    """H^-1 ~ scale * (K + lambda I)^-1: the preconditioner of the solves and the
    approximate inverse of approximate queries. scale = 1 for the isotropic regularizer
    (H ~ K + lambda I), 1 / (1 + mu) for the kfac one (H ~ (1 + mu)(K + lambda I))."""

    kfac: KFACPreconditioner
    scale: float

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.kfac(v) * self.scale


def regularize(problem: QuadraticProblem, config: TrainConfig,
               on_batch: Callable[[int, int], None] | None = None) -> CurvatureApproximation:
    """Compute K-FAC on the problem's data; attach the config's regularizer to the problem
    (its Hessian then is the objective's) -> the curvature approximation of that H."""
    kfac = kfac_preconditioner(problem, on_batch=on_batch)
    if config.resolved_regularizer == Regularizer.KFAC:
        problem.metric, problem.metric_strength = kfac, config.metric_strength
        return CurvatureApproximation(kfac, 1.0 / (1.0 + config.metric_strength))
    return CurvatureApproximation(kfac, 1.0)


def solve_quadratic(
    problem: QuadraticProblem,
    preconditioner: Callable[[torch.Tensor], torch.Tensor] | None,
    tol: float,
    max_iters: int,
    x0: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_iterate: Callable[[int, torch.Tensor], None] | None = None,
) -> SolveResult:
    """The optimum dw* of the LQF objective by (K-FAC-preconditioned) CG."""
    return conjugate_gradient(
        problem.hessian_matvec,
        problem.rhs(),
        x0=x0,
        preconditioner=preconditioner,
        tol=tol,
        max_iters=max_iters,
        callback=callback,
        should_stop=should_stop,
        on_iterate=on_iterate,
    )


@dataclass
class LQFFit:
    """A fitted LQF model: its linearization point and quadratic, dw, and solver facts;
    for the exact solver also every training item's leave-one-out output (N, C)."""

    setup: LQFSetup
    delta: torch.Tensor
    info: dict
    loo_outputs: torch.Tensor | None = None


# The exact solver keeps the Gram matrix, its Cholesky factor and L^-1 (for the
# leave-one-out blocks) at once: 3 (N C)^2 float64 numbers, 2.4 GB at N C = 10,000.
EXACT_MAX_OUTPUTS = 20_000
# Refinement steps against the matrix-free products, the relative gradient norm they aim
# for (float32 products bottom out near 1e-6), and the one the model must reach to be
# recorded as converged.
EXACT_REFINE_STEPS = 3
EXACT_TOL = 1e-6
EXACT_CONVERGED = 1e-4


def fit_exact(setup: LQFSetup, *, on_signals: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> LQFFit:
    """The unique optimum dw* = J^T alpha, (K + N lambda I) alpha = Y - f0, by a Cholesky
    factor of the Gram matrix K = J J^T (gram.py, exact.py), refined against the exact
    products; and the exact leave-one-out outputs of every training item."""
    problem = setup.problem
    n, c = problem.targets.shape
    if n * c > EXACT_MAX_OUTPUTS:
        raise InvalidConfigError(
            f"solver 'exact' handles up to {EXACT_MAX_OUTPUTS} items x classes (memory: "
            f"3 (N C)^2 float64 numbers); this job has {n} x {c} = {n * c}: use solver 'pcg'")
    if problem.products is not None:
        signals = problem.products.layer_signals()
    else:
        signals = layer_signals(setup.lin, problem.z, on_batch=on_signals)
    gram = gram_matrix(signals, dtype=torch.float64, should_stop=should_stop)
    del signals
    factor = DualFactor.factor(gram, n, problem.weight_decay)
    del gram
    residual = (problem.targets - problem.output0).double()
    rhs_norm = float(problem.rhs().norm())
    alpha = factor.solve(residual)
    history = []
    for _ in range(EXACT_REFINE_STEPS + 1):
        delta = problem.transpose_products(alpha)
        dual_residual = residual - problem.jacobian_products(delta).double() - (
            n * problem.weight_decay * alpha)
        # The primal gradient is -J^T (dual residual) / N.
        grad = problem.transpose_products(dual_residual) / n
        history.append(float(grad.norm()) / max(rhs_norm, 1e-300))
        if history[-1] <= EXACT_TOL or len(history) > EXACT_REFINE_STEPS:
            break
        alpha = alpha + factor.solve(dual_residual)
    if should_stop is not None and should_stop():
        raise TrainingCancelled("cancelled after the exact solve")
    loo_residuals = factor.loo_residuals(alpha)
    info = {"num_linearized_params": setup.lin.num_params, "solver": Solver.EXACT.value,
            "jacobian_products": problem.products_kind,
            "relative_grad_norm": history[-1], "solver_iterations": len(history) - 1,
            "solver_converged": history[-1] <= EXACT_CONVERGED,
            "refinement_history": history}
    loo_outputs = problem.targets.double() - loo_residuals
    return LQFFit(setup, delta, info, loo_outputs.to(problem.z.dtype))


def fit_lqf(backbone: Backbone, z: torch.Tensor, y: torch.Tensor, num_classes: int,
            config: TrainConfig, device: torch.device, *,
            on_kfac: Callable[[int, int], None] | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None,
            should_stop: Callable[[], bool] | None = None,
            warm_start: TrainedModel | None = None,
            shard: Shard | None = None) -> LQFFit:
    """Fit LQF on cached prefix outputs z: ridge head, linearization, K-FAC, then the
    PCG solve of the quadratic (or the cross-entropy ablation). What a training job does
    after the prefix pass, so that other code can refit exactly as a job would.
    With `shard`, z and y are this rank's items (distributed.py); every rank calls this
    with the same config and gets the same dw."""
    if shard is not None and (config.solver == Solver.EXACT or config.loss != LQFLoss.MSE):
        raise InvalidConfigError("a fit on several workers supports solver 'pcg' with the "
                                 "mse loss; run the exact solver or the cross-entropy "
                                 "ablation with workers: 1")
    # The signal pass is the K-FAC pass (or the Gram matrix's), kept: only worth it when
    # that pass runs anyway and the products come from the quadratic (not the CE ablation).
    signals = config.loss == LQFLoss.MSE and (config.use_kfac or config.solver == Solver.EXACT)
    setup = build_lqf_problem(backbone, z, y, num_classes, config, device, shard=shard,
                              signals=signals, on_signals=on_kfac)
    if config.solver == Solver.EXACT:
        return fit_exact(setup, on_signals=on_kfac, should_stop=should_stop)
    problem = setup.problem
    precond = regularize(problem, config, on_batch=on_kfac) if config.use_kfac else None
    info: dict = {"num_linearized_params": setup.lin.num_params,
                  "jacobian_products": problem.products_kind}
    if config.loss == LQFLoss.MSE:
        x0 = setup.warm_start_from(warm_start) if warm_start is not None else None
        result = solve_quadratic(
            problem, precond, config.resolved_tol, config.resolved_max_iters, x0=x0,
            callback=None if on_step is None else (
                lambda i, r: on_step(i, {"relative_grad_norm": r})),
            should_stop=should_stop,
        )
        delta = result.x
        info.update(solver_iterations=result.iterations,
                    relative_grad_norm=result.relative_residual,
                    solver_converged=result.converged)
    else:
        delta = fit_cross_entropy(
            problem, y.to(device), precond, config.resolved_max_iters,
            callback=None if on_step is None else (lambda i, loss: on_step(i, {"loss": loss})),
            should_stop=should_stop,
        )
    return LQFFit(setup, delta, info)


def fit_cross_entropy(
    problem: QuadraticProblem,
    labels: torch.Tensor,
    preconditioner: Callable[[torch.Tensor], torch.Tensor] | None,
    steps: int,
    callback: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Ablation: cross-entropy instead of MSE on the same linearized model.

    Not a quadratic, so no closed form: `steps` full-batch gradient steps, preconditioned
    by the same K-FAC of J^T J / N + lambda I (an upper bound on the cross-entropy
    Gauss-Newton matrix, so unit steps are safe).
    """
    delta_w = torch.zeros(problem.lin.num_params, dtype=problem.z.dtype, device=problem.z.device)
    for step in range(1, steps + 1):
        if should_stop is not None and should_stop():
            raise TrainingCancelled("cancelled during the cross-entropy fit")
        grad = problem.weight_decay * delta_w
        loss = 0.0
        for sl in batches(problem.n, problem.batch_size):
            z = problem.z[sl]
            logits = problem.lin.forward(z, delta_w)
            probs = F.softmax(logits, dim=1)
            onehot = F.one_hot(labels[sl], logits.shape[1]).to(logits.dtype)
            grad += problem.lin.vjp(z, probs - onehot) / problem.n
            loss += float(F.cross_entropy(logits, labels[sl], reduction="sum")) / problem.n
        direction = preconditioner(grad) if preconditioner is not None else grad
        delta_w = delta_w - direction
        if callback is not None:
            callback(step, loss)
    return delta_w
