"""Every route of the published schema, tried with another tenant's ids (404, nothing
changed, nothing listed) and without a key (401). Routes come from /openapi.json, so a new
route is swept as soon as it exists (and fails here until it has values for its ids)."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from .datagen import folder_zip, make_samples
from .helpers import FINAL, submit, wait_job

pytestmark = pytest.mark.integration

# Without a key by design: probes and metrics, the schema, and Label Studio's backend URL,
# whose secret is its credential (test_labelstudio_loop.py: a wrong secret is a 404).
OPEN = {"/livez", "/readyz", "/metrics"}
SECRET_PREFIX = "/ls/{secret}"


@pytest.fixture(scope="module")
def alices(service, shapes_dataset) -> dict[str, Any]:
    """One of each of alice's resources, by path parameter."""
    with service.client("alice") as c:
        job = submit(c, shapes_dataset["id"], method="lqf", model_name="sweep")
        done = wait_job(c, job["id"], FINAL)
        assert done["status"] == "succeeded", done
        conn = c.post("/label-studio/connections", json={"name": "sweep-ls"})
        assert conn.status_code == 201, conn.text
        items = c.get(f"/datasets/{shapes_dataset['id']}/items").json()["items"]
        return {"dataset_id": shapes_dataset["id"], "item_id": items[0]["id"],
                "job_id": job["id"], "model_id": done["model_id"], "name": "sweep",
                "alias": "latest", "conn_id": conn.json()["id"]}


def request_for(path: str, method: str, ids: dict[str, Any]) -> dict[str, Any]:
    """httpx.request arguments: the path with alice's ids, and a body valid enough that a
    refusal can only come from whose the ids are."""
    url = path.format(**ids)
    png = make_samples(1, seed=5)[0][1]
    image = base64.b64encode(png).decode()
    bodies: dict[tuple[str, str], dict[str, Any]] = {
        ("post", "/predict"): {"json": {"model_id": ids["model_id"], "images": [image]}},
        ("post", "/datasets/{dataset_id}/items"): {
            "files": {"file": ("more.zip", folder_zip(make_samples(1, seed=6)),
                               "application/zip")}},
        ("post", "/datasets/from-label-studio"): {"json": {"connection_id": ids["conn_id"]}},
        ("post", "/jobs"): {"json": {"dataset_id": ids["dataset_id"], "method": "lqf"}},
        ("put", "/names/{name}/aliases/{alias}"): {"json": {"version": 1}},
        ("post", "/models/{model_id}/influence"): {"json": {"image": image}},
        ("post", "/models/{model_id}/rank"): {"json": {"images": [image]}},
        ("post", "/models/{model_id}/forget"): {"json": {"item_ids": [ids["item_id"]]}},
        ("post", "/label-studio/{model_id}/setup"): {"json": {}},
        ("post", "/label-studio/{model_id}/webhook"): {"json": {"action": "PING"}},
        ("post", "/label-studio/{model_id}/predict"): {"json": {"tasks": []}},
    }
    return {"method": method.upper(), "url": url, **bodies.get((method, path), {})}


def routes(service) -> list[tuple[str, str]]:
    spec = httpx.get(f"{service.base_url}/openapi.json", timeout=30).json()
    return [(path, method) for path, ops in spec["paths"].items() for method in ops]


def excluded_items(client, dataset_id: str) -> set[int]:
    items = client.get(f"/datasets/{dataset_id}/items", params={"limit": 1000}).json()["items"]
    return {it["id"] for it in items if it.get("excluded")}


def test_another_tenants_ids_are_not_found_and_nothing_changes(service, alices, bob, alice):
    # The dataset is the session's: other tests may have excluded items from it before.
    excluded_before = excluded_items(alice, alices["dataset_id"])
    swept = 0
    for path, method in routes(service):
        if "{" not in path or path.startswith(SECRET_PREFIX):
            continue
        r = bob.request(**request_for(path, method, alices))
        assert r.status_code == 404, (method, path, r.status_code, r.text[:300])
        assert "code" in r.json()
        swept += 1
    assert swept >= 25
    # nothing of alice's was deleted, cancelled, forgotten or moved
    for url in (f"/datasets/{alices['dataset_id']}", f"/models/{alices['model_id']}",
                f"/jobs/{alices['job_id']}", f"/names/{alices['name']}",
                f"/label-studio/connections/{alices['conn_id']}"):
        assert alice.get(url).status_code == 200, url
    assert excluded_items(alice, alices["dataset_id"]) == excluded_before
    assert alice.get(f"/names/{alices['name']}").json()["current"] == 1


def test_lists_show_only_the_tenants_own(service, alices, bob):
    own = {str(v) for v in alices.values()}
    for path, method in routes(service):
        if method != "get" or "{" in path or path in OPEN:
            continue
        r = bob.get(path)
        assert r.status_code == 200, (path, r.text[:200])
        listed = {str(it.get("id", it.get("name"))) for it in r.json().get("items", [])}
        assert not listed & own, (path, listed & own)


def test_every_route_but_the_open_ones_needs_a_key(service, alices):
    with service.client(tenant="") as anonymous:
        for path, method in routes(service):
            if path in OPEN or path.startswith(SECRET_PREFIX):
                continue
            r = anonymous.request(**request_for(path, method, alices))
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
        for path in OPEN:
            assert anonymous.get(path).status_code in (200, 503), path
