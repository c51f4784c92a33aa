"""Model names: jobs add versions, aliases pick one, every route accepts the name."""

from __future__ import annotations

import pytest

from .datagen import make_samples
from .helpers import FINAL, submit, wait_job

pytestmark = pytest.mark.integration


def png() -> bytes:
    return make_samples(1, seed=3)[0][1]


def predict(client, ref: str) -> dict:
    r = client.post("/predict", data={"model_id": ref},
                    files=[("files", ("a.png", png(), "image/png"))])
    assert r.status_code == 200, r.text
    return r.json()


def train_version(client, dataset_id: str, name: str) -> dict:
    job = submit(client, dataset_id, method="lqf", model_name=name)
    assert job["model_name"] == name
    done = wait_job(client, job["id"], FINAL)
    assert done["status"] == "succeeded", done
    return client.get(f"/models/{done['model_id']}").json()


def test_a_name_gains_versions_and_resolves_everywhere(alice, bob, shapes_dataset):
    ds = shapes_dataset["id"]
    first = train_version(alice, ds, "shapes")
    second = train_version(alice, ds, "shapes")
    assert (first["name"], first["version"], second["version"]) == ("shapes", 1, 2)
    entry = alice.get("/names/shapes").json()
    assert [v["model_id"] for v in entry["versions"]] == [first["id"], second["id"]]
    assert entry["aliases"] == {"latest": 2} and entry["current"] == 2
    assert "shapes" in [n["name"] for n in alice.get("/names").json()["items"]]

    # The bare name means the current version; name@v1, name@1, name@latest, the id.
    for ref, model in (("shapes", second), ("shapes@v1", first), ("shapes@1", first),
                       ("shapes@latest", second), (first["id"], first)):
        body = predict(alice, ref)
        assert body["model_id"] == model["id"] and body["model_version"] == model["model_version"]
    assert alice.get("/models/shapes@v1").json()["id"] == first["id"]

    # production pins the bare name; rollback moves it one version back.
    r = alice.put("/names/shapes/aliases/production", json={"version": 1})
    assert r.status_code == 200 and r.json()["current"] == 1
    assert predict(alice, "shapes")["model_id"] == first["id"]
    assert alice.post("/names/shapes/rollback").status_code == 409  # already at v1
    assert alice.delete("/names/shapes/aliases/production").json()["current"] == 2
    r = alice.post("/names/shapes/rollback")
    assert r.status_code == 200 and r.json()["aliases"]["production"] == 1

    # Forgetting adds a version to the same name.
    r = alice.post("/models/shapes@v2/forget", json={"item_ids": [0]})
    assert r.status_code == 202, r.text
    assert r.json()["model_name"] == "shapes"
    done = wait_job(alice, r.json()["id"], FINAL)
    assert done["status"] == "succeeded", done
    assert alice.get(f"/models/{done['model_id']}").json()["version"] == 3

    # What another tenant, or a wrong reference, gets.
    assert bob.post("/predict", data={"model_id": "shapes"},
                    files=[("files", ("a.png", png(), "image/png"))]).status_code == 404
    assert bob.get("/names/shapes").status_code == 404
    for ref in ("shapes@v9", "shapes@staging", "nosuchname"):
        r = alice.get(f"/models/{ref}")
        assert r.status_code == 404 and r.json()["code"] == "model_not_found", ref
    assert alice.put("/names/shapes/aliases/latest", json={"version": 1}).status_code == 422
    assert alice.put("/names/shapes/aliases/production", json={"version": 9}).status_code == 422
    assert alice.put("/names/nosuch/aliases/production", json={"version": 1}).status_code == 404


def test_a_bad_model_name_is_refused(alice, shapes_dataset):
    for name in ("", "-dash", "a" * 101, "has space", "mdl_" + "0" * 32):
        r = alice.post("/jobs", json={"dataset_id": shapes_dataset["id"], "model_name": name})
        assert r.status_code == 422 and r.json()["code"] == "invalid_name", (name, r.text)
