"""Label Studio's ML-backend protocol at /label-studio/{model_id}: the calls Label Studio
makes, with the shapes it sends, over real HTTP; task images as data URIs and as files
on a stand-in Label Studio (an HTTP server here, the one part outside the project)."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator

import httpx
import pytest

from .conftest import LABEL_STUDIO_PORT, LABEL_STUDIO_TOKEN
from .datagen import make_samples
from .helpers import KEYS

pytestmark = pytest.mark.integration

CONFIG = """<View>
  <Image name="img" value="$picture"/>
  <Choices name="shape" toName="img" choice="single">
    {choices}
  </Choices>
</View>"""


def label_config(choices: list[str]) -> str:
    return CONFIG.format(choices="\n".join(f'<Choice value="{c}"/>' for c in choices))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture(scope="module")
def samples() -> list[tuple[str, bytes]]:
    return make_samples(2, seed=77)


@pytest.fixture(scope="module")
def label_studio(samples) -> Iterator[list[str]]:
    """Serves /data/upload/1/<i>.png to requests with the right token; yields the paths."""
    files = {f"/data/upload/1/{i}.png": png for i, (_, png) in enumerate(samples)}
    seen_tokens: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen_tokens.append(self.headers.get("Authorization", ""))
            if self.path == "/data/upload/1/redirect.png":  # a file that points elsewhere
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
                return
            body = files.get(self.path)
            ok = self.headers.get("Authorization") == f"Token {LABEL_STUDIO_TOKEN}"
            self.send_response(200 if body is not None and ok else 404 if ok else 401)
            self.end_headers()
            if body is not None and ok:
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", LABEL_STUDIO_PORT), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield list(files)
    server.shutdown()
    server.server_close()


def base(model: dict) -> str:
    return f"/label-studio/{model['id']}"


def test_health_and_setup_with_bearer_or_basic_auth(service, lqf_model):
    basic = httpx.BasicAuth("label-studio", KEYS["alice"])
    with httpx.Client(base_url=service.base_url, auth=basic, timeout=30) as ls:
        r = ls.get(f"{base(lqf_model)}/health")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "UP"
        assert r.json()["model_version"] == lqf_model["model_version"]
        r = ls.post(f"{base(lqf_model)}/setup",
                    json={"project": "1.1", "schema": label_config(lqf_model["classes"])})
        assert r.status_code == 200 and r.json() == {"model_version": lqf_model["model_version"]}
        r = ls.post(f"{base(lqf_model)}/setup",
                    json={"project": "1.1", "schema": label_config(["cat", "dog"])})
        assert r.status_code == 422 and "none of the model's classes" in r.json()["detail"]
        assert ls.post(f"{base(lqf_model)}/webhook",
                       json={"action": "ANNOTATION_CREATED"}).status_code == 201
    with httpx.Client(base_url=service.base_url, timeout=30) as anonymous:
        assert anonymous.get(f"{base(lqf_model)}/health").status_code == 401
        wrong = httpx.BasicAuth("label-studio", "not-a-key")
        assert anonymous.get(f"{base(lqf_model)}/health", auth=wrong).status_code == 401
    bob = httpx.BasicAuth("label-studio", KEYS["bob"])
    with httpx.Client(base_url=service.base_url, auth=bob, timeout=30) as other_tenant:
        assert other_tenant.get(f"{base(lqf_model)}/health").status_code == 404


def test_predict_answers_choices_like_predict_does(alice, lqf_model, samples, label_studio):
    pngs = [png for _, png in samples]
    tasks = [{"id": 10 + i, "data": {"picture": data_uri(png)}} for i, png in enumerate(pngs)]
    # Label Studio's own upload paths, fetched from the stand-in with its token
    tasks += [{"id": 50 + i, "data": {"picture": path}} for i, path in enumerate(label_studio)]
    r = alice.post(f"{base(lqf_model)}/predict",
                   json={"tasks": tasks, "project": "1.1",
                         "label_config": label_config(lqf_model["classes"])})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == lqf_model["model_version"]
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    plain = alice.post("/predict", data={"model_id": lqf_model["id"]}, files=files).json()
    expected = [p["label"] for p in plain["predictions"]] * 2  # the same images, twice
    assert len(body["results"]) == len(tasks)
    for result, label in zip(body["results"], expected, strict=True):
        (item,) = result["result"]
        assert item["from_name"] == "shape" and item["to_name"] == "img"
        assert item["type"] == "choices" and item["value"] == {"choices": [label]}
        assert 0 < result["score"] == item["score"] <= 1
    # above chance: the shapes' names are their true labels
    truth = [label for label, _ in samples] * 2
    assert sum(t == p for t, p in zip(truth, expected, strict=True)) > len(truth) / 2


def test_predict_keeps_to_the_projects_choices(alice, lqf_model, samples):
    only = lqf_model["classes"][:2]
    tasks = [{"id": i, "data": {"picture": data_uri(png)}} for i, (_, png) in enumerate(samples)]
    r = alice.post(f"{base(lqf_model)}/predict",
                   json={"tasks": tasks, "label_config": label_config(only)})
    assert r.status_code == 200, r.text
    assert {res["result"][0]["value"]["choices"][0] for res in r.json()["results"]} <= set(only)


@pytest.mark.parametrize("body, fragment", [
    ({"tasks": "nope", "label_config": label_config(["a"])}, "'tasks' must be a list"),
    ({"tasks": [], "label_config": "<View><Text name='t' value='$x'/></View>"},
     "no <Choices> control"),
    ({"tasks": [], "label_config": "<View"}, "not valid XML"),
    ({"tasks": [{"id": 3, "data": {}}], "label_config": label_config(["a"])},
     "task 3: data field 'picture'"),
    ({"tasks": [{"id": 4, "data": {"picture": "http://169.254.169.254/latest"}}],
      "label_config": label_config(["a"])}, "not on LQF_LABEL_STUDIO_URL"),
    ({"tasks": [{"id": 5, "data": {"picture": "data:image/png;base64,bm90IGFuIGltYWdl"}}],
      "label_config": label_config(["a"])}, "task 5"),
    # Hostile URLs: only Label Studio's own origin is fetched, and redirects are not followed.
    *[({"tasks": [{"id": 6, "data": {"picture": url}}], "label_config": label_config(["a"])},
       "not on LQF_LABEL_STUDIO_URL") for url in (
        "http://127.0.0.1:1/data/x.png", "http://[::1]/data/x.png", "file:///etc/passwd",
        "//evil.example/data/x.png", "http://localhost/latest/meta-data",
        f"http://127.0.0.1:{LABEL_STUDIO_PORT}@evil.example/x.png",
        "gopher://127.0.0.1:6379/_INFO")],
    ({"tasks": [{"id": 7, "data": {"picture": "/data/upload/1/redirect.png"}}],
      "label_config": label_config(["a"])}, "answered HTTP 302"),
])
def test_bad_predict_calls_get_a_422_naming_the_problem(alice, lqf_model, label_studio, body,
                                                       fragment):
    r = alice.post(f"{base(lqf_model)}/predict", json=body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]
