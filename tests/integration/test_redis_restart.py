"""A Redis restart (SIGKILL, then start on its append-only file, as `make serve` runs it)
while a job runs: the job carries on and succeeds, once, and the service is ready again.
Before this was fixed, the job's cancel poll raised ConnectionError and the job ended
`failed` (worker_lost) after its lease ran out (bench.faults found it)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from app.launcher import RedisServer

from .conftest import Service
from .datagen import folder_zip, make_samples
from .helpers import FINAL, KEYS, upload, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Long enough to be running across the outage; quick enough for the suite.
JOB = {"method": "finetune", "backbone": "tiny_cnn",
       "hyperparameters": {"image_size": 32, "epochs": 1500, "patience": 10_000}}


@pytest.fixture(scope="module")
def persistent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("lqf-redis-restart")
    env = {**os.environ, "LQF_QUEUE": "lqf-test-redis-restart",
           "LQF_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
           "LQF_LEASE_TTL_S": "15", "LQF_SWEEP_INTERVAL_S": "1", "LQF_WORKER_STALE_S": "20"}
    with Service.running_under(root, env, persist_redis=True) as svc:
        yield svc


def test_a_job_survives_a_redis_restart(persistent: Service) -> None:
    with persistent.client("alice") as c:
        dataset = upload(c, folder_zip(make_samples(6, seed=1))).json()
        job = c.post("/jobs", json={"dataset_id": dataset["id"], **JOB}).json()
        deadline = time.monotonic() + 60
        while c.get(f"/jobs/{job['id']}").json()["progress"]["stage"] != "epoch":
            assert time.monotonic() < deadline
            time.sleep(0.1)

        assert persistent.redis is not None and persistent.redis.proc is not None
        port = persistent.redis.port
        persistent.redis.proc.send_signal(signal.SIGKILL)
        persistent.redis.proc.wait(timeout=10)
        time.sleep(2)  # Redis is away for a while
        persistent.redis = RedisServer(persistent.redis_dir, port=port, persist=True).start()

        done = wait_job(c, job["id"], FINAL, timeout=120)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 1
        running = [e for e in c.get(f"/jobs/{job['id']}/events").json()
                   if e["type"] == "status" and e["status"] == "running"]
        assert len(running) == 1  # never run twice (Celery restores the unacked task)
        assert c.get(f"/models/{done['model_id']}").status_code == 200
        persistent.wait_ready(timeout=30)
        quick = c.post("/jobs", json={"dataset_id": dataset["id"], "method": "linear_probe",
                                      "backbone": "tiny_cnn",
                                      "hyperparameters": {"image_size": 32}}).json()
        assert wait_job(c, quick["id"], FINAL)["status"] == "succeeded"
