"""The service on object storage, as a deployment without a shared filesystem runs it:
two API replicas and two workers, each with a local directory of its own, sharing only a
real Redis and a real S3-compatible server (moto, tests/s3server.py). The workers run a
`workers: 2` job's ranks as tasks of each other (LQF_DISTRIBUTED=workers), as workers on
two hosts would."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from app.launcher import (
    ROOT,
    RedisServer,
    api_command,
    free_port,
    spawn,
    stop_process,
    wait_http,
    worker_command,
)
from lqf_core.artifacts import read_metadata
from tests.s3server import CREDENTIALS, s3_server

from .datagen import folder_zip, make_samples
from .helpers import FINAL, KEYS, assert_same_predictions, submit, upload, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUEUE = "lqf-s3-test"
REMOTE_CHECK_S = 1.0


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], Path]]:
    """(Base URLs of two API replicas, the folder holding each process's own directory and
    log: api-a, api-b, worker-a, worker-b)."""
    root = tmp_path_factory.mktemp("lqf-s3")
    redis_server = RedisServer(root / "redis", persist=False).start()
    procs: list[subprocess.Popen] = []
    logs: list[IO[bytes]] = []
    try:
        with s3_server() as endpoint:
            env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT),
                   "LQF_REDIS_URL": redis_server.url, "LQF_QUEUE": QUEUE,
                   "LQF_ARTIFACTS": "s3://lqf-test/deploy", "LQF_S3_ENDPOINT_URL": endpoint,
                   "LQF_REMOTE_CHECK_S": str(REMOTE_CHECK_S),
                   "LQF_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
                   "LQF_PREDICT_MAX_WAIT_MS": "5", "LQF_EXACT_QUERY_LIMIT": "0",
                   "LQF_DISTRIBUTED": "workers"}

            def start(name: str, cmd: list[str]) -> subprocess.Popen:
                log = open(root / f"{name}.log", "wb")  # noqa: SIM115
                logs.append(log)
                proc = spawn(cmd, {**env, "LQF_DATA_DIR": str(root / name)}, cwd=ROOT,
                             stdout=log, stderr=subprocess.STDOUT)
                procs.append(proc)
                return proc

            for name in ("worker-a", "worker-b"):
                start(name, worker_command(QUEUE, f"{name}-{os.getpid()}@%h"))
            urls = []
            for name in ("api-a", "api-b"):
                port = free_port()
                start(name, api_command("127.0.0.1", port))
                urls.append(f"http://127.0.0.1:{port}")
            for url in urls:
                wait_http(f"{url}/livez", procs, 120)
            yield urls, root
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        redis_server.stop()
        for log in logs:
            log.close()


@contextlib.contextmanager
def clients(urls: list[str]) -> Iterator[list[httpx.Client]]:
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(httpx.Client(base_url=u, headers=headers, timeout=60))
               for u in urls]


def predict(client: httpx.Client, ref: str, image: bytes) -> httpx.Response:
    return client.post("/predict", data={"model_id": ref},
                       files=[("files", ("x.png", image, "image/png"))])


def test_replicas_share_datasets_models_and_names_through_the_bucket(replicas):
    urls, root = replicas
    samples = make_samples(12, seed=4)
    with clients(urls) as (a, b):
        for client in (a, b):
            assert client.get("/readyz").json()["checks"]["artifacts"] is True
        r = upload(a, folder_zip(samples))
        assert r.status_code == 201, r.text
        dataset = r.json()
        # The other replica lists it and serves its images (fetched, hash-checked).
        assert dataset["id"] in [d["id"] for d in b.get("/datasets").json()["items"]]
        item = b.get(f"/datasets/{dataset['id']}/items", params={"limit": 1}).json()["items"][0]
        image = b.get(f"/datasets/{dataset['id']}/items/{item['id']}/image")
        assert image.status_code == 200
        assert image.content in {data for _, data in samples}
        # Bob (another tenant) sees nothing of it on either replica.
        with httpx.Client(base_url=urls[1], timeout=30,
                          headers={"Authorization": f"Bearer {KEYS['bob']}"}) as bob:
            assert bob.get(f"/datasets/{dataset['id']}").status_code == 404

        # A job asked of replica b runs on the worker (its own directory) and names
        # its model; both replicas serve the same version.
        job = submit(b, dataset["id"], method="lqf", model_name="shapes")
        done = wait_job(a, job["id"], FINAL, timeout=300)
        assert done["status"] == "succeeded", done
        query = samples[0][1]
        first, second = predict(a, "shapes", query), predict(b, "shapes", query)
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert first.json() == second.json()
        assert first.json()["model_id"] == done["model_id"]
        assert b.get("/names/shapes").json()["versions"][0]["model_id"] == done["model_id"]
        # Each process holds its own copy: written by the worker, fetched by the replicas.
        copies = [root / p / "models" / done["model_id"] / "record.json"
                  for p in ("api-a", "api-b")]
        assert all(path.is_file() for path in copies)
        assert any((root / w / "models" / done["model_id"]).is_dir()
                   for w in ("worker-a", "worker-b"))

        # Deleted on a: gone from b within LQF_REMOTE_CHECK_S, though b has just served it.
        assert predict(b, done["model_id"], query).status_code == 200
        started = time.monotonic()
        assert a.delete(f"/models/{done['model_id']}").status_code == 204
        while predict(b, done["model_id"], query).status_code != 404:
            assert time.monotonic() - started < REMOTE_CHECK_S + 1.0, "b still serves it"
            time.sleep(0.1)
        assert b.get(f"/models/{done['model_id']}").status_code == 404
        assert not copies[1].exists()  # b dropped its copy



def test_a_job_on_two_workers_shares_one_fit_between_them(replicas):
    """Rank 0 is the job's worker; rank 1 is a task the other worker takes, loading its
    half of the items from the bucket into its own directory."""
    urls, root = replicas
    samples = make_samples(10, seed=6)
    hyper = {"image_size": 32, "val_fraction": 0.2}
    with clients(urls) as (a, b):
        dataset = upload(a, folder_zip(samples), name="shared").json()
        one = wait_job(a, submit(a, dataset["id"], method="lqf",
                                 hyperparameters=hyper)["id"], FINAL, timeout=300)
        two = wait_job(b, submit(b, dataset["id"], method="lqf",
                                 hyperparameters={**hyper, "workers": 2})["id"], FINAL,
                       timeout=300)
        assert one["status"] == two["status"] == "succeeded", (one, two)
        assert_same_predictions(a, [one["model_id"], two["model_id"]],
                                [data for _, data in samples[:4]])
        # api-a fetched the model to serve it: its metadata says how it was fitted.
        info = read_metadata(root / "api-a" / "models" / two["model_id"])["info"]
        assert (info["workers"], info["ranks_on"]) == (2, "other workers")
        ranks = [w for w in ("worker-a", "worker-b")
                 if '"rank finished"' in (root / f"{w}.log").read_text()
                 and two["id"] in (root / f"{w}.log").read_text()]
        assert len(ranks) == 1 and ranks[0] not in two["worker"]
