"""The labeling loop through a connection, `/ls/<secret>`, with the calls and payloads
Label Studio 1.23.2 makes (../shared/LABEL_STUDIO.md): connect before any model exists,
annotations start training, a new version reaches the next predict run without
reconnecting. Label Studio's side is a stand-in HTTP server here that serves a project
export and its uploaded files to its token (the one part outside the project)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import LABEL_STUDIO_PORT, LABEL_STUDIO_TOKEN
from .datagen import make_samples
from .helpers import FINAL, wait_job

pytestmark = pytest.mark.integration

LS_URL = f"http://127.0.0.1:{LABEL_STUDIO_PORT}"
CONFIG = """<View><Image name="img" value="$picture"/>
<Choices name="shape" toName="img">{}</Choices></View>"""


def label_config(classes: list[str]) -> str:
    return CONFIG.format("".join(f'<Choice value="{c}"/>' for c in classes))


@pytest.fixture(scope="module")
def project() -> Iterator[dict[str, Any]]:
    """Project 1: 12 annotated tasks (neutral file names), one unannotated, one whose only
    annotation was cancelled."""
    samples = make_samples(4, seed=21)
    files = {f"/data/upload/1/img_{i:05d}.png": png for i, (_, png) in enumerate(samples)}
    tasks: list[dict[str, Any]] = []
    for i, (label, _) in enumerate(samples):
        tasks.append({"id": 100 + i, "data": {"picture": f"/data/upload/1/img_{i:05d}.png"},
                      "annotations": [{"id": 500 + i, "was_cancelled": False,
                                       "updated_at": "2026-12-01T10:00:00Z",
                                       "result": [{"from_name": "shape", "to_name": "img",
                                                   "type": "choices",
                                                   "value": {"choices": [label]}}]}]})
    tasks.append({"id": 200, "data": {"picture": "/data/upload/1/img_00000.png"},
                  "annotations": []})
    tasks.append({"id": 201, "data": {"picture": "/data/upload/1/img_00001.png"},
                  "annotations": [{"id": 601, "was_cancelled": True, "result": []}]})
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            if self.headers.get("Authorization") != f"Token {LABEL_STUDIO_TOKEN}":
                self.send_response(401)
                self.end_headers()
                return
            if self.path.startswith("/api/projects/1/export"):
                body = json.dumps(tasks).encode()
            else:
                body = files.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", LABEL_STUDIO_PORT), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"tasks": tasks, "samples": samples, "requests": requests}
    server.shutdown()
    server.server_close()


def wait_for_review(client: httpx.Client, conn_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        review = client.get(f"/label-studio/connections/{conn_id}").json()["last_review"]
        if review:
            return review
        time.sleep(0.5)
    raise AssertionError("no review recorded")


def setup_body(classes: list[str], hostname: str = LS_URL) -> dict[str, Any]:
    return {"project": "1.1795762303", "schema": label_config(classes), "hostname": hostname,
            "access_token": LABEL_STUDIO_TOKEN, "extra_params": None}


def event(action: str) -> dict[str, Any]:
    return {"action": action, "project": {"id": 1, "label_config": "..."},
            "annotation": {"id": 1, "task": 100}}


def test_label_studio_trains_versions_and_refreshes_through_a_connection(
        service, alice, bob, project):
    classes = sorted({label for label, _ in project["samples"]})
    r = alice.post("/label-studio/connections",
                   json={"name": "ls-shapes", "min_annotations": 3, "backbone": "tiny_cnn",
                         "hyperparameters": {"image_size": 32}})
    assert r.status_code == 201, r.text
    conn = r.json()
    url = conn["url_path"]
    assert url.startswith("/ls/") and len(url) > 40
    # Label Studio calls without our API key: the URL's secret is the credential.
    ls = httpx.Client(base_url=service.base_url, timeout=30)

    # Connecting works before the first model: health, setup, an empty predict.
    assert ls.get(f"{url}/health").json()["model_version"] == "ls-shapes@untrained"
    r = ls.post(f"{url}/setup", json=setup_body(classes))
    assert r.status_code == 200 and r.json() == {"model_version": "ls-shapes@untrained"}
    tasks = [{"id": t["id"], "data": t["data"]} for t in project["tasks"][:4]]
    predict_body = {"tasks": tasks, "project": "1.1795762303",
                    "label_config": label_config(classes)}
    assert ls.post(f"{url}/predict", json=predict_body).json()["results"] == []

    # Annotation events: counted until min_annotations, then a training job, at once.
    answers = []
    for _ in range(3):
        started = time.monotonic()
        answers.append(ls.post(f"{url}/webhook", json=event("ANNOTATION_CREATED")))
        assert time.monotonic() - started < 1.0  # Label Studio's webhook timeout
    assert [a.status_code for a in answers] == [201, 201, 201]
    assert [a.json()["status"] for a in answers] == ["counted", "counted", "training"]
    job_id = answers[-1].json()["job_id"]
    assert ls.post(f"{url}/webhook", json=event("TASKS_CREATED")).json()["status"] == "ignored"
    done = wait_job(alice, job_id, FINAL)
    assert done["status"] == "succeeded" and done["kind"] == "label_studio_train", done
    # Its review could not be written (this stand-in answers no POST): the version stands,
    # and the connection says what went wrong.
    review = wait_for_review(alice, conn["id"])
    assert review["model_version"] is None and "HTTP 501" in review["error"], review
    model = alice.get(f"/models/{done['model_id']}").json()
    assert (model["name"], model["version"]) == ("ls-shapes", 1)
    # The snapshot: the 12 annotated tasks only, under neutral names.
    items = alice.get(f"/datasets/{model['dataset_id']}/items").json()
    assert items["total"] == 12
    assert {it["filename"] for it in items["items"]} == {f"task-{100 + i}.png"
                                                        for i in range(12)}
    assert any(p.startswith("/api/projects/1/export") for p in project["requests"])

    # The next predict run gets the new version without reconnecting.
    assert ls.post(f"{url}/setup", json=setup_body(classes)).json() == {
        "model_version": "ls-shapes@v1"}
    assert ls.get(f"{url}/versions").json() == {"versions": ["ls-shapes@v1"]}
    body = ls.post(f"{url}/predict", json=predict_body).json()
    assert body["model_version"] == "ls-shapes@v1" and len(body["results"]) == 4
    for result in body["results"]:
        assert result["model_version"] == "ls-shapes@v1"
        assert result["result"][0]["value"]["choices"][0] in classes

    # START_TRAINING (Label Studio's button) trains at once: version 2.
    r = ls.post(f"{url}/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert r.json()["status"] == "training"
    assert wait_job(alice, r.json()["job_id"], FINAL)["status"] == "succeeded"
    assert ls.get(f"{url}/versions").json()["versions"] == ["ls-shapes@v2", "ls-shapes@v1"]
    assert ls.post(f"{url}/predict", json=predict_body).json()["model_version"] == "ls-shapes@v2"

    # The snapshot says where each item came from.
    source = alice.get(f"/datasets/{model['dataset_id']}/source").json()
    assert source["project"] == 1 and source["label_studio_url"] == LS_URL
    assert sorted(e["task_id"] for e in source["items"]) == list(range(100, 112))
    assert {e["annotation_id"] for e in source["items"]} == set(range(500, 512))

    # Import without training: POST /datasets/from-label-studio, a job, a dataset.
    r = alice.post("/datasets/from-label-studio", json={"connection_id": conn["id"]})
    assert r.status_code == 202 and r.json()["kind"] == "label_studio_import", r.text
    imported = wait_job(alice, r.json()["id"], FINAL)
    assert imported["status"] == "succeeded" and imported["model_id"] is None, imported
    dataset = alice.get(f"/datasets/{imported['dataset_id']}").json()
    assert dataset["num_items"] == 12 and dataset["classes"] == classes
    assert bob.post("/datasets/from-label-studio",
                    json={"connection_id": conn["id"]}).status_code == 404

    # What Label Studio would hide stays on the connection's status.
    r = ls.post(f"{url}/setup", json=setup_body(["cat", "dog"]))
    assert r.status_code == 422
    status = alice.get(f"/label-studio/connections/{conn['id']}").json()
    assert "none of the model's classes" in status["last_error"]
    assert status["project"] == 1 and status["has_access_token"]
    assert status["last_job_status"] == "succeeded"
    assert "access_token" not in status and "key" not in status
    # Only the configured Label Studio is ever contacted.
    r = ls.post(f"{url}/setup", json=setup_body(classes, hostname="http://10.0.0.1:8080"))
    assert r.status_code == 422 and "LQF_LABEL_STUDIO_URL" in r.json()["detail"]

    # Without the secret: nothing trains, nothing is read, nothing is revealed.
    wrong = "/ls/" + "x" * 43
    for call in (lambda: ls.get(f"{wrong}/health"),
                 lambda: ls.post(f"{wrong}/webhook", json=event("ANNOTATION_CREATED")),
                 lambda: ls.post(f"{wrong}/predict", json=predict_body)):
        r = call()
        assert r.status_code == 404 and "ls-shapes" not in r.text
    assert bob.get(f"/label-studio/connections/{conn['id']}").status_code == 404
    assert bob.get("/label-studio/connections").json()["total"] == 0
    # Deleting the connection revokes its URL.
    assert alice.delete(f"/label-studio/connections/{conn['id']}").status_code == 204
    assert ls.get(f"{url}/health").status_code == 404


@pytest.mark.parametrize("body, code", [
    ({"name": "bad name"}, "invalid_name"),
    ({"name": "ok", "method": "vibes"}, "validation_error"),
    ({"name": "ok", "backbone": "alexnet9"}, "unknown_backbone"),
    ({"name": "ok", "hyperparameters": {"image_size": 3}}, "invalid_config"),
    ({"name": "ok", "min_annotations": 0}, "validation_error"),
])
def test_a_connection_that_could_never_train_is_refused(alice, body, code):
    r = alice.post("/label-studio/connections", json=body)
    assert r.status_code == 422 and r.json()["code"] == code, r.text
