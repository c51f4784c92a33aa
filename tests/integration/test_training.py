"""Upload -> train -> predict, end to end, for every method."""

from __future__ import annotations

import json

import httpx
import pytest

from .datagen import CLASSES, folder_zip, make_samples
from .helpers import FAST_TINY, FINAL, submit, upload, wait_job

pytestmark = pytest.mark.integration


def accuracy(client: httpx.Client, model_id: str, seed: int = 123) -> float:
    samples = make_samples(8, seed=seed)  # unseen images: another seed
    files = [("files", (f"{i}.png", data, "image/png")) for i, (_, data) in enumerate(samples)]
    r = client.post("/predict", data={"model_id": model_id}, files=files)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    hits = sum(p["label"] == label for p, (label, _) in zip(predictions, samples, strict=True))
    return hits / len(samples)


def test_lqf_job_succeeds_and_predicts_above_chance(alice, lqf_model, shapes_dataset):
    assert lqf_model["method"] == "lqf"
    assert lqf_model["dataset_id"] == shapes_dataset["id"]
    assert sorted(lqf_model["classes"]) == sorted(CLASSES)
    # The record shows what trained the model, every default resolved.
    hyper = lqf_model["hyperparameters"]
    assert hyper["image_size"] == FAST_TINY["image_size"] and hyper["val_fraction"] == 0.2
    assert isinstance(hyper["suffix_blocks"], int) and hyper["regularizer"] == "kfac"
    assert hyper["tol"] is not None and hyper["max_iters"] is not None
    # ... and how the fit went: the solver's tolerance reached, the items fitted.
    fit = lqf_model["training"]
    assert fit["solver_converged"] is True and fit["relative_grad_norm"] <= hyper["tol"] * 1.5
    assert fit["solver_iterations"] >= 1 and fit["calibration"] == "holdout"
    assert fit["num_train"] + fit["num_val"] == shapes_dataset["num_items"]
    assert fit["temperature"] > 0 and "train_item_ids" not in fit
    job = alice.get(f"/jobs/{lqf_model['job_id']}").json()
    assert job["status"] == "succeeded" and job["model_id"] == lqf_model["id"]
    assert job["progress"]["fraction"] == 1.0 and job["error"] is None
    assert job["attempts"] == 1
    chance = 1 / len(CLASSES)
    assert accuracy(alice, lqf_model["id"]) >= chance + 0.4


@pytest.mark.parametrize("method, hyper", [
    ("linear_probe", {}),
    ("finetune", {"epochs": 5}),
])
def test_baseline_methods_run(alice, shapes_dataset, method, hyper):
    job = submit(alice, shapes_dataset["id"], method=method,
                 hyperparameters={**FAST_TINY, **hyper})
    assert job["status"] == "queued" and job["method"] == method
    done = wait_job(alice, job["id"], FINAL)
    assert done["status"] == "succeeded", done
    model = alice.get(f"/models/{done['model_id']}").json()
    assert model["method"] == method and model["job_id"] == job["id"]
    assert model["training"]["num_train"] > 0
    if method == "finetune":
        assert 1 <= model["training"]["epochs_run"] <= 5
    assert accuracy(alice, model["id"]) > 1 / len(CLASSES)


def test_default_backbone_is_installed_and_trains(alice, shapes_dataset):
    """No backbone given: the real ImageNet MobileNetV2, weights from the pip package."""
    r = alice.post("/jobs", json={"dataset_id": shapes_dataset["id"], "method": "linear_probe",
                                  "hyperparameters": {"image_size": 32}})
    assert r.status_code == 201, r.text
    assert r.json()["backbone"] == "mobilenet_v2"
    done = wait_job(alice, r.json()["id"], FINAL)
    assert done["status"] == "succeeded", done
    assert alice.get(f"/models/{done['model_id']}").json()["backbone"] == "mobilenet_v2"
    assert accuracy(alice, done["model_id"]) >= 1 / len(CLASSES) + 0.4


def test_events_as_json_and_as_server_sent_events(alice, lqf_model):
    job_id = lqf_model["job_id"]
    events = alice.get(f"/jobs/{job_id}/events").json()
    statuses = [e["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert any(e["type"] == "progress" for e in events)
    # A finished job's stream replays the log and ends.
    with alice.stream("GET", f"/jobs/{job_id}/events",
                      headers={"Accept": "text/event-stream"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["seq"] for e in data] == [e["seq"] for e in events]
    tail = alice.get(f"/jobs/{job_id}/events", params={"after": len(events) - 2}).json()
    assert [e["seq"] for e in tail] == [len(events) - 1]
    # Past every event, however far: nothing; beyond 2**53 a 422 (schemathesis found 500s).
    assert alice.get(f"/jobs/{job_id}/events", params={"after": 2**53 - 1}).json() == []
    assert alice.get(f"/jobs/{job_id}/events",
                     headers={"Last-Event-ID": "9" * 23}).json() == []
    r = alice.get(f"/jobs/{job_id}/events", params={"after": "9" * 23})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "after"]


def test_invalid_jobs_are_refused_before_queueing(alice, bob, shapes_dataset):
    ds = shapes_dataset["id"]
    r = alice.post("/jobs", json={"dataset_id": ds, "hyperparameters": {"max_iterz": 3}})
    assert r.status_code == 422 and "max_iterz" in r.json()["detail"]
    r = alice.post("/jobs", json={"dataset_id": ds, "hyperparameters": {"epochs": 0}})
    assert r.status_code == 422 and "epochs" in r.json()["detail"]
    r = alice.post("/jobs", json={"dataset_id": ds, "backbone": "tiny_cnn", "seed": -1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "seed"
    r = alice.post("/jobs", json={"dataset_id": ds, "hyperparameters": {"seed": 3}})
    assert r.status_code == 422 and "seed" in r.json()["detail"]
    r = alice.post("/jobs", json={"dataset_id": ds, "method": "magic"})
    assert r.status_code == 422
    r = alice.post("/jobs", json={"dataset_id": ds, "backbone": "vgg1000"})
    assert r.status_code == 422 and "vgg1000" in r.json()["detail"]
    r = alice.post("/jobs", json={"dataset_id": "ds_" + "0" * 32})
    assert r.status_code == 404
    r = bob.post("/jobs", json={"dataset_id": ds, "backbone": "tiny_cnn"})
    assert r.status_code == 404  # another tenant's dataset does not exist for bob
    r = alice.post("/jobs", json={"backbone": "tiny_cnn"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "dataset_id"


def test_idempotency_key_returns_the_same_job(alice, shapes_dataset):
    body = {"dataset_id": shapes_dataset["id"], "method": "linear_probe",
            "backbone": "tiny_cnn", "hyperparameters": FAST_TINY}
    headers = {"Idempotency-Key": "retry-me-1"}
    first = alice.post("/jobs", json=body, headers=headers)
    again = alice.post("/jobs", json=body, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = alice.post("/jobs", json={**body, "seed": 7}, headers=headers)
    assert other.status_code == 409
    wait_job(alice, first.json()["id"], FINAL)
    ids = [j["id"] for j in alice.get("/jobs", params={"limit": 1000}).json()["items"]]
    assert ids.count(first.json()["id"]) == 1


def test_list_jobs_filters_and_paginates(alice, lqf_model):
    page = alice.get("/jobs", params={"status": "succeeded", "limit": 1}).json()
    assert page["total"] >= 1 and len(page["items"]) == 1
    assert all(j["status"] == "succeeded" for j in page["items"])
    assert alice.get("/jobs", params={"status": "bogus"}).status_code == 422
    everything = alice.get("/jobs").json()
    second = alice.get("/jobs", params={"limit": 1, "offset": 1}).json()
    if everything["total"] > 1:
        assert second["items"][0]["id"] == everything["items"][1]["id"]


def test_models_listing_weights_and_delete(alice, shapes_dataset):
    job = submit(alice, shapes_dataset["id"], method="linear_probe")
    done = wait_job(alice, job["id"], FINAL)
    model_id = done["model_id"]
    assert model_id in [m["id"] for m in alice.get("/models").json()["items"]]
    weights = alice.get(f"/models/{model_id}/weights")
    assert weights.status_code == 200 and len(weights.content) > 100
    assert alice.post("/predict", data={"model_id": model_id},
                      files=[("files", ("a.png", make_samples(1, 3)[0][1], "image/png"))]
                      ).status_code == 200
    assert alice.delete(f"/models/{model_id}").status_code == 204
    assert alice.get(f"/models/{model_id}").status_code == 404
    assert alice.post("/predict", data={"model_id": model_id},
                      files=[("files", ("a.png", make_samples(1, 3)[0][1], "image/png"))]
                      ).status_code == 404


def test_dataset_upload_accepts_labels_csv_and_wrapper_folder(alice):
    r = upload(alice, folder_zip(make_samples(3, seed=9), prefix="my_export/"))
    assert r.status_code == 201, r.text
    assert r.json()["class_counts"] == dict.fromkeys(sorted(CLASSES), 3)
