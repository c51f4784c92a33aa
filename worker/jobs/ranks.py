"""The other ranks of a `workers: N` job as tasks for other workers (LQF_DISTRIBUTED=workers).

Rank 0 is the job's own worker. It queues one `lqf.fit_rank` task per other rank, naming
its items and rank 0's address. Any free worker (another host's GPU) takes one, loads its
items from the artifact store, and joins the fit (lqf_core.distributed). A task that
starts after the fit ended, or after rank 0 gave up waiting, finds the fit closed in Redis
and does nothing. If ranks do not all arrive within the rendezvous timeout (the queue is
busy), the job fails with `distributed_fit` instead of holding its worker.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections.abc import Iterator
from typing import Any

from lqf_core.backbones import load_backbone
from lqf_core.config import TrainConfig
from lqf_core.distributed import run_rank
from lqf_core.errors import LQFError
from lqf_core.train import RankShard, ShardLauncher, fit_shard
from state.jobstore import JobStatus, JobStore
from state.stores import artifacts_for
from worker.config import WorkerSettings

log = logging.getLogger("lqf.worker")

FIT_RANK_TASK = "lqf.fit_rank"
CLOSED_TTL_S = 24 * 3600


def _closed_key(job_id: str, address: str) -> str:
    return f"lqf:fit:{job_id}:{address}:closed"


def shard_launcher(job: dict[str, Any], settings: WorkerSettings,
                   jobs: JobStore) -> ShardLauncher:
    from worker.celery_app import celery_app  # the app imports the tasks, which import us

    @contextlib.contextmanager
    def start(address: str, config: TrainConfig, num_classes: int,
              shards: list[RankShard]) -> Iterator[None]:
        world = len(shards) + 1
        for rank, shard in enumerate(shards, start=1):
            celery_app.send_task(FIT_RANK_TASK, queue=settings.queue, kwargs={
                "job_id": job["id"], "rank": rank, "world": world, "address": address,
                "config": config.to_dict(), "item_ids": shard.item_ids,
                "labels": shard.labels, "num_classes": num_classes})
        try:
            yield
        finally:
            jobs.r.set(_closed_key(job["id"], address), "1", ex=CLOSED_TTL_S)

    return ShardLauncher(start, advertised_host(settings.rank_host))


def advertised_host(setting: str) -> str:
    """LQF_RANK_HOST, with "auto" meaning the address this host's name resolves to (a
    container's address on its compose network)."""
    return socket.gethostbyname(socket.gethostname()) if setting == "auto" else setting


def fit_rank(settings: WorkerSettings, jobs: JobStore, *, job_id: str, rank: int, world: int,
             address: str, config: dict[str, Any], item_ids: list[str], labels: list[int],
             num_classes: int) -> str:
    """Be rank `rank` of the job's fit: this worker's share of the items."""
    job = jobs.get(job_id)
    if jobs.r.exists(_closed_key(job_id, address)) or job is None or \
            job.get("status") != JobStatus.RUNNING.value:
        log.info("distributed fit already over; rank not started",
                 extra={"job_id": job_id, "rank": rank})
        return "skipped"
    try:
        artifacts = artifacts_for(settings)
        manifest = artifacts.manifest(job["dataset_id"])
        root = artifacts.dataset_dir(job["dataset_id"])  # synced by manifest()
        files = {str(it.id): root / it.file for it in manifest.items}
        train_config = TrainConfig.from_dict(config)
        backbone = load_backbone(train_config.backbone, settings.weights_dirs())
        work = functools.partial(fit_shard, backbone, [files[i] for i in item_ids], labels,
                                 num_classes, train_config, None)
        run_rank(rank, world, address, train_config.device, work)
    except (LQFError, KeyError, OSError) as exc:
        # Rank 0 sees the fit fail and fails the job; this worker simply goes on.
        log.warning("rank of a distributed fit failed",
                    extra={"job_id": job_id, "rank": rank, "error": repr(exc)})
        return "failed"
    log.info("rank finished", extra={"job_id": job_id, "rank": rank})
    return "done"
