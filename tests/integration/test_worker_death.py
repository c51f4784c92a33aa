"""The worker-death policy: a job whose worker is SIGKILLed ends `failed` (worker_lost) within
seconds, and is never run twice - not by a duplicate delivery, not by another worker."""

from __future__ import annotations

import os
import signal
import time

import pytest
from celery import Celery

from .helpers import FINAL, LONG_JOB, QUEUE, submit, wait_job

pytestmark = pytest.mark.integration


def running_events(client, job_id):
    return [e for e in client.get(f"/jobs/{job_id}/events").json()
            if e["type"] == "status" and e["status"] == "running"]


def test_sigkilled_worker_fails_its_job_and_never_runs_it_twice(alice, service, shapes_dataset):
    job = submit(alice, shapes_dataset["id"], **LONG_JOB)
    deadline = time.monotonic() + 60
    while (current := alice.get(f"/jobs/{job['id']}").json())["progress"]["stage"] != "epoch":
        assert time.monotonic() < deadline, current
        time.sleep(0.2)
    pid = int(current["worker"].rpartition("/")[2])
    victim = next(p for p in service.live_workers() if p.pid == pid)

    # A second worker, then a duplicate of the job's task - what Redis does with a task it
    # thinks was lost. The job's lease is held, so the copy must not start it again.
    service.start_worker("spare")
    service.wait_ready(min_workers=2)
    Celery(broker=service.env["LQF_REDIS_URL"]).send_task("lqf.train", args=[job["id"]],
                                                          queue=QUEUE)
    time.sleep(3)
    current = alice.get(f"/jobs/{job['id']}").json()
    assert current["status"] == "running" and current["attempts"] == 1
    assert current["worker"].endswith(f"/{pid}")
    assert len(running_events(alice, job["id"])) == 1

    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    killed_at = time.monotonic()
    failed = wait_job(alice, job["id"], FINAL, timeout=30)
    # lease ttl is 3 s and the sweep runs every second in these tests
    assert time.monotonic() - killed_at < 10
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "worker_lost"
    assert "killed or crashed" in failed["error"]["message"]
    assert str(pid) in failed["error"]["message"]

    # It stays failed: the surviving worker does not pick it up again.
    time.sleep(2)
    again = alice.get(f"/jobs/{job['id']}").json()
    assert again["status"] == "failed" and again["attempts"] == 1
    assert len(running_events(alice, job["id"])) == 1

    # The service carries on with the spare worker.
    quick = submit(alice, shapes_dataset["id"], method="linear_probe")
    assert wait_job(alice, quick["id"], FINAL)["status"] == "succeeded"
    assert service.live_workers()
