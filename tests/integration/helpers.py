"""Helpers shared by the integration tests (fixtures live in conftest.py)."""

from __future__ import annotations

import time
from typing import Any

import httpx

KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789",
        "fuzz": "key-fuzz-0123456789"}  # fuzz: schemathesis, in a tenant of its own
QUEUE = "lqf-test"
FAST_TINY = {"image_size": 32}
FINAL = {"succeeded", "failed", "cancelled"}


def upload(client: httpx.Client, data: bytes, name: str = "shapes") -> httpx.Response:
    return client.post("/datasets", files={"file": ("data.zip", data, "application/zip")},
                       data={"name": name})


def wait_job(client: httpx.Client, job_id: str, statuses: set[str],
             timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    # Quick polls first, then at most 2 a second: a long wait under test_limits' request
    # rate (2 a second) must not drain the tenant's bucket for the requests that follow.
    pause = 0.1
    while time.monotonic() < deadline:
        r = client.get(f"/jobs/{job_id}")
        if r.status_code == 429:  # a service with a request rate limit: wait as told
            time.sleep(float(r.headers.get("Retry-After", "1")))
            continue
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in statuses:
            return job
        time.sleep(pause)
        pause = min(1.5 * pause, 0.5)
    raise AssertionError(f"job {job_id} did not reach {statuses}: {job}")


def submit(client: httpx.Client, dataset_id: str, **body: Any) -> dict[str, Any]:
    body = {"dataset_id": dataset_id, "backbone": "tiny_cnn",
            "hyperparameters": dict(FAST_TINY), **body}
    r = client.post("/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def assert_same_predictions(client: httpx.Client, model_ids: list[str], images: list[bytes],
                            atol: float = 1e-4) -> None:
    """The models predict the same labels, and probabilities within `atol`, on `images`."""
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    answers = [client.post("/predict", data={"model_id": m}, files=files).json()
               for m in model_ids]
    for other in answers[1:]:
        for p, q in zip(answers[0]["predictions"], other["predictions"], strict=True):
            assert p["label"] == q["label"]
            for name, value in p["probabilities"].items():
                assert abs(value - q["probabilities"][name]) < atol


# A job that runs long enough to be cancelled or killed: many fine-tuning epochs with
# early stopping effectively off. It polls should_stop every batch.
LONG_JOB = {"method": "finetune",
            "hyperparameters": {**FAST_TINY, "epochs": 5000, "patience": 5000}}




def ui_sign_in(client: httpx.Client, tenant: str, next_path: str = "/ui",
               **headers: str) -> httpx.Response:
    """Sign a plain HTTP client in to the dashboard (its login form's double-submit
    token first) -> the login response; the client then holds the session cookie."""
    import re

    login = client.get("/ui/login")
    match = re.search(r'name="csrf_token" value="([^"]+)"', login.text)
    assert match, login.text[:300]
    return client.post("/ui/login", data={"api_key": KEYS[tenant], "csrf_token": match.group(1),
                                           "next": next_path}, headers=headers)


def ui_csrf(client: httpx.Client) -> str:
    """The signed-in session's CSRF token, from a page's forms."""
    import re

    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/ui").text)
    assert match
    return match.group(1)
