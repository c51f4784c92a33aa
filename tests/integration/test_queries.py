"""Over REST: influence, self-influence, predict with uncertainty, forget."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from .datagen import CLASSES, folder_zip, make_samples
from .helpers import FINAL, submit, upload, wait_job

pytestmark = pytest.mark.integration

NAMES = list(CLASSES)
FLIPPED = [1, 12, 23]  # one item of each class, given the next class's label


@pytest.fixture(scope="module")
def noisy(service) -> dict[str, Any]:
    """A 3x10 dataset with 3 flipped labels and an lqf model trained on all of it."""
    samples = make_samples(10, seed=7)
    for i in FLIPPED:
        label, data = samples[i]
        samples[i] = (NAMES[(NAMES.index(label) + 1) % 3], data)
    with service.client("alice") as c:
        r = upload(c, folder_zip(samples), name="noisy")
        assert r.status_code == 201, r.text
        ds = r.json()
        items = c.get(f"/datasets/{ds['id']}/items", params={"limit": 1000}).json()["items"]
        flipped = {it["id"] for it in items
                   if int(it["filename"].rsplit("_", 1)[1].split(".")[0]) in FLIPPED}
        assert len(flipped) == len(FLIPPED)
        # 30 solver iterations, not the default 10: at 10, the K-FAC leave-one-out ranking
        # of this 30-item set put only 1 of the 3 flipped items in its top 6 (session 3).
        # K-FAC self-influence is weak at scale too (docs/benchmarks.md, mislabel).
        job = submit(c, ds["id"], method="lqf",
                     hyperparameters={"image_size": 32, "val_fraction": 0.0, "max_iters": 30})
        done = wait_job(c, job["id"], FINAL)
        assert done["status"] == "succeeded", done
        return {"dataset": ds, "items": items, "flipped": flipped,
                "model": c.get(f"/models/{done['model_id']}").json()}


def png(seed: int) -> bytes:
    return make_samples(1, seed=seed)[0][1]


def test_influence_multipart_and_json(alice, noisy):
    model_id, ds = noisy["model"]["id"], noisy["dataset"]["id"]
    ids = {it["id"]: it["label"] for it in noisy["items"]}
    r = alice.post(f"/models/{model_id}/influence", data={"top_k": "3"},
                   files={"file": ("q.png", png(99), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == model_id and body["variant"] == "first_order"
    assert body["solver"] == "kfac" and body["output_class"] in NAMES
    assert 1 <= len(body["proponents"]) <= 3 and 1 <= len(body["opponents"]) <= 3
    for entry in body["proponents"] + body["opponents"]:
        assert ids[entry["item_id"]] == entry["label"]
        assert entry["image_url"] == f"/datasets/{ds}/items/{entry['item_id']}/image"
    assert all(e["score"] < 0 for e in body["proponents"])
    assert all(e["score"] > 0 for e in body["opponents"])
    scores = [e["score"] for e in body["proponents"]]
    assert scores == sorted(scores)
    image = alice.get(body["proponents"][0]["image_url"])
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"

    r = alice.post(f"/models/{model_id}/influence",
                   json={"image": base64.b64encode(png(99)).decode(), "top_k": 3,
                         "variant": "exact_loo"})
    assert r.status_code == 200, r.text
    loo = r.json()
    assert loo["variant"] == "exact_loo" and loo["output_class"] == body["output_class"]
    assert all(e["score"] < 0 for e in loo["proponents"]) and len(loo["proponents"]) <= 3


def assert_ranking(body: dict[str, Any], noisy: dict[str, Any], ids: dict[int, str]) -> None:
    """30 items ranked, 6 shown in descending order, >= 2 of the 3 flipped labels there."""
    assert body["total"] == 30 and len(body["items"]) == 6
    scores = [e["score"] for e in body["items"]]
    assert scores == sorted(scores, reverse=True)
    hits = {e["item_id"] for e in body["items"]} & noisy["flipped"]
    assert len(hits) >= 2, (body["items"], noisy["flipped"])
    for e in body["items"]:
        assert ids[e["item_id"]] == e["label"] and e["predicted_label"] in NAMES
        assert e["image_url"] == f"/datasets/{noisy['dataset']['id']}/items/{e['item_id']}/image"


def test_self_influence_by_leverage_ranks_flipped_labels_high(alice, noisy):
    model_id = noisy["model"]["id"]
    ids = {it["id"]: it["label"] for it in noisy["items"]}
    r = alice.get(f"/models/{model_id}/self-influence",
                  params={"limit": 6, "method": "leverage"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "leverage" and body["solver"] == "kfac"
    assert_ranking(body, noisy, ids)


def test_an_exact_model_serves_its_exact_leave_one_out_ranking(alice, noisy):
    # Before the forget tests, which exclude items of the dataset. solver "exact": the
    # served model is the optimum, its job stores every item's exact leave-one-out
    # output, and self-influence by leverage answers from them.
    job = submit(alice, noisy["dataset"]["id"], method="lqf",
                 hyperparameters={"image_size": 32, "solver": "exact"})
    done = wait_job(alice, job["id"], FINAL)
    assert done["status"] == "succeeded", done
    model = alice.get(f"/models/{done['model_id']}").json()
    assert model["metrics"]["loo_accuracy"] > 0 and "val_accuracy" not in model["metrics"]
    r = alice.get(f"/models/{model['id']}/self-influence",
                  params={"limit": 6, "method": "leverage"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["solver"] == "exact" and body["total"] == 30
    assert_ranking(body, noisy, {it["id"]: it["label"] for it in noisy["items"]})

def test_self_influence_by_crossfit_is_a_job_then_a_ranking(alice, bob, noisy):
    model_id = noisy["model"]["id"]
    ids = {it["id"]: it["label"] for it in noisy["items"]}
    r = alice.get(f"/models/{model_id}/self-influence", params={"limit": 6})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "self_influence" and job["parent_model_id"] == model_id
    assert r.headers["location"] == f"/jobs/{job['id']}"
    again = alice.get(f"/models/{model_id}/self-influence")
    if again.status_code == 202:  # still computing: the same job, not a second one
        assert again.json()["id"] == job["id"]
    assert bob.get(f"/jobs/{job['id']}").status_code == 404
    done = wait_job(alice, job["id"], FINAL)
    assert done["status"] == "succeeded" and done["model_id"] == model_id, done
    assert done["progress"]["fraction"] == 1.0
    r = alice.get(f"/models/{model_id}/self-influence", params={"limit": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "crossfit" and body["folds"] == 5 and body["solver"] is None
    assert_ranking(body, noisy, ids)
    # The flipped items' given label is the next class; the refitted model says otherwise.
    for e in body["items"]:
        if e["item_id"] in noisy["flipped"]:
            assert e["predicted_label"] != e["label"]


def test_a_small_default_job_comes_with_its_cross_fitted_ranking(alice, noisy):
    # Before the forget tests, which exclude items of the dataset. val_fraction unset: a
    # 30-item LQF job trains on every item and cross-fits its temperature, so the ranking
    # the self-influence job would compute is stored with the model: no job, no wait.
    job = submit(alice, noisy["dataset"]["id"], method="lqf",
                 hyperparameters={"image_size": 32, "max_iters": 30})
    done = wait_job(alice, job["id"], FINAL)
    assert done["status"] == "succeeded", done
    model = alice.get(f"/models/{done['model_id']}").json()
    assert "cv_accuracy" in model["metrics"] and "val_accuracy" not in model["metrics"]
    r = alice.get(f"/models/{model['id']}/self-influence", params={"limit": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "crossfit" and body["folds"] == 5
    assert_ranking(body, noisy, {it["id"]: it["label"] for it in noisy["items"]})


def test_predict_with_uncertainty(alice, noisy):
    model_id = noisy["model"]["id"]
    images = [png(s) for s in (101, 102)]
    r = alice.post("/predict", data={"model_id": model_id, "uncertainty": "true"},
                   files=[("files", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)])
    assert r.status_code == 200, r.text
    for p in r.json()["predictions"]:
        u = p["uncertainty"]
        assert set(u["probabilities"]) == set(NAMES) == set(u["variance"])
        assert abs(sum(u["probabilities"].values()) - 1) < 1e-6
        assert all(v >= 0 for v in u["variance"].values())
        assert 0 <= u["ood_score"] <= 1 and u["variance_ratio"] > 0
        assert u["solver"] == "kfac"
    r = alice.post("/predict", json={"model_id": model_id, "uncertainty": False,
                                     "images": [base64.b64encode(images[0]).decode()]})
    assert r.status_code == 200 and "uncertainty" not in r.json()["predictions"][0]


def test_rank_orders_a_pool_of_unlabeled_images(alice, noisy):
    model_id = noisy["model"]["id"]
    pool = [png(s) for s in range(200, 208)]
    r = alice.post(f"/models/{model_id}/rank", data={"batch_size": "3"},
                   files=[("files", (f"pool-{i}.png", d, "image/png"))
                          for i, d in enumerate(pool)])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == model_id and body["model_version"] == noisy["model"][
        "model_version"]
    assert body["strategy"] == "posterior" and body["pool_size"] == 8
    batch = body["batch"]
    assert len(batch) == 3 and len({b["index"] for b in batch}) == 3
    assert all(b["name"] == f"pool-{b['index']}.png" and 0 <= b["score"] <= 1 for b in batch)
    r = alice.post(f"/models/{model_id}/rank",
                   json={"batch_size": 3, "images": [base64.b64encode(d).decode() for d in pool]})
    assert r.status_code == 200, r.text
    assert [b["index"] for b in r.json()["batch"]] == [b["index"] for b in batch]
    r = alice.post(f"/models/{model_id}/rank",
                   json={"batch_size": 50, "images": [base64.b64encode(pool[0]).decode()]})
    assert r.status_code == 200 and [b["index"] for b in r.json()["batch"]] == [0]


def test_rank_a_dataset_is_a_job_whose_ranking_is_stored(alice, bob, noisy):
    model_id = noisy["model"]["id"]
    r = upload(alice, folder_zip(make_samples(4, seed=31)), name="pool")
    assert r.status_code == 201, r.text
    pool = r.json()
    r = alice.post(f"/models/{model_id}/rank", json={"dataset_id": pool["id"], "batch_size": 5})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "rank" and job["pool_dataset_id"] == pool["id"]
    assert job["batch_size"] == 5 and r.headers["location"] == f"/jobs/{job['id']}"
    done = wait_job(alice, job["id"], FINAL)
    assert done["status"] == "succeeded", done
    assert done["progress"]["stage"] == "features"
    url = done["ranking_url"]
    assert url == f"/models/{model_id}/rankings/{job['id']}"
    ranking = alice.get(url)
    assert ranking.status_code == 200, ranking.text
    body = ranking.json()
    pool_ids = {it["id"] for it in alice.get(f"/datasets/{pool['id']}/items").json()["items"]}
    assert body["pool_size"] == len(pool_ids) == 12 and body["strategy"] == "posterior"
    items = body["items"]
    assert len(items) == 5 and len({it["item_id"] for it in items}) == 5
    assert {it["item_id"] for it in items} <= pool_ids
    assert all(0 <= it["score"] <= 1 for it in items)
    assert items[0]["image_url"] == f"/datasets/{pool['id']}/items/{items[0]['item_id']}/image"
    assert bob.get(url).status_code == 404
    assert alice.get(f"/models/{model_id}/rankings/job_{'0' * 32}").status_code == 404
    assert alice.get(f"/models/{model_id}/rankings/..%2Fself_influence").status_code == 404
    # the model's own dataset: every item was learned from, nothing to rank
    r = alice.post(f"/models/{model_id}/rank",
                   json={"dataset_id": noisy["dataset"]["id"], "batch_size": 5})
    failed = wait_job(alice, r.json()["id"], FINAL)
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_data"
    r = bob.post(f"/models/{model_id}/rank", json={"dataset_id": pool["id"]})
    assert r.status_code == 404
    r = alice.post(f"/models/{model_id}/rank", json={"dataset_id": "ds_" + "0" * 32})
    assert r.status_code == 404 and r.json()["code"] == "dataset_not_found"
    r = alice.post(f"/models/{model_id}/rank", json={"dataset_id": pool["id"], "batch_size": 0})
    assert r.status_code == 422


def test_query_errors(alice, bob, noisy, service):
    model_id = noisy["model"]["id"]
    img = base64.b64encode(png(5)).decode()
    cases = [
        (alice.post, f"/models/{model_id}/influence", {"json": {"top_k": 3}}, 422),
        (alice.post, f"/models/{model_id}/influence", {"json": {"image": "***"}}, 422),
        (alice.post, f"/models/{model_id}/influence",
         {"json": {"image": base64.b64encode(b"not an image").decode()}}, 422),
        (alice.post, f"/models/{model_id}/influence", {"json": {"image": img, "top_k": 0}}, 422),
        (alice.post, f"/models/{model_id}/influence", {"json": {"image": img, "top_k": 101}},
         422),
        (alice.post, f"/models/{model_id}/influence",
         {"json": {"image": img, "variant": "third_order"}}, 422),
        (alice.post, f"/models/{model_id}/influence", {"data": {"top_k": "2"},
                                                        "files": {"x": ("a", b"1", "i/png")}},
         422),
        (alice.post, f"/models/{model_id}/influence",
         {"content": b"raw", "headers": {"content-type": "text/plain"}}, 415),
        (alice.post, "/models/mdl_" + "0" * 32 + "/influence", {"json": {"image": img}}, 404),
        (bob.post, f"/models/{model_id}/influence", {"json": {"image": img}}, 404),
        (bob.get, f"/models/{model_id}/self-influence", {}, 404),
        (alice.get, f"/models/{model_id}/self-influence", {"params": {"limit": 0}}, 422),
        (alice.get, f"/models/{model_id}/self-influence", {"params": {"method": "vibes"}},
         422),
        (bob.post, f"/models/{model_id}/forget", {"json": {"item_ids": [0]}}, 404),
        (alice.post, f"/models/{model_id}/forget", {"json": {"item_ids": []}}, 422),
        (alice.post, f"/models/{model_id}/forget", {"json": {"item_ids": [0, 99999]}}, 422),
        (alice.post, "/predict", {"json": {"model_id": model_id, "images": [img],
                                           "uncertainty": "maybe"}}, 422),
        (alice.post, f"/models/{model_id}/rank", {"json": {"images": [img], "batch_size": 0}},
         422),
        (alice.post, f"/models/{model_id}/rank", {"json": {"images": []}}, 422),
        (alice.post, f"/models/{model_id}/rank", {"json": {"images": [img] * 65}}, 413),
        (bob.post, f"/models/{model_id}/rank", {"json": {"images": [img]}}, 404),
    ]
    for call, path, kwargs, status in cases:
        r = call(path, **kwargs)
        assert r.status_code == status, (path, kwargs, r.text)
        assert "code" in r.json() and "Traceback" not in r.text
    r = alice.post(f"/models/{model_id}/forget", json={"item_ids": [0, 99999]})
    assert "99999" in r.text and "'0'" not in r.json()["detail"]
    # /predict's field name on /influence: the answer says which field to use
    r = alice.post(f"/models/{model_id}/influence", files={"files": ("a.png", png(5))})
    assert r.status_code == 422 and "'file', not 'files'" in r.json()["detail"]


def test_queries_refuse_other_methods(alice, shapes_dataset):
    job = submit(alice, shapes_dataset["id"], method="linear_probe")
    done = wait_job(alice, job["id"], FINAL)
    assert done["status"] == "succeeded", done
    model_id = done["model_id"]
    img = base64.b64encode(png(3)).decode()
    r = alice.post(f"/models/{model_id}/influence", json={"image": img})
    assert r.status_code == 422 and r.json()["code"] == "not_lqf"
    r = alice.post("/predict", json={"model_id": model_id, "images": [img],
                                     "uncertainty": True})
    assert r.status_code == 422 and r.json()["code"] == "not_lqf"
    r = alice.post(f"/models/{model_id}/rank", json={"images": [img]})
    assert r.status_code == 422 and r.json()["code"] == "not_lqf"


def test_forget_makes_a_new_version_and_excludes_items(alice, noisy):
    parent, ds = noisy["model"], noisy["dataset"]["id"]
    forgotten = sorted(noisy["flipped"])
    r = alice.post(f"/models/{parent['id']}/forget", json={"item_ids": forgotten})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["kind"] == "forget"
    assert job["parent_model_id"] == parent["id"] and job["forget_item_ids"] == forgotten
    # The dataset records the exclusion at once.
    listed = alice.get(f"/datasets/{ds}/items", params={"limit": 1000}).json()["items"]
    assert {it["id"] for it in listed if it["excluded"]} == set(forgotten)
    assert alice.get(f"/datasets/{ds}").json()["num_items"] == 30 - len(forgotten)

    done = wait_job(alice, job["id"], FINAL)
    assert done["status"] == "succeeded", done
    child = alice.get(f"/models/{done['model_id']}").json()
    assert child["parent_id"] == parent["id"]
    assert child["forgotten_item_ids"] == forgotten
    assert child["dataset_id"] == ds and child["method"] == "lqf"
    # The new version answers queries; none of its training items is a forgotten one.
    r = alice.get(f"/models/{child['id']}/self-influence",
                  params={"limit": 1000, "method": "leverage"})
    assert r.status_code == 200, r.text
    assert r.json()["total"] == 30 - len(forgotten)
    assert not {e["item_id"] for e in r.json()["items"]} & set(forgotten)

    # A fresh training job on the dataset skips the excluded items.
    fresh = submit(alice, ds, method="lqf",
                   hyperparameters={"image_size": 32, "val_fraction": 0.0})
    done = wait_job(alice, fresh["id"], FINAL)
    assert done["status"] == "succeeded", done
    r = alice.get(f"/models/{done['model_id']}/self-influence",
                  params={"limit": 1000, "method": "leverage"})
    assert r.json()["total"] == 30 - len(forgotten)
    assert not {e["item_id"] for e in r.json()["items"]} & set(forgotten)
