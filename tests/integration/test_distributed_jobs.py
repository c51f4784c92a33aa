"""A training job that asks for `workers: 2` runs its fit on two processes (the Celery
worker and a rank it starts), makes the model a one-process job makes, and fails cleanly
when its other rank dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from .datagen import make_samples
from .helpers import FINAL, assert_same_predictions, submit, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HELD_OUT = {"image_size": 32, "val_fraction": 0.2}


def rank_processes(pid: int) -> list[int]:
    """The processes a worker spawned for a distributed fit (not multiprocessing's
    resource tracker, also a child)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                out.append(int(child))
    return out


def test_two_workers_make_the_model_one_worker_makes(alice, shapes_dataset):
    ds = shapes_dataset["id"]
    one = wait_job(alice, submit(alice, ds, method="lqf", hyperparameters=HELD_OUT)["id"],
                   FINAL)
    two = wait_job(alice, submit(alice, ds, method="lqf",
                                 hyperparameters={**HELD_OUT, "workers": 2})["id"], FINAL)
    assert one["status"] == two["status"] == "succeeded", (one, two)
    assert_same_predictions(alice, [one["model_id"], two["model_id"]],
                            [data for _, data in make_samples(2, seed=9)])
    model = alice.get(f"/models/{two['model_id']}").json()
    assert model["hyperparameters"]["workers"] == 2


def test_a_lost_rank_fails_the_job_with_a_clear_error(alice, service, shapes_dataset):
    # Long enough to be caught mid-solve: on the isotropic ridge float32 never reaches this
    # tolerance (the default objective converges, and might end before the kill).
    job = submit(alice, shapes_dataset["id"], method="lqf", hyperparameters={
        **HELD_OUT, "workers": 2, "max_iters": 100_000, "tol": 1e-12,
        "regularizer": "isotropic"})
    running = wait_job(alice, job["id"], {"running"} | FINAL)
    assert running["status"] == "running", running
    pid = int(running["worker"].rpartition("/")[2])
    deadline = time.monotonic() + 60
    while (alice.get(f"/jobs/{job['id']}").json().get("progress") or {}).get("stage") != "solve":
        assert time.monotonic() < deadline, "the job never reached the solve"
        time.sleep(0.1)
    ranks = rank_processes(pid)
    assert len(ranks) == 1, ranks
    for rank in ranks:
        os.kill(rank, signal.SIGKILL)
    failed = wait_job(alice, job["id"], FINAL, timeout=60)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "distributed_fit"
    assert "stopped answering" in failed["error"]["message"]
    # The worker itself carries on: the next job succeeds.
    again = wait_job(alice, submit(alice, shapes_dataset["id"], method="lqf",
                                   hyperparameters={**HELD_OUT, "workers": 2})["id"], FINAL)
    assert again["status"] == "succeeded", again
