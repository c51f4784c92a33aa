"""The labeling loop against a real Label Studio 1.23.2 (`make label-studio`, its own venv
in .venv-label-studio): a project of 100 images, connected by name before any model
exists; 30 annotations (one of them wrong) start training; the new version's review
reaches the annotated tasks (mislabel scores, neighbors) and the predict run it starts
stores predictions for every other task; "Start training" makes version 2, and its
predictions follow, with no reconnecting and no click."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.launcher import ROOT, LocalService, free_port, spawn, stop_process

from .datagen import make_samples
from .helpers import KEYS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LABEL_STUDIO = Path(os.environ.get("LQF_LABEL_STUDIO_BIN",
                                   ROOT / ".venv-label-studio" / "bin" / "label-studio"))
TOKEN = "0123456789abcdef0123456789abcdef01234567"
TASKS, ANNOTATED = 100, 30
WRONG = 7  # this annotation gives a wrong label


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not LABEL_STUDIO.is_file():
        pytest.skip(f"no Label Studio at {LABEL_STUDIO}: run `make label-studio`")
    root = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LABEL_STUDIO_USERNAME": "admin@example.com",
           "LABEL_STUDIO_PASSWORD": "adminpass123", "LABEL_STUDIO_USER_TOKEN": TOKEN,
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "ML_BLOCK_LOCAL_IP": "false",
           "SSRF_PROTECTION_ENABLED": "false", "LABEL_STUDIO_HOST": url, "SENTRY_DSN": "",
           "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false",
           "LATEST_VERSION_CHECK": "false"}
    log = open(root / "ls.log", "wb")  # noqa: SIM115
    proc = spawn([str(LABEL_STUDIO), "start", "--no-browser", "--data-dir", str(root / "data"),
                  "--internal-host", "127.0.0.1", "--port", str(port)], env,
                 stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (root / "ls.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Label Studio did not start in 180 s"
            time.sleep(1)
        # It quietly takes another port when ours is busy: make sure it is ours.
        assert f"127.0.0.1:{port}" in (root / "ls.log").read_text(errors="replace")
        yield url
    finally:
        stop_process(proc, timeout=20)
        log.close()


@pytest.fixture(scope="module")
def service(label_studio: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[LocalService]:
    root = tmp_path_factory.mktemp("lqf-for-label-studio")
    env = {"LQF_QUEUE": "lqf-ls-real", "LQF_API_KEYS": f"alice:{KEYS['alice']}",
           "LQF_LABEL_STUDIO_URL": label_studio}
    with LocalService.running_under(root, env) as svc:
        yield svc


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def test_annotations_train_and_label_studio_gets_the_new_version(label_studio, service):
    samples = make_samples(34, seed=5)[:TASKS]
    random.Random(0).shuffle(samples)
    classes = sorted({label for label, _ in samples})
    config = ('<View><Image name="image" value="$image"/><Choices name="label" '
              'toName="image">' + "".join(f'<Choice value="{c}"/>' for c in classes)
              + "</Choices></View>")
    ls = httpx.Client(base_url=label_studio, headers={"Authorization": f"Token {TOKEN}"},
                      timeout=120)
    api = httpx.Client(base_url=service.base_url, timeout=60,
                       headers={"Authorization": f"Bearer {KEYS['alice']}"})
    project = ls.post("/api/projects", json={"title": "shapes", "label_config": config}).json()
    pid = project["id"]
    r = ls.post(f"/api/projects/{pid}/import", json=[
        {"image": "data:image/png;base64," + base64.b64encode(png).decode()}
        for _, png in samples])
    assert r.status_code == 201 and r.json()["task_count"] == TASKS, r.text

    conn = api.post("/label-studio/connections", json={
        "name": "shapes-ls", "min_annotations": ANNOTATED, "backbone": "tiny_cnn",
        "hyperparameters": {"image_size": 32}}).json()
    # Connected before any model exists: Label Studio's own health and setup calls pass.
    r = ls.post("/api/ml", json={"url": service.base_url + conn["url_path"], "project": pid,
                                 "is_interactive": False, "title": "lqf"})
    assert r.status_code == 201 and r.json()["state"] == "CO", r.text
    ml_id = r.json()["id"]

    tasks = ls.get("/api/tasks", params={"project": pid, "page_size": 1000}).json()["tasks"]
    by_image = {t["data"]["image"]: t["id"] for t in tasks}
    annotated = {}
    for index, (label, png) in enumerate(samples[:ANNOTATED]):
        task_id = by_image["data:image/png;base64," + base64.b64encode(png).decode()]
        if index == WRONG:
            label = next(c for c in classes if c != label)
        annotated[task_id] = label
        r = ls.post(f"/api/tasks/{task_id}/annotations", json={
            "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                        "value": {"choices": [label]}}],
            "was_cancelled": False, "ground_truth": False, "lead_time": 1.0})
        assert r.status_code == 201, r.text
    last_annotation = time.monotonic()

    # Label Studio's annotation webhooks reached the connection: a job, then version 1,
    # then its review and predict run, with nothing to click.
    wait_for(lambda: api.get("/names/shapes-ls").status_code == 200, 120, "version 1")
    trained_s = time.monotonic() - last_annotation
    review = wait_for(lambda: api.get(f"/label-studio/connections/{conn['id']}")
                      .json()["last_review"], 120, "the review of version 1")
    refreshed_s = time.monotonic() - last_annotation
    assert review["error"] is None, review
    assert review["model_version"] == "shapes-ls@v1" and review["tasks"] == ANNOTATED

    def predictions() -> list[dict[str, Any]]:
        return ls.get("/api/predictions", params={"project": pid}).json()

    stored = predictions()
    assert Counter(p["model_version"] for p in stored) == {"shapes-ls@v1": TASKS}
    assert ls.get(f"/api/ml/{ml_id}/versions").json()["versions"] == ["shapes-ls@v1"]
    reviewed = {p["task"]: p for p in stored if p["task"] in annotated}
    assert len(reviewed) == ANNOTATED
    for task_id, p in reviewed.items():
        assert p["neighbors"] and set(p["neighbors"]) <= set(annotated) - {task_id}, p
    ranking = sorted(reviewed, key=lambda t: -reviewed[t]["mislabeling"])
    wrong_task = list(annotated)[WRONG]
    wrong_rank = ranking.index(wrong_task) + 1
    assert wrong_rank <= 3, [reviewed[t]["mislabeling"] for t in ranking]
    assert all(p["mislabeling"] == 0.0 for p in stored if p["task"] not in annotated)
    # Better than chance on the 70 tasks nobody labelled (3 classes).
    truth = {by_image["data:image/png;base64," + base64.b64encode(png).decode()]: label
             for label, png in samples[ANNOTATED:]}
    right = sum(p["result"][0]["value"]["choices"][0] == truth[p["task"]]
                for p in stored if p["task"] in truth)
    assert right / len(truth) > 0.5, right

    # The next batch to label: 20 unlabelled tasks whose scores sort them first, in pick
    # order, below every top-1 probability (>= 1/3 with 3 classes) of the other tasks.
    assert review["next_batch"] == 20 and review["unlabeled"] == TASKS - ANNOTATED, review
    unlabelled = sorted((p for p in stored if p["task"] not in annotated),
                        key=lambda p: p["score"])
    queue, rest = unlabelled[:20], unlabelled[20:]
    assert [p["score"] for p in queue] == pytest.approx([(r + 1) / (21 * 3) for r in range(20)])
    assert min(p["score"] for p in rest) >= 1 / 3 - 1e-9
    # ... and Label Studio's Data Manager, sorted by prediction score, lists them first
    # the project shows (and sorts by) the new version's predictions
    assert ls.get(f"/api/projects/{pid}").json()["model_version"] == "shapes-ls@v1"
    query = json.dumps({"ordering": ["tasks:predictions_score"]})
    listed = ls.get("/api/tasks", params={"project": pid, "query": query, "page_size": 20})
    assert listed.status_code == 200, listed.text
    tasks = listed.json()
    tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
    assert [t["id"] for t in tasks] == [p["task"] for p in queue], tasks[:3]

    # "Start training" in Label Studio: version 2, and the next run predicts every task
    # again with it (Label Studio keeps the old predictions beside the new).
    assert ls.post(f"/api/ml/{ml_id}/train").status_code == 200
    wait_for(lambda: (api.get(f"/label-studio/connections/{conn['id']}").json()
                      ["last_review"] or {}).get("model_version") == "shapes-ls@v2", 120,
             "the review of version 2")
    assert Counter(p["model_version"] for p in predictions()) == {
        "shapes-ls@v1": TASKS, "shapes-ls@v2": TASKS}
    assert ls.get(f"/api/projects/{pid}").json()["model_version"] == "shapes-ls@v2"
    status = api.get(f"/label-studio/connections/{conn['id']}").json()
    assert status["project"] == pid and status["last_job_status"] == "succeeded"
    assert status["last_error"] is None
    print(f"\n{ANNOTATED} annotations -> version 1 in {trained_s:.1f} s; its review and "
          f"predictions for {TASKS} tasks stored {refreshed_s:.1f} s after the last annotation"
          f" ({review['seconds']:.1f} s of review); the wrong label ranks {wrong_rank} of "
          f"{ANNOTATED} by mislabeling")
