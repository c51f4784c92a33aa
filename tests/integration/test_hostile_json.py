"""Hostile JSON on every route that takes a body (POST and PUT of the schema, Label
Studio's protocol routes included): deeply nested arrays and objects, not JSON at all,
and bad base64 get a 4xx, never a 5xx."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration

HOSTILE = {
    "nested arrays": b"[" * 100_000 + b"]" * 100_000,
    "nested objects": b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    "not JSON": b"\xff\xfe{",
}


def body_routes(service) -> list[tuple[str, str]]:
    spec = httpx.get(f"{service.base_url}/openapi.json", timeout=30).json()
    return [(path, method) for path, ops in spec["paths"].items() for method in ops
            if method in ("post", "put")]


def test_hostile_json_gets_a_clear_4xx_everywhere(service, alice, lqf_model):
    routes = body_routes(service)
    assert len(routes) >= 18
    ids = {"model_id": lqf_model["id"], "name": "nobody", "alias": "latest",
           "secret": "x" * 43, "dataset_id": lqf_model["dataset_id"], "job_id": "job_" + "0" * 32}
    for path, method in routes:
        url = path.format(**{k: v for k, v in ids.items() if "{" + k + "}" in path})
        for what, body in HOSTILE.items():
            r = alice.request(method.upper(), url, content=body,
                              headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (method, path, what, r.status_code, r.text[:200])
            assert "Traceback" not in r.text
            if not path.startswith("/ls/"):  # Label Studio's backend protocol, not ours
                assert "code" in r.json(), (path, what, r.text[:200])


def test_bad_base64_images_are_named(alice, lqf_model):
    model_id = lqf_model["id"]
    cases = [("/predict", {"model_id": model_id, "images": ["***"]}, "images[0]"),
             (f"/models/{model_id}/influence", {"image": "@@"}, "image"),
             (f"/models/{model_id}/rank", {"images": ["QUJD", "%%"]}, "images[1]")]
    for url, body, name in cases:
        r = alice.post(url, json=body)
        assert r.status_code == 422, (url, r.text[:200])
        assert name in r.json()["detail"] and "base64" in r.json()["detail"], r.text[:200]
