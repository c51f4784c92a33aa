"""Every closed-form query answers within LQF_QUERY_TIMEOUT_S or gets a 503, and its
work is stopped; a posterior's build outlives the request that started it (503
`posterior_building` with Retry-After meanwhile).

The case that once ran for 17.5 minutes: a default job (MobileNetV2) on 150 digit
images (15 per class, 32 px), then `uncertainty=true` for one image. N*C (1,200 after
the validation split) was under the old default LQF_EXACT_QUERY_LIMIT of 2,000, so it
took the CG path, whose solves did not converge in 200 iterations at this size on the
isotropic objective of the time (bench.cg_path, docs/benchmarks.md). This test sets that
limit again. On today's default objective the solves converge, but an uncertainty query
still needs hundreds of them (its OOD reference) and an exact leave-one-out query N*C."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.launcher import LocalService

from .datagen import digits_samples, folder_zip, many_class_samples
from .helpers import FINAL, KEYS, upload, wait_job

pytestmark = pytest.mark.integration

TIMEOUT_S = 4.0
# How late a 503 may come: the deadline is polled between solver iterations and K-FAC
# batches (about 1 s each here), the answer has a grace second, and loading the model
# and starting the inference processes (seconds, more on a busy CI machine) cannot be
# interrupted. The regression it guards against took 17.5 minutes.
LATE_S = 20.0
# After the 503, the stopped work notices at its next poll: within this the API process
# must be idle (under 0.3 s of CPU in a 2 s window).
SETTLE_S = 20.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def goes_quiet(pid: int, within_s: float) -> bool:
    """True once the process uses under 0.3 s of CPU in a 2 s window, within `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(2.0)
        if cpu_seconds(pid) - before < 0.3:
            return True
    return False


@pytest.fixture(scope="module")
def exact_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    """A service with the default exact-query limit (the shared one uses K-FAC only)."""
    root = tmp_path_factory.mktemp("lqf-deadline")
    env = {"LQF_QUEUE": "lqf-deadline", "LQF_API_KEYS": f"alice:{KEYS['alice']}",
           "LQF_QUERY_TIMEOUT_S": str(TIMEOUT_S), "LQF_EXACT_QUERY_LIMIT": "2000"}
    with LocalService.running_under(root, env) as service:
        yield service


@pytest.fixture(scope="module")
def digits_model(exact_service: LocalService) -> dict[str, Any]:
    with httpx.Client(base_url=exact_service.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {KEYS['alice']}"}) as c:
        r = upload(c, folder_zip(digits_samples(15)), name="digits")
        assert r.status_code == 201, r.text
        job = c.post("/jobs", json={"dataset_id": r.json()["id"]}).json()  # all defaults
        done = wait_job(c, job["id"], FINAL, timeout=300)
        assert done["status"] == "succeeded", done
        return c.get(f"/models/{done['model_id']}").json()


def test_leverages_come_after_the_posterior_and_do_not_hold_up_uncertainty(exact_service):
    """With many classes the K-FAC leverages (C backward passes and C x C forms per item)
    cost far more than the rest of a posterior: uncertainty and first-order influence
    answer once the posterior is built, while leave-one-out queries get a 503
    `leverages_building` with progress until the second stage is done."""
    with httpx.Client(base_url=exact_service.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {KEYS['alice']}"}) as c:
        samples = many_class_samples(64, 3)
        r = upload(c, folder_zip(samples), name="many")
        assert r.status_code == 201 and len(r.json()["classes"]) == 64, r.text
        # N*C = 128 x 64 is over the service's exact limit (2,000): K-FAC answers.
        job = c.post("/jobs", json={"dataset_id": r.json()["id"], "hyperparameters": {
            "image_size": 64, "val_fraction": 0.2}}).json()
        done = wait_job(c, job["id"], FINAL, timeout=300)
        assert done["status"] == "succeeded", done
        model_id, image = done["model_id"], samples[0][1]
        num_train = c.get(f"/models/{model_id}").json()["training"]["num_train"]
        predict = {"data": {"model_id": model_id, "uncertainty": "true"},
                   "files": [("files", ("a.png", image, "image/png"))]}
        codes = []
        while True:  # the posterior's build: 503 posterior_building, then answers
            r = c.post("/predict", **predict)
            if r.status_code == 200:
                break
            codes.append(r.json()["code"])
            assert r.json()["code"] in {"posterior_building", "query_timeout"}, r.text
            assert len(codes) < 40, codes
        assert r.json()["predictions"][0]["uncertainty"]["solver"] == "kfac"
        loo = {"json": {"image": base64.b64encode(image).decode(), "variant": "exact_loo"}}
        r = c.post(f"/models/{model_id}/influence", **loo)
        assert r.status_code == 503 and r.json()["code"] == "leverages_building", r.text
        assert f" of {num_train} training items" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) > 0
        # Meanwhile uncertainty still answers (the stage yields its lock between batches).
        assert c.post("/predict", **predict).status_code == 200
        for _ in range(60):
            r = c.post(f"/models/{model_id}/influence", **loo)
            if r.status_code == 200:
                break
            # query_timeout: the leverages were done too close to this query's deadline.
            assert r.json()["code"] in {"leverages_building", "query_timeout"}, r.text
        assert r.status_code == 200 and r.json()["variant"] == "exact_loo", r.text
        assert r.json()["proponents"] or r.json()["opponents"]


def test_an_exact_query_past_its_deadline_is_a_503_and_stops(exact_service, digits_model):
    image = digits_samples(1)[0][1]
    assert exact_service.api is not None
    api = exact_service.api.pid
    with httpx.Client(base_url=exact_service.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {KEYS['alice']}"}) as c:
        queries = [
            ("/predict", {"data": {"model_id": digits_model["id"], "uncertainty": "true"},
                          "files": [("files", ("a.png", image, "image/png"))]}),
            (f"/models/{digits_model['id']}/influence",
             {"json": {"image": base64.b64encode(image).decode(), "variant": "exact_loo"}}),
        ]
        codes = []
        for path, kwargs in queries:
            while True:
                started = time.monotonic()
                r = c.post(path, **kwargs)
                elapsed = time.monotonic() - started
                assert r.status_code == 503, r.text
                assert elapsed < TIMEOUT_S + LATE_S, elapsed
                body = r.json()
                codes.append(body["code"])
                if body["code"] != "posterior_building":
                    break
                # The build outlives the request (it takes longer than 4 s here): ask again.
                assert int(r.headers["Retry-After"]) > 0 and len(codes) < 30, codes
                time.sleep(1.0)
            assert body["code"] == "query_timeout" and "LQF_QUERY_TIMEOUT_S" in body["detail"]
            # The work behind it stopped: the API process goes quiet.
            assert goes_quiet(api, SETTLE_S), "the stopped query kept computing"
        # The first request started the posterior's build (a pass over 120 images and
        # their K-FAC factors: over 4 s on these 2-core machines) and was told to retry.
        assert codes[0] == "posterior_building", codes
        # The service still answers everything else at once.
        r = c.post("/predict", data={"model_id": digits_model["id"]},
                   files=[("files", ("a.png", image, "image/png"))])
        assert r.status_code == 200 and "uncertainty" not in r.json()["predictions"][0]
        # Shut down while another model's posterior is being built: it stops cleanly.
        job = c.post("/jobs", json={"dataset_id": digits_model["dataset_id"],
                                    "seed": 1}).json()
        other = wait_job(c, job["id"], FINAL, timeout=300)
        assert other["status"] == "succeeded", other
        r = c.post("/predict", data={"model_id": other["model_id"], "uncertainty": "true"},
                   files=[("files", ("a.png", image, "image/png"))])
        assert r.status_code == 503 and r.json()["code"] == "posterior_building", r.text
    exact_service.stop()
    assert exact_service.log_dir is not None
    log = (exact_service.log_dir / "api.log").read_text(errors="replace")
    for sign in ("Exception in ASGI application", "Traceback", "Task was destroyed"):
        assert sign not in log, sign
