"""Per-tenant limits (app/limits.py) on a service of their own with small limits: the
request rate, unfinished jobs and stored bytes, each refused with a 429 or 413 that names
the limit, and nothing stored by a refused request."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import Service
from .datagen import folder_zip, make_samples
from .helpers import FINAL, KEYS, LONG_JOB, submit, upload, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATE, BURST = 2, 20  # a slow refill: back-to-back requests soon run dry
MAX_JOBS = 2


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("lqf-limits")
    env = {**os.environ, "LQF_QUEUE": "lqf-test-limits",
           "LQF_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
           "LQF_TENANT_REQUESTS_PER_S": str(RATE), "LQF_TENANT_REQUEST_BURST": str(BURST),
           "LQF_TENANT_MAX_UNFINISHED_JOBS": str(MAX_JOBS),
           "LQF_TENANT_MAX_STORED_BYTES": str(15_000),
           "LQF_BODY_IDLE_TIMEOUT_S": "2", "LQF_MAX_UPLOAD_BYTES": str(1024 * 1024),
           # No prediction is that fast: every /predict here meets its deadline.
           "LQF_PREDICT_TIMEOUT_S": "0.001"}
    with Service.running_under(root, env) as svc:
        yield svc


def test_request_rate_is_limited_per_tenant_with_retry_after(limited: Service) -> None:
    with limited.client("fuzz") as fuzz, limited.client("bob") as bob:
        responses = [fuzz.get("/datasets") for _ in range(3 * BURST)]
        codes = [r.status_code for r in responses]
        assert codes[:BURST - 2].count(200) == BURST - 2  # the burst passes
        refused = [r for r in responses if r.status_code == 429]
        assert refused, codes
        r = refused[0]
        assert r.json()["code"] == "rate_limited"
        assert "LQF_TENANT_REQUESTS_PER_S" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) >= 1
        assert bob.get("/datasets").status_code == 200  # another tenant is not slowed
        time.sleep(1.5)  # refills at RATE a second
        assert fuzz.get("/datasets").status_code == 200


def test_unfinished_jobs_are_limited(limited: Service) -> None:
    with limited.client("alice") as alice:
        dataset = upload(alice, folder_zip(make_samples(4, seed=1))).json()
        running: list[dict[str, Any]] = [submit(alice, dataset["id"], **LONG_JOB)
                                         for _ in range(MAX_JOBS)]
        before = alice.get("/jobs").json()["total"]
        r = alice.post("/jobs", json={"dataset_id": dataset["id"], "backbone": "tiny_cnn",
                                      **LONG_JOB}, headers={"Idempotency-Key": "third"})
        assert r.status_code == 429 and r.json()["code"] == "too_many_jobs"
        assert f"the limit is {MAX_JOBS}" in r.json()["detail"]
        assert alice.get("/jobs").json()["total"] == before  # nothing queued
        alice.post(f"/jobs/{running[0]['id']}/cancel")
        wait_job(alice, running[0]["id"], FINAL, timeout=60)
        # Freed: the same Idempotency-Key is usable again (the refusal did not keep it).
        r = alice.post("/jobs", json={"dataset_id": dataset["id"], "backbone": "tiny_cnn",
                                      **LONG_JOB}, headers={"Idempotency-Key": "third"})
        assert r.status_code == 201, r.text
        for job_id in (running[1]["id"], r.json()["id"]):
            alice.post(f"/jobs/{job_id}/cancel")
            wait_job(alice, job_id, FINAL, timeout=60)


def test_stored_bytes_are_limited(limited: Service) -> None:
    with limited.client("bob") as bob:
        first = upload(bob, folder_zip(make_samples(10, seed=2)))
        assert first.status_code == 201, first.text
        listed = bob.get("/datasets").json()["total"]
        too_much = folder_zip(make_samples(60, seed=3))
        r = upload(bob, too_much)
        assert r.status_code == 413 and r.json()["code"] == "storage_limit"
        assert "LQF_TENANT_MAX_STORED_BYTES" in r.json()["detail"]
        r = bob.post(f"/datasets/{first.json()['id']}/items",
                     files={"file": ("more.zip", too_much, "application/zip")})
        assert r.status_code == 413
        assert bob.get("/datasets").json()["total"] == listed  # nothing stored
        assert bob.get(f"/datasets/{first.json()['id']}").json()["num_items"] == \
            first.json()["num_items"]
        # Deleting makes room again.
        assert bob.delete(f"/datasets/{first.json()['id']}").status_code == 204
        assert upload(bob, folder_zip(make_samples(10, seed=4))).status_code == 201


def _raw(service: Service, head: bytes, body: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send a request's head and part of its body over a plain socket, then stall: -> (the
    response, seconds until it came)."""
    host, port = service.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(head + body)
        started = time.monotonic()
        data = b""
        with contextlib.suppress(TimeoutError):
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data, time.monotonic() - started


def test_a_stalled_or_endless_body_is_cut_off(limited: Service) -> None:
    with limited.client("alice") as alice:
        listed = alice.get("/datasets").json()["total"]
    auth = f"Authorization: Bearer {KEYS['alice']}\r\n".encode()
    head = (b"POST /datasets HTTP/1.1\r\nHost: x\r\n" + auth +
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 50000\r\n\r\n")
    data, seconds = _raw(limited, head, b"--b\r\nContent-Disposition: form-data; "
                                        b'name="file"; filename="d.zip"\r\n\r\nPK', 15)
    assert data.startswith(b"HTTP/1.1 408"), data[:300]
    assert b"body_timeout" in data and b"LQF_BODY_IDLE_TIMEOUT_S" in data
    assert 1.5 < seconds < 10
    # No Content-Length, a chunked body past LQF_MAX_UPLOAD_BYTES: 413 as it streams.
    chunked = (b"POST /datasets HTTP/1.1\r\nHost: x\r\n" + auth +
               b"Content-Type: multipart/form-data; boundary=b\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    part = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="d.zip"\r\n'
            b"Content-Type: application/zip\r\n\r\n")
    pieces = [part] + [b"x" * 65536] * 20  # a valid part whose file never ends
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    data, _ = _raw(limited, chunked, body, 15)
    assert data.startswith(b"HTTP/1.1 413"), data[:300]
    assert b"too_large" in data
    with limited.client("alice") as alice:
        assert alice.get("/datasets").json()["total"] == listed  # nothing stored
        assert alice.get("/livez").status_code == 200


def test_a_prediction_past_its_deadline_is_a_504(limited: Service) -> None:
    with limited.client("bob") as bob:
        dataset = upload(bob, folder_zip(make_samples(3, seed=5))).json()
        job = submit(bob, dataset["id"], method="linear_probe")
        model = wait_job(bob, job["id"], FINAL)["model_id"]
        images = [("files", (f"{i}.png", png, "image/png"))
                  for i, (_, png) in enumerate(make_samples(20, seed=6)[:64])]
        r = bob.post("/predict", data={"model_id": model}, files=images)
        assert r.status_code == 504 and r.json()["code"] == "predict_timeout", r.text
        assert "LQF_PREDICT_TIMEOUT_S" in r.json()["detail"]
        assert bob.get("/livez").status_code == 200
        bob.delete(f"/models/{model}")
        bob.delete(f"/datasets/{dataset['id']}")


def test_limits_answer_within_the_documented_schema(limited: Service) -> None:
    schema = httpx.get(f"{limited.base_url}/openapi.json").json()
    assert "429" in schema["paths"]["/jobs"]["post"]["responses"]
