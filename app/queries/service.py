"""Closed-form queries of LQF models (uncertainty, influence, self-influence).

A query needs the model's posterior (lqf_core.posterior.LQFPosterior): the quadratic
rebuilt from the stored training images. Building it costs a pass of the frozen prefix
over the training set, the quadratic's setup, its K-FAC factors and (for K-FAC answers)
leverages, so each is built once per model, cached (small LRU) and shared; concurrent
first requests for one model share one build. Queries on one posterior are serialised
(what it computes lazily, e.g. CG leverages, is cached inside it).

Exactness: H^-1 is applied by CG solves (exact to tolerance) when N*C is at most
LQF_EXACT_QUERY_LIMIT, else by the K-FAC approximation; every answer says which.

Deadlines: every query runs under a `Deadline` (LQF_QUERY_TIMEOUT_S). The blocking
work polls it and stops (lqf_core's `Cancelled`) once it has passed, so a thread is
never left computing an answer nobody waits for; the client gets a 503 that names the
limit. A posterior's build is different: it is what every later query needs, and at
N = 1,000 on two cores it takes longer than one query's deadline, so it runs as a
background task of its own, in its own thread, bounded by LQF_POSTERIOR_BUILD_TIMEOUT_S.
A request that arrives while it runs waits up to its own deadline, then gets a 503
`posterior_building` with Retry-After; the build goes on, and the next request finds it
done. A build that fails is forgotten, so the next request tries again. The K-FAC
leverages (leave-one-out answers only) are a second stage, computed after the entry is
served, a batch of items at a time between other queries of it: with C classes they
cost C backward passes and C x C forms per item, 260 s of a 101-class model's build on
2 cores, which uncertainty and first-order influence need not wait for. Leave-one-out
queries wait for them like a build (503 `leverages_building`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from app.cache import AsyncLRU
from app.config import Settings
from app.errors import ApiError
from app.models.service import require_lqf
from app.predict.service import Loaded, PredictorCache
from app.queries.deadline import Deadline
from app.queries.priority import QueryFirstLock
from lqf_core.active import HeadPosterior, Ranking, SignalNet, head_posterior_of, select_batch
from lqf_core.errors import Cancelled
from lqf_core.posterior import LQFPosterior
from lqf_core.review import prefix_features, training_posterior
from lqf_core.serving import Predictor
from state.artifacts import ArtifactStore
from state.records import ItemsGone, ModelRecord, item_ids_of

DEADLINE_GRACE_S = 1.0
# The leverages' stage holds a posterior's lock for one batch of items at a time, and
# queries go first (QueryFirstLock), so a query waits at most for the batch in progress.
# A batch's cost grows with C^2 (C backward passes and C x C forms per item); per item it
# is flat from 8 items up (2-core AMD EPYC, C = 10: 17 ms an item, 0.13 s a batch of 8).
# So 8 items at 10 classes, 2 at 20, one from 29 (a single item of 101 classes: ~1 s).
LEVERAGE_BATCH_WORK = 800
log = logging.getLogger("lqf.api")
T = TypeVar("T")


def leverage_batch(num_classes: int) -> int:
    """Training items per step of the leverages' stage."""
    return max(1, min(32, LEVERAGE_BATCH_WORK // num_classes**2))


def image_url(dataset_id: str, item_id: int) -> str:
    return f"/datasets/{dataset_id}/items/{item_id}/image"


@dataclass
class PosteriorEntry:
    posterior: LQFPosterior
    prefix: nn.Module
    predictor: Predictor
    dataset_id: str
    item_ids: list[int]
    labels: list[str]  # given label of each training item
    exact: bool
    lock: QueryFirstLock = field(default_factory=QueryFirstLock)
    _head: HeadPosterior | None = None  # for ranking: computed on first use
    # The K-FAC leverages (leave-one-out answers), the build's second stage: computed a
    # batch of items at a time after the entry is served (PosteriorCache._leverages).
    leverages_task: asyncio.Future[None] | None = None
    leverages_deadline: Deadline | None = None
    leverages_done: int = 0  # training items whose leverages are computed
    retired: bool = False  # evicted or dropped from the cache: start nothing more for it

    @property
    def solver(self) -> str:
        return "cg" if self.exact else "kfac"

    @property
    def class_names(self) -> list[str]:
        return self.predictor.class_names

    def features(self, x: torch.Tensor, deadline: Deadline | None = None) -> torch.Tensor:
        return prefix_features(self.prefix, x, self.predictor.device,
                               deadline.passed if deadline is not None else None)

    # -- queries (blocking: run in the executor) ----------------------------------------
    def uncertainty(self, x: torch.Tensor, deadline: Deadline) -> list[dict[str, Any]]:
        with self.lock.query(), self.posterior.interruptible(deadline.passed):
            u = self.posterior.uncertainty(self.features(x, deadline), exact=self.exact)
        names = self.class_names
        out = []
        for probs, cov, ood, ratio in zip(u.probabilities.cpu(), u.covariance.cpu(),
                                          u.ood_score.cpu(), u.variance_ratio.cpu(),
                                          strict=True):
            var = torch.diagonal(cov).clamp_min(0)
            out.append({
                "probabilities": {n: float(p) for n, p in zip(names, probs, strict=True)},
                "variance": {n: float(v) for n, v in zip(names, var, strict=True)},
                "ood_score": float(ood),
                "variance_ratio": float(ratio),
                "solver": self.solver,
            })
        return out

    def influence(self, x: torch.Tensor, top_k: int, exact_loo: bool,
                  deadline: Deadline) -> dict[str, Any]:
        with self.lock.query(), self.posterior.interruptible(deadline.passed):
            inf = self.posterior.influence(self.features(x[:1]), exact=self.exact,
                                           with_loo=exact_loo)
        scores = (inf.exact if exact_loo and inf.exact is not None else inf.first_order)
        scores = scores.detach().double().cpu()
        order = torch.argsort(scores)
        # Negative: removing the item would lower the predicted class's output, it supports
        # the prediction (proponent); positive: it opposes it (opponent).
        proponents = [int(i) for i in order if scores[i] < 0][:top_k]
        opponents = [int(i) for i in order.flip(0) if scores[i] > 0][:top_k]
        return {"output_class": self.class_names[inf.output_class],
                "proponents": [self._item(i, float(scores[i])) for i in proponents],
                "opponents": [self._item(i, float(scores[i])) for i in opponents]}

    def rank(self, x: torch.Tensor, batch_size: int, deadline: Deadline) -> Ranking:
        """The images of x to label next (lqf_core.active.select_batch)."""
        with self.lock.query():
            if self._head is None:
                self._head = head_posterior_of(self.posterior)
            z_pool = self.features(x, deadline).to(self.posterior.problem.z)
            pool = SignalNet.of_posterior(self.posterior)(z_pool, should_stop=deadline.passed)
            return select_batch(self._head, pool, batch_size, should_stop=deadline.passed)

    def self_influence(self, limit: int, deadline: Deadline) -> tuple[list[dict[str, Any]], int]:
        with self.lock.query(), self.posterior.interruptible(deadline.passed):
            scores, loo_labels = self.posterior.self_influence(exact=self.exact)
        scores = scores.detach().double().cpu()
        order = torch.argsort(scores, descending=True)[:limit]
        items = [{**self._item(int(i), float(scores[i])),
                  "predicted_label": self.class_names[int(loo_labels[i])]} for i in order]
        return items, len(scores)

    @property
    def self_influence_solver(self) -> str:
        """"exact" where the model stores its exact leave-one-out outputs."""
        return "exact" if self.posterior.stored_loo_outputs is not None else self.solver

    def _item(self, i: int, score: float) -> dict[str, Any]:
        item_id = self.item_ids[i]
        return {"item_id": item_id, "label": self.labels[i], "score": score,
                "image_url": image_url(self.dataset_id, item_id)}


def build_entry(store: ArtifactStore, record: ModelRecord, predictor: Predictor,
                exact_limit: int, deadline: Deadline) -> PosteriorEntry:
    """The posterior of one model from its dataset's stored images (blocking)."""
    model = predictor.model
    ids = item_ids_of(model.info, "train_item_ids")
    dataset_id = str(model.info.get("dataset_id") or record["dataset_id"])
    if store.dataset_meta(dataset_id) is None:
        raise ApiError(409, f"the dataset {dataset_id} the model was trained on is gone; "
                            "queries need its training images", "dataset_gone")
    if not ids:
        raise ApiError(409, f"model {record['id']} lists no training items",
                       "incompatible_model")
    root = store.dataset_dir(dataset_id)
    try:
        files, y, labels = store.manifest(dataset_id).resolve(ids, model.class_names, root)
    except ItemsGone as exc:
        raise ApiError(409, f"model {record['id']}: {exc}", "incompatible_model") from None
    exact = len(ids) * model.num_classes <= exact_limit
    # IncompatibleModelError (the data no longer reproduce the model) -> 409.
    # float64 where CG gives exact answers; float32 suffices for K-FAC (and is faster).
    built = training_posterior(predictor, files, y,
                               dtype=torch.float64 if exact else torch.float32,
                               should_stop=deadline.passed)
    # K-FAC leverages come after (PosteriorCache._start_leverages): with many classes they
    # cost minutes, and uncertainty and first-order influence do not need them.
    built.posterior.prepare(exact=exact, should_stop=deadline.passed, leverages=False)
    return PosteriorEntry(posterior=built.posterior, prefix=built.prefix,
                          predictor=predictor, dataset_id=dataset_id, item_ids=ids,
                          labels=labels, exact=exact)


@dataclass
class _Build:
    task: asyncio.Task[PosteriorEntry]
    deadline: Deadline
    started: float = field(default_factory=time.monotonic)


class PosteriorCache:
    """The `size` most recently used posteriors; each built once, off the event loop."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.executor = ThreadPoolExecutor(settings.query_threads, thread_name_prefix="query")
        # Builds get their own thread: a long one does not hold up queries of built models;
        # so do the leverages (a second stage), which would otherwise hold up builds.
        self.build_executor = ThreadPoolExecutor(1, thread_name_prefix="posterior-build")
        self.leverage_executor = ThreadPoolExecutor(1, thread_name_prefix="posterior-leverages")
        self._entries: AsyncLRU[PosteriorEntry] = AsyncLRU(settings.posterior_cache_size,
                                                           on_drop=self._dropped)
        self._builds: dict[str, _Build] = {}

    def deadline(self) -> Deadline:
        return Deadline(self.settings.query_timeout_s)

    async def get(self, store: ArtifactStore, record: ModelRecord, predictors: PredictorCache,
                  deadline: Deadline, leverages: bool = False) -> PosteriorEntry:
        """The model's posterior: cached, or from its build (started if none runs),
        waited for up to `deadline`; past it a 503 `posterior_building`. `leverages`:
        for a leave-one-out answer, also wait for its leverages (503 `leverages_building`)."""
        entry = await self._built(store, record, predictors, deadline)
        if leverages:
            await self._leverages(record["id"], entry, deadline)
        return entry

    async def _built(self, store: ArtifactStore, record: ModelRecord,
                     predictors: PredictorCache, deadline: Deadline) -> PosteriorEntry:
        require_lqf(record)
        model_id = record["id"]

        async def built() -> PosteriorEntry:
            build = self._builds.get(model_id) or self._start_build(store, record, predictors)
            try:
                return await asyncio.shield(build.task)
            finally:
                if build.task.done() and self._builds.get(model_id) is build:
                    del self._builds[model_id]  # done: cached, or failed (try again later)

        try:
            return await asyncio.wait_for(self._entries.get(model_id, built),
                                          deadline.remaining())
        except TimeoutError:
            build = self._builds.get(model_id)
            running = f" (running for {time.monotonic() - build.started:.0f} s)" if build else ""
            raise ApiError(503, f"the posterior of model {model_id} is still being built"
                                f"{running}: a pass over its training items and their K-FAC "
                                "factors, once per model; retry in a few seconds",
                           "posterior_building", headers={"Retry-After": "5"}) from None

    def _start_build(self, store: ArtifactStore, record: ModelRecord,
                     predictors: PredictorCache) -> _Build:
        limit = Deadline(self.settings.posterior_build_timeout_s)

        async def build() -> PosteriorEntry:
            started = time.monotonic()
            loaded: Loaded = await predictors.get(store, record["id"], record["model_version"])
            entry: PosteriorEntry = await self.run(
                limit, build_entry, store, record, loaded.predictor,
                self.settings.exact_query_limit, limit, executor=self.build_executor,
                timeout_message=f"the posterior's build did not finish within "
                                f"LQF_POSTERIOR_BUILD_TIMEOUT_S = {limit.seconds:g} s and was "
                                "stopped; raise that limit, or train on fewer items")
            log.info("posterior built", extra={
                "model_id": record["id"], "items": entry.posterior.n, "solver": entry.solver,
                "seconds": round(time.monotonic() - started, 2)})
            if not entry.exact and entry.posterior.needs_kfac_leverages:
                self._start_leverages(record["id"], entry)
            return entry

        task = asyncio.get_running_loop().create_task(build())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # always retrieved
        self._builds[record["id"]] = entry = _Build(task, limit)
        return entry

    def _start_leverages(self, model_id: str, entry: PosteriorEntry) -> None:
        """The entry's K-FAC leverages in the background, a batch of items at a time
        under its lock, so queries of the served entry run in between."""
        limit = entry.leverages_deadline = Deadline(self.settings.posterior_build_timeout_s)
        entry.leverages_done = 0

        def compute() -> None:
            started = time.monotonic()
            steps = entry.posterior.kfac_leverage_steps(leverage_batch(len(entry.class_names)))
            while True:
                with entry.lock.background(limit.passed), \
                        entry.posterior.interruptible(limit.passed):
                    done = next(steps, None)
                if done is None:
                    break
                entry.leverages_done = done
            log.info("posterior leverages computed", extra={
                "model_id": model_id, "items": entry.posterior.n,
                "seconds": round(time.monotonic() - started, 2)})

        future = asyncio.get_running_loop().run_in_executor(self.leverage_executor, compute)
        # A failed (or stopped) stage leaves the leverages to the queries that need them.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        entry.leverages_task = future

    async def _leverages(self, model_id: str, entry: PosteriorEntry,
                         deadline: Deadline) -> None:
        """Wait, up to `deadline`, for the entry's leverages (leave-one-out influence and
        closed-form mislabel scores need them); past it a 503 `leverages_building`."""
        task = entry.leverages_task
        if task is None or not entry.posterior.needs_kfac_leverages:
            return  # not needed, or done
        if task.done() and not entry.retired:  # it failed or was stopped: start it again
            self._start_leverages(model_id, entry)
            task = entry.leverages_task
            assert task is not None
        try:
            await asyncio.wait_for(asyncio.shield(task), deadline.remaining())
        except TimeoutError:
            raise ApiError(503, f"the leave-one-out leverages of model {model_id} are still "
                                f"being computed ({entry.leverages_done} of "
                                f"{entry.posterior.n} training items), once per model; "
                                "uncertainty and first-order influence answer meanwhile; "
                                "retry in a few seconds", "leverages_building",
                           headers={"Retry-After": "10"}) from None
        except Exception:  # it failed again at once: the query computes them itself
            return

    async def run(self, deadline: Deadline, fn: Callable[..., T], *args: Any,
                  executor: ThreadPoolExecutor | None = None,
                  timeout_message: str | None = None) -> T:
        """fn(*args) in the query thread pool, within the deadline -> its result, or a
        503 once the deadline has passed (fn, which polls the deadline, then stops)."""
        def guarded() -> T:
            deadline.check()  # it may have waited in the pool's queue past the deadline
            return fn(*args)

        future = asyncio.get_running_loop().run_in_executor(executor or self.executor,
                                                            guarded)
        # Retrieved here if nobody waits for it any more (it stopped past the deadline).
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            # A little grace: the thread notices the deadline at its next poll.
            return await asyncio.wait_for(asyncio.shield(future),
                                          deadline.remaining() + DEADLINE_GRACE_S)
        except (Cancelled, TimeoutError):
            deadline.expire()
            raise ApiError(503, timeout_message or (
                f"the query did not finish within LQF_QUERY_TIMEOUT_S = {deadline.seconds:g} "
                "s and was stopped; ask for fewer images, or see the README on which queries "
                "are slow"), "query_timeout") from None

    @staticmethod
    def _retire(entry: PosteriorEntry) -> None:
        entry.retired = True
        if entry.leverages_deadline is not None:
            entry.leverages_deadline.expire()  # its leverages stop at the next batch

    async def _dropped(self, entry: PosteriorEntry) -> None:
        self._retire(entry)

    def evict(self, model_id: str) -> None:
        entry = self._entries.evict(model_id)
        if entry is not None:
            self._retire(entry)
        build = self._builds.pop(model_id, None)
        if build is not None:
            build.deadline.expire()  # a deleted model's build stops at its next poll

    async def close(self) -> None:
        for build in self._builds.values():
            build.deadline.expire()
            build.task.cancel()
        self._builds.clear()
        await self._entries.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.build_executor.shutdown(wait=False, cancel_futures=True)
        self.leverage_executor.shutdown(wait=False, cancel_futures=True)
