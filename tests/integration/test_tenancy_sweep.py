"""Every route of the published schema, tried with another tenant's ids (404, nothing
changed, nothing listed) and without a key (401). Routes come from /openapi.json, so a new
route is swept as soon as it exists (and fails here until it has values for its ids)."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from .datagen import folder_zip, make_samples
from .helpers import FINAL, submit, ui_csrf, ui_sign_in, wait_job

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


# -- the dashboard (/ui): not in the published schema, so its routers are read directly --
def dashboard_routes() -> list[tuple[str, str]]:
    from app.ui import auth_routes, data_routes, model_routes

    return [(route.path, method.lower())
            for module in (auth_routes, data_routes, model_routes)
            for route in module.router.routes for method in getattr(route, "methods", ())]


def dashboard_request(path: str, method: str, ids: dict[str, Any], csrf: str) -> dict[str, Any]:
    url = path.format(model_ref=ids["model_id"], dataset_id=ids["dataset_id"],
                      item_id=ids["item_id"], job_id=ids["job_id"])
    if method != "post":
        return {"method": "GET", "url": url}
    png = make_samples(1, seed=5)[0][1]
    data: dict[str, Any] = {"csrf_token": csrf, "item_id": str(ids["item_id"]),
                            "dataset_id": ids["dataset_id"], "method": "lqf"}
    files = {"file": ("x.png", png, "image/png")} if path.endswith("/try") else None
    return {"method": "POST", "url": url, "data": data, "files": files}


def test_the_dashboard_hides_another_tenants_things(service, alices, alice):
    excluded_before = excluded_items(alice, alices["dataset_id"])
    with httpx.Client(base_url=service.base_url, timeout=60) as bob_ui:
        assert ui_sign_in(bob_ui, "bob").status_code == 303
        csrf = ui_csrf(bob_ui)
        swept = 0
        for path, method in dashboard_routes():
            if "{" not in path:
                continue
            r = bob_ui.request(**dashboard_request(path, method, alices, csrf))
            assert r.status_code == 404, (method, path, r.status_code, r.text[:300])
            swept += 1
        assert swept >= 15
        for path in ("/ui", "/ui/datasets", "/ui/jobs", "/ui/models"):
            page = bob_ui.get(path).text
            # Ids appear in full in every link, so a leak would show one.
            assert not {alices["dataset_id"], alices["model_id"], alices["job_id"],
                        alices["name"]} & _words(page), path
    assert excluded_items(alice, alices["dataset_id"]) == excluded_before
    assert alice.get(f"/names/{alices['name']}").json()["current"] == 1


def _words(html: str) -> set[str]:
    import re

    return set(re.findall(r"[A-Za-z0-9_-]+", html))


def test_the_dashboard_without_a_session_sends_to_sign_in(service, alices):
    with httpx.Client(base_url=service.base_url, timeout=30) as anonymous:
        for path, method in dashboard_routes():
            if path == "/ui/login":
                continue
            r = anonymous.request(**dashboard_request(path, method, alices, "x"))
            assert r.status_code == 303, (method, path, r.status_code)
            assert r.headers["location"].startswith("/ui/login?next="), path
