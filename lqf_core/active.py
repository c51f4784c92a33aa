"""Which images to label next: a batch chosen pick by pick under the model's posterior.

The LQF posterior is Gaussian and its covariance does not depend on the labels, so what
labeling an image does to the uncertainty of every other image is known before anyone
labels it. A batch is therefore built greedily, each pick conditioned exactly on the
earlier ones.

**Which posterior.** Conditioning the whole posterior (1.5 M weights for MobileNetV2) on
a pick needs the pool's cross-covariances with it, J_pool H^-1 J_s^T: a linearized pass
over the pool for every pick, minutes per pick at 10,000 images on a CPU. The head's
block is cheap and exact. With the suffix held at its fitted values, the head weights of
each class have the Gaussian posterior with covariance
    Sigma = sigma^2 (Phi^T Phi + Gamma)^-1
where Phi holds the features phi(x) at w0 that feed the head (with a 1 for the bias) of
the N training items, Gamma is the objective's prior on the head (N lambda I; for the
"kfac" regularizer mu (Phi^T Phi + N lambda I), its K-FAC block being exact for a linear
layer) and sigma^2 the likelihood's noise (LQFPosterior.noise_variance). The head is
linear in its weights, so every class output of pool items a, b has the covariance
k(a, b) = phi_a^T Sigma phi_b, and the classes are independent. Labeling item s adds
phi_s phi_s^T / sigma^2 to the precision: in output space the rank-C update
    k'(a, b) = k(a, b) - k(a, s) k(s, b) / (sigma^2 + k(s, s))      (each class alike).
The prior strength stays the trained model's (Bayes' rule; a retrain on N + b items
would use (N + b) lambda).

**The criterion** of a trained model: the probability, under that posterior, that the
served model has its two best classes in the wrong order,
    Phi(-(mu_1 - mu_2) / sqrt(2 k(x, x)))
with mu the served outputs. It is small where the model is sure (a large margin) or has
seen similar images (a small k). A pick lowers k around it, so one batch does not spend
ten labels on the same confusion, which top-k margin sampling does.

**Cold start** (no labels, no model): no posterior says anything yet, so the first batch
is chosen for typicality and diversity on the pre-trained features (after TypiClust,
Hacohen, Dekel and Weinshall 2022): k-means into `batch_size` clusters, then from each
the item closest to its nearest neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from lqf_core.backbones import Backbone
from lqf_core.classifier import lqf_network
from lqf_core.config import Method, Regularizer
from lqf_core.data import ImageSource
from lqf_core.errors import Cancelled, IncompatibleModelError, InvalidDataError
from lqf_core.kfac import EXACT_OUTPUTS_LIMIT
from lqf_core.linearize import LinearizedNet, batches
from lqf_core.model import TrainedModel
from lqf_core.posterior import LQFPosterior, noise_variance
from lqf_core.review import prefix_features
from lqf_core.serving import Predictor

HEAD = "1"  # the head's module name in lqf_network's Sequential(suffix, head)
# Cold start (TypiClust-like): k-means iterations, and the neighbours that measure how
# typical an item is of its cluster.
KMEANS_ITERATIONS = 20
TYPICAL_NEIGHBOURS = 20
TYPICAL_CANDIDATES = 2000


@dataclass(frozen=True)
class Ranking:
    """A batch to label: pool positions, first pick first, and the criterion of each
    pick at the time it was picked (conditioned on the earlier picks)."""

    order: list[int]
    scores: list[float]
    strategy: str  # "posterior" or "cold_start"


@dataclass(frozen=True)
class LQFSignals:
    """What selection needs of a set of images under a trained LQF model."""

    features: torch.Tensor  # (m, D + 1): the head's inputs at w0, with a 1 for its bias
    outputs: torch.Tensor  # (m, C): the served model's outputs f_lin (before temperature)


class SignalNet:
    """The served LQF model as selection reads it: prefix outputs z -> the head's inputs at
    w0 (with a 1 for the bias) and the served outputs. Built once, used for every chunk."""

    def __init__(self, lin: LinearizedNet, delta: torch.Tensor):
        if f"{HEAD}.weight" not in lin.space.names or f"{HEAD}.bias" not in lin.space.names:
            raise IncompatibleModelError("the model's head is not part of its linearization")
        self.lin, self.delta = lin, delta
        self.suffix = cast(nn.Sequential, lin.net)[0]

    @classmethod
    def of_model(cls, model: TrainedModel, backbone: Backbone, device: torch.device,
                 dtype: torch.dtype) -> SignalNet:
        if model.method != Method.LQF:
            raise InvalidDataError(
                f"ranking needs an lqf model, this one is {model.method.value}")
        t = model.tensors
        _, net = lqf_network(backbone, model.config.suffix, model.config.leaky_slope,
                             t["head.weight"], t["head.bias"])
        net.to(device=device, dtype=dtype)
        lin = LinearizedNet(net)
        delta = lin.space.flatten({n: t[f"delta.{n}"].to(device, dtype)
                                   for n in lin.space.names})
        return cls(lin, delta)

    @classmethod
    def of_posterior(cls, posterior: LQFPosterior) -> SignalNet:
        """The posterior's own linearization (no second copy of the network)."""
        return cls(posterior.lin, posterior.delta)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            phi = self.suffix(z)
        return torch.cat([phi, torch.ones_like(phi[:, :1])], dim=1)

    def __call__(self, z: torch.Tensor, should_stop: Callable[[], bool] | None = None,
                 batch_size: int = 256) -> LQFSignals:
        features, outputs = [], []
        with torch.no_grad():
            for sl in batches(z.shape[0], batch_size):
                _check(should_stop)
                features.append(self.features(z[sl]))
                outputs.append(self.lin.forward(z[sl], self.delta))
        return LQFSignals(torch.cat(features), torch.cat(outputs))


def lqf_signals(model: TrainedModel, backbone: Backbone, z: torch.Tensor,
                should_stop: Callable[[], bool] | None = None,
                batch_size: int = 256) -> LQFSignals:
    """Head features and served outputs of prefix outputs z (m, ...), on z's device and
    dtype."""
    return SignalNet.of_model(model, backbone, z.device, z.dtype)(z, should_stop, batch_size)


@dataclass(frozen=True)
class HeadPosterior:
    """The head block of a trained LQF model's posterior (module docstring)."""

    covariance: torch.Tensor  # Sigma, (D + 1, D + 1): of each class's head weights
    noise: float  # sigma^2

    @classmethod
    def of(cls, model: TrainedModel, train: LQFSignals, labels: torch.Tensor) -> HeadPosterior:
        """From the training items' signals (in the model's training order) and labels."""
        config = model.config
        n = train.features.shape[0]
        targets = config.kappa * torch.nn.functional.one_hot(
            labels.to(train.outputs.device), model.num_classes).to(train.outputs)
        noise = noise_variance(targets - train.outputs, config.kappa)
        phi = train.features.double()
        gram = phi.T @ phi
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        prior = n * config.ridge * eye
        if config.resolved_regularizer == Regularizer.KFAC:
            if model.num_classes > EXACT_OUTPUTS_LIMIT:
                raise InvalidDataError(
                    f"ranking under the kfac regularizer needs at most {EXACT_OUTPUTS_LIMIT} "
                    "classes (above, the objective's K-FAC block of the head is sampled)")
            prior = config.metric_strength * (gram + prior)
        precision = gram + prior
        covariance = noise * torch.cholesky_inverse(torch.linalg.cholesky(precision))
        return cls(0.5 * (covariance + covariance.T), noise)


class ConditionedKernel:
    """k(a, b) = phi_a^T S phi_b over a pool, conditioned on picks observed with noise:
    a partial pivoted Cholesky factorisation, one row of `factors` per pick."""

    def __init__(self, features: torch.Tensor, covariance: torch.Tensor | None,
                 noise: float, max_picks: int):
        self.features = features.double()
        self.projected = self.features if covariance is None else self.features @ covariance
        self.variance = (self.projected * self.features).sum(1)  # k(a, a), conditioned
        self.noise = noise
        self.factors = self.features.new_zeros(max_picks, features.shape[0])
        self.picks = 0

    def column(self, s: int) -> torch.Tensor:
        """k(., s) conditioned on the picks so far, (m,)."""
        prior = self.projected @ self.features[s]
        used = self.factors[: self.picks]
        return prior - used.T @ used[:, s]

    def condition(self, s: int) -> torch.Tensor:
        """Observe item s; -> its factor row u (k' = k - u u^T)."""
        k = self.column(s)
        u = k / torch.sqrt(self.noise + k[s])
        self.factors[self.picks] = u
        self.picks += 1
        self.variance = self.variance - u**2
        return u


def _check(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("stopped while ranking the pool")


def _batch_size(batch_size: int, pool: int) -> int:
    if batch_size < 1:
        raise InvalidDataError(f"batch_size must be at least 1, got {batch_size}")
    if pool < 1:
        raise InvalidDataError("the pool to rank is empty")
    return min(batch_size, pool)


def flip_log_probability(outputs: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """log P(the top two classes are in the wrong order) per item, (m,)."""
    top = outputs.double().topk(2, dim=1).values
    margin = top[:, 0] - top[:, 1]
    std = torch.sqrt(2 * variance.clamp_min(1e-30))
    return torch.special.log_ndtr(-margin / std)


def select_batch(head: HeadPosterior, pool: LQFSignals, batch_size: int,
                 should_stop: Callable[[], bool] | None = None) -> Ranking:
    """The next `batch_size` pool items to label, each maximising the flip probability
    under the posterior conditioned on the earlier picks."""
    m = pool.features.shape[0]
    b = _batch_size(batch_size, m)
    kernel = ConditionedKernel(pool.features.to(head.covariance.device), head.covariance,
                               head.noise, b)
    outputs = pool.outputs.to(head.covariance.device)
    taken = torch.zeros(m, dtype=torch.bool, device=outputs.device)
    order, scores = [], []
    for _ in range(b):
        _check(should_stop)
        log_p = flip_log_probability(outputs, kernel.variance).masked_fill(taken, -torch.inf)
        s = int(log_p.argmax())
        order.append(s)
        scores.append(float(log_p[s].exp()))
        taken[s] = True
        kernel.condition(s)
    return Ranking(order, scores, "posterior")


def cold_start_batch(features: torch.Tensor, batch_size: int,
                     should_stop: Callable[[], bool] | None = None, seed: int = 0) -> Ranking:
    """The first `batch_size` items to label of an unlabeled pool of pre-trained features
    (m, D): k-means on the normalised features into `batch_size` clusters, then the most
    typical item of each cluster, largest cluster first. Score: the cluster's share of
    the pool."""
    m = features.shape[0]
    b = _batch_size(batch_size, m)
    phi = torch.nn.functional.normalize(features.double(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    assign = _kmeans(phi, b, generator, should_stop)
    sizes = torch.bincount(assign, minlength=b)
    order, scores = [], []
    for cluster in torch.argsort(sizes, descending=True, stable=True).tolist():
        _check(should_stop)
        members = torch.nonzero(assign == cluster).flatten()
        if len(members) == 0:
            continue
        order.append(int(members[_most_typical(phi[members], generator)]))
        scores.append(float(sizes[cluster]) / m)
    return Ranking(order, scores, "cold_start")


def _kmeans(x: torch.Tensor, k: int, generator: torch.Generator,
            should_stop: Callable[[], bool] | None) -> torch.Tensor:
    """Cluster index of each row: k-means++ seeding, then Lloyd iterations."""
    m = x.shape[0]
    centres = [int(torch.randint(m, (1,), generator=generator))]
    nearest = ((x - x[centres[0]]) ** 2).sum(1)
    for _ in range(1, k):
        _check(should_stop)
        weights = nearest.clamp_min(0).cpu()
        pick = (int(torch.multinomial(weights, 1, generator=generator))
                if float(weights.sum()) > 0 else int(torch.randint(m, (1,), generator=generator)))
        centres.append(pick)
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(1))
    centroids = x[centres].clone()
    assign = torch.zeros(m, dtype=torch.long, device=x.device)
    for _ in range(KMEANS_ITERATIONS):
        _check(should_stop)
        assign = torch.cdist(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return torch.cdist(x, centroids).argmin(1)


def _most_typical(x: torch.Tensor, generator: torch.Generator) -> int:
    """The row with the smallest mean distance to its nearest neighbours (TypiClust's
    typicality, Hacohen et al. 2022), among up to TYPICAL_CANDIDATES random rows."""
    n = x.shape[0]
    if n <= 2:
        return 0
    candidates = torch.randperm(n, generator=generator)[:TYPICAL_CANDIDATES].to(x.device)
    distances = torch.cdist(x[candidates], x)
    neighbours = min(TYPICAL_NEIGHBOURS, n - 1)
    nearest = distances.topk(neighbours + 1, dim=1, largest=False).values[:, 1:]
    return int(candidates[nearest.mean(1).argmin()])


# Pool images decoded, preprocessed and passed through the network this many at a time:
# only their head features and outputs are kept (about 21 KB a pool item in float64 for
# MobileNetV2's 1,281 head inputs, twice: features and their projection).
POOL_CHUNK = 256


def image_signals(predictor: Predictor, images: Sequence[ImageSource],
                  progress: Callable[[int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  net: SignalNet | None = None) -> LQFSignals:
    """Signals of images (files, bytes), read POOL_CHUNK at a time; `progress(n)` after
    each chunk, n images done. `net`: the model's SignalNet (built here if not given)."""
    model = predictor.model
    prefix = predictor.backbone.split(model.config.suffix)[0].to(predictor.device).eval()
    if net is None:
        net = SignalNet.of_model(model, predictor.backbone, predictor.device, torch.float32)
    parts = []
    for start in range(0, len(images), POOL_CHUNK):
        _check(should_stop)
        chunk = images[start:start + POOL_CHUNK]
        x = torch.stack([predictor.load_image(image) for image in chunk])
        z = prefix_features(prefix, x, predictor.device, should_stop).to(net.delta)
        parts.append(net(z, should_stop))
        if progress is not None:
            progress(start + len(chunk))
    return LQFSignals(torch.cat([p.features for p in parts]),
                      torch.cat([p.outputs for p in parts]))


def head_posterior_of(posterior: LQFPosterior) -> HeadPosterior:
    """The head posterior of an already built LQFPosterior (its training items' prefix
    outputs and served outputs are at hand)."""
    z = posterior.problem.z
    net = SignalNet.of_posterior(posterior)
    features = torch.cat([net.features(z[sl]) for sl in batches(z.shape[0], 256)])
    return HeadPosterior.of(posterior.model, LQFSignals(features, posterior.train_outputs),
                            posterior.labels)


def rank_files(predictor: Predictor, train_files: Sequence[Path], train_labels: Sequence[int],
               pool: Sequence[ImageSource], batch_size: int,
               progress: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> Ranking:
    """select_batch over image files: the model's training images (in its training
    order, with their class indices) give the head posterior, then the pool is read in
    chunks. `progress(done, total)` counts images read."""
    total = len(train_files) + len(pool)
    net = SignalNet.of_model(predictor.model, predictor.backbone, predictor.device,
                             torch.float32)
    train = image_signals(predictor, train_files, None if progress is None else (
        lambda n: progress(n, total)), should_stop, net)
    head = HeadPosterior.of(predictor.model, train, torch.tensor(list(train_labels)))
    signals = image_signals(predictor, pool, None if progress is None else (
        lambda n: progress(len(train_files) + n, total)), should_stop, net)
    return select_batch(head, signals, batch_size, should_stop)
