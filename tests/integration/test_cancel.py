"""Cancelling queued and running jobs; a deterministic failure is not retried."""

from __future__ import annotations

import json
import threading
import time

import pytest

from .helpers import FINAL, LONG_JOB, submit, wait_job

pytestmark = pytest.mark.integration


def wait_progress(client, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["stage"] == "epoch":
            return job
        assert job["status"] in {"queued", "running"}, job
        time.sleep(0.2)
    raise AssertionError(f"job never got going: {job}")


def follow(service, job_id: str, out: list[dict]) -> None:
    """Read the job's live event stream (SSE) until the server ends it."""
    with service.client("alice") as c, c.stream(
        "GET", f"/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))


def test_cancel_running_and_queued_jobs(alice, shapes_dataset, service):
    from .datagen import folder_zip, make_samples
    from .helpers import upload

    long_job = submit(alice, shapes_dataset["id"], **LONG_JOB)
    wait_progress(alice, long_job["id"])
    streamed: list[dict] = []
    watcher = threading.Thread(target=follow, args=(service, long_job["id"], streamed))
    watcher.start()

    # With the only worker busy these two wait in the queue.
    queued = submit(alice, shapes_dataset["id"], method="linear_probe")
    doomed_ds = upload(alice, folder_zip(make_samples(3, seed=20))).json()
    doomed = submit(alice, doomed_ds["id"], method="linear_probe")
    assert alice.get(f"/jobs/{queued['id']}").json()["status"] == "queued"

    r = alice.post(f"/jobs/{queued['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert alice.delete(f"/datasets/{doomed_ds['id']}").status_code == 204

    started = time.monotonic()
    r = alice.post(f"/jobs/{long_job['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] in {"cancelling", "cancelled"}
    done = wait_job(alice, long_job["id"], FINAL, timeout=30)
    assert done["status"] == "cancelled", done
    assert time.monotonic() - started < 10
    assert done["model_id"] is None
    statuses = [e["status"] for e in alice.get(f"/jobs/{long_job['id']}/events").json()
                if e["type"] == "status"]
    assert statuses == ["queued", "running", "cancelling", "cancelled"]
    # The live stream saw progress while it ran and ended by itself with the final status.
    watcher.join(30)
    assert not watcher.is_alive()
    assert any(e["type"] == "progress" for e in streamed)
    assert streamed[-1]["type"] == "status" and streamed[-1]["status"] == "cancelled"

    # The cancelled queued job never runs; the job whose dataset vanished fails, once.
    failed = wait_job(alice, doomed["id"], FINAL, timeout=60)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "dataset_not_found"
    assert doomed_ds["id"] in failed["error"]["message"]
    assert failed["attempts"] == 1
    time.sleep(1)
    job = alice.get(f"/jobs/{queued['id']}").json()
    assert job["status"] == "cancelled" and job["started_at"] is None

    # A finished job cannot be cancelled any more.
    r = alice.post(f"/jobs/{doomed['id']}/cancel")
    assert r.status_code == 409 and r.json()["code"] == "job_finished"
    listed = alice.get("/jobs", params={"status": "cancelled"}).json()["items"]
    assert {long_job["id"], queued["id"]} <= {j["id"] for j in listed}
