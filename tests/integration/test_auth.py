"""Bearer keys, and tenants that never see each other's datasets, jobs or models."""

from __future__ import annotations

import pytest

from .datagen import folder_zip, make_samples

pytestmark = pytest.mark.integration

PROTECTED = [("GET", "/datasets"), ("POST", "/datasets"), ("GET", "/jobs"), ("POST", "/jobs"),
             ("GET", "/models"), ("POST", "/predict")]


@pytest.mark.parametrize("method, path", PROTECTED)
def test_routes_need_a_valid_key(service, method, path):
    with service.client(tenant="") as anon:
        r = anon.request(method, path)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        r = anon.request(method, path, headers={"Authorization": "Bearer wrong-key"})
        assert r.status_code == 401 and r.json()["detail"] == "invalid API key"


def test_open_routes_need_no_key(service):
    with service.client(tenant="") as anon:
        assert anon.get("/livez").status_code == 200
        assert anon.get("/readyz").status_code == 200
        assert anon.get("/metrics").status_code == 200


def test_tenants_are_isolated(alice, bob, lqf_model, shapes_dataset):
    ds, job_id, model_id = shapes_dataset["id"], lqf_model["job_id"], lqf_model["id"]
    image = make_samples(1, seed=11)[0][1]
    for path in (f"/datasets/{ds}", f"/datasets/{ds}/items", f"/datasets/{ds}/items/0/image",
                 f"/jobs/{job_id}", f"/jobs/{job_id}/events", f"/models/{model_id}",
                 f"/models/{model_id}/weights"):
        assert bob.get(path).status_code == 404, path
        assert alice.get(path).status_code == 200, path
    assert bob.post(f"/jobs/{job_id}/cancel").status_code == 404
    assert bob.post("/predict", data={"model_id": model_id},
                    files=[("files", ("a.png", image, "image/png"))]).status_code == 404
    r = bob.post(f"/datasets/{ds}/items",
                 files={"file": ("x.zip", folder_zip(make_samples(1, 12)), "application/zip")})
    assert r.status_code == 404
    assert bob.delete(f"/models/{model_id}").status_code == 404
    assert bob.delete(f"/datasets/{ds}").status_code == 404
    for path in ("/datasets", "/jobs", "/models"):
        ids = [x["id"] for x in bob.get(path).json()["items"]]
        assert ds not in ids and job_id not in ids and model_id not in ids
    # Still there for its owner after bob's attempts.
    assert alice.get(f"/datasets/{ds}").status_code == 200
    assert alice.get(f"/models/{model_id}").status_code == 200
