"""Dataset upload, browsing, append, delete, and every bad archive refused with nothing stored."""

from __future__ import annotations

import io
import zipfile

import httpx
import pytest

from .datagen import bomb_png, csv_zip, folder_zip, make_samples, zip_of
from .helpers import ui_sign_in, upload

pytestmark = pytest.mark.integration


def stored(service) -> tuple[list[str], list[str]]:
    """What the artifact store holds: dataset dirs and leftover staging entries."""
    datasets = sorted(p.name for p in (service.data_dir / "datasets").iterdir())
    staging = sorted(p.name for p in (service.data_dir / ".tmp").iterdir())
    return datasets, staging


def test_upload_browse_append_delete(alice, service):
    samples = make_samples(4, seed=1, classes=["red_square", "green_disc"])
    r = upload(alice, csv_zip(samples), name="csv-shapes")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert set(ds) >= {"id", "name", "num_items", "classes", "class_counts"}
    assert ds["name"] == "csv-shapes" and ds["num_items"] == 8
    assert ds["classes"] == ["green_disc", "red_square"]
    assert ds["class_counts"] == {"green_disc": 4, "red_square": 4}
    assert alice.get(f"/datasets/{ds['id']}").json()["num_items"] == 8
    assert ds["id"] in [d["id"] for d in alice.get("/datasets").json()["items"]]

    page = alice.get(f"/datasets/{ds['id']}/items", params={"limit": 3, "offset": 2}).json()
    assert page["total"] == 8 and [it["id"] for it in page["items"]] == [2, 3, 4]
    first = alice.get(f"/datasets/{ds['id']}/items", params={"limit": 1}).json()["items"][0]
    assert first == {"id": 0, "label": "red_square", "filename": "images/0000.png",
                     "excluded": False}
    image = alice.get(f"/datasets/{ds['id']}/items/0/image")
    assert image.status_code == 200 and image.content == samples[0][1]
    assert image.headers["content-type"] == "image/png"
    assert alice.get(f"/datasets/{ds['id']}/items/99/image").status_code == 404

    more = make_samples(2, seed=2, classes=["blue_bar"])
    r = alice.post(f"/datasets/{ds['id']}/items",
                   files={"file": ("more.zip", folder_zip(more), "application/zip")})
    assert r.status_code == 201, r.text
    assert [it["id"] for it in r.json()["added"]] == [8, 9]
    assert r.json()["dataset"]["class_counts"]["blue_bar"] == 2
    assert alice.get(f"/datasets/{ds['id']}").json()["num_items"] == 10
    assert alice.get(f"/datasets/{ds['id']}/items/9/image").content == more[1][1]

    assert alice.delete(f"/datasets/{ds['id']}").status_code == 204
    assert alice.get(f"/datasets/{ds['id']}").status_code == 404
    assert ds["id"] not in stored(service)[0]


def _named(samples: list[tuple[str, bytes]], names: dict[str, str]) -> list[tuple[str, bytes]]:
    return [(names[label], data) for label, data in samples]


def test_class_names_that_differ_only_in_case_are_kept_and_flagged(alice, service):
    pets = {"red_square": "cat", "green_disc": "dog", "blue_bar": "Cat"}
    first = _named(make_samples(2, seed=4, classes=["red_square", "green_disc"]), pets)
    r = upload(alice, csv_zip(first), name="pets")
    assert r.status_code == 201 and r.json()["warnings"] == []
    ds = r.json()["id"]
    more = _named(make_samples(2, seed=5, classes=["blue_bar"]), pets)
    r = alice.post(f"/datasets/{ds}/items",
                   files={"file": ("more.zip", folder_zip(more), "application/zip")})
    assert r.status_code == 201, r.text
    assert r.json()["dataset"]["classes"] == ["Cat", "cat", "dog"]  # stored as given
    [warning] = r.json()["warnings"]
    assert "'Cat' and 'cat' differ only in letter case" in warning
    with httpx.Client(base_url=service.base_url, timeout=30) as page:  # the dashboard too
        ui_sign_in(page, "alice")
        html = page.get(f"/ui/datasets/{ds}").text
        assert "&#39;Cat&#39; and &#39;cat&#39; differ only in letter case" in html
    alice.delete(f"/datasets/{ds}")


def test_nested_class_folders_label_by_parent_or_top(alice, service):
    """cats/2019/0.png: by default the image's own folder is its label, and the response
    says the top-level folders may be the classes; label_from=top reads them so."""
    images = [data for _, data in make_samples(2, seed=6)]
    nested = zip_of({f"My Photos/{pet}/{year}/{i}.png": images[i % len(images)]
                     for i, (pet, year) in enumerate((p, y) for p in ("cats", "dogs")
                                                     for y in ("2019", "2020"))})
    r = upload(alice, nested, name="by-parent")
    assert r.status_code == 201, r.text
    assert r.json()["classes"] == ["2019", "2020"]  # as labelled: each image's own folder
    [warning] = r.json()["warnings"]
    assert "'2019' under 'cats', 'dogs'" in warning and "label_from=top" in warning
    with httpx.Client(base_url=service.base_url, timeout=30) as page:  # kept for its page
        ui_sign_in(page, "alice")
        assert "label_from=top" in page.get(f"/ui/datasets/{r.json()['id']}").text
    alice.delete(f"/datasets/{r.json()['id']}")

    r = alice.post("/datasets", files={"file": ("data.zip", nested, "application/zip")},
                   data={"name": "by-top", "label_from": "top"})
    assert r.status_code == 201, r.text
    assert r.json()["class_counts"] == {"cats": 2, "dogs": 2} and r.json()["warnings"] == []
    ds = r.json()["id"]
    more = zip_of({"extra/cats/2021/a.png": images[0], "extra/birds/b.png": images[1]})
    r = alice.post(f"/datasets/{ds}/items", data={"label_from": "top"},
                   files={"file": ("more.zip", more, "application/zip")})
    assert r.status_code == 201, r.text
    assert r.json()["dataset"]["class_counts"] == {"birds": 1, "cats": 3, "dogs": 2}
    alice.delete(f"/datasets/{ds}")

    # Split folders (train/cat, test/cat) are the usual layout, not a mistake: no warning.
    splits = zip_of({f"{split}/{pet}/{i}.png": images[i % 2]
                     for i, (split, pet) in enumerate((s, p) for s in ("train", "test")
                                                      for p in ("cat", "dog"))})
    r = upload(alice, splits, name="splits")
    assert r.status_code == 201 and r.json()["classes"] == ["cat", "dog"]
    assert r.json()["warnings"] == []
    alice.delete(f"/datasets/{r.json()['id']}")

    # A labels.csv names its labels: no folder rule, no warning.
    listed = zip_of({"cats/2019/0.png": images[0], "dogs/2019/1.png": images[1],
                     "labels.csv": b"filename,label\ncats/2019/0.png,cat\ndogs/2019/1.png,dog\n"})
    r = upload(alice, listed, name="listed")
    assert r.status_code == 201 and r.json()["classes"] == ["cat", "dog"]
    assert r.json()["warnings"] == []
    alice.delete(f"/datasets/{r.json()['id']}")

    # label_from=top with an image beside the class folders, and a bad value: 422s.
    beside = zip_of({"data/cats/0.png": images[0], "data/dogs/1.png": images[1],
                     "data/stray.png": images[0]})
    before = stored(service)
    r = alice.post("/datasets", files={"file": ("data.zip", beside, "application/zip")},
                   data={"label_from": "top"})
    assert r.status_code == 422 and r.json()["code"] == "missing_label"
    assert "'data/stray.png' is beside the class folders" in r.json()["detail"]
    r = alice.post("/datasets", files={"file": ("data.zip", nested, "application/zip")},
                   data={"label_from": "grandparent"})
    assert r.status_code == 422 and "label_from" in r.text
    assert stored(service) == before


def _slip() -> bytes:
    good = make_samples(2, seed=3)
    files = {f"{label}/{i}.png": data for i, (label, data) in enumerate(good)}
    files["../../evil/x.png"] = good[0][1]
    return zip_of(files)


def _symlink() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for i, (label, data) in enumerate(make_samples(2, seed=3)):
            zf.writestr(f"{label}/{i}.png", data)
        link = zipfile.ZipInfo("red_square/link.png")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
    return out.getvalue()


def _too_many_files() -> bytes:
    return zip_of({f"red_square/{i}.png": b"x" for i in range(301)})


def _too_many_bytes() -> bytes:
    # 5 MiB of zeros compresses to a few KiB: the limit is on what it expands to.
    return zip_of({"red_square/a.png": b"\0" * (5 * 1024 * 1024), "blue_bar/b.png": b"x"})


def _with(extra: dict[str, bytes], seed: int = 4) -> bytes:
    files = {f"{label}/{i}.png": data for i, (label, data) in enumerate(make_samples(2, seed))}
    return zip_of({**files, **extra})


BAD_UPLOADS = {
    "not a zip": (lambda: b"this is plain text, not an archive", 400, "not_a_zip"),
    "zip slip": (_slip, 400, "unsafe_path"),
    "absolute path": (lambda: _with({"/tmp/abs.png": make_samples(1, 5)[0][1]}), 400,
                      "unsafe_path"),
    "symlink entry": (_symlink, 400, "unsafe_path"),
    "too many files": (_too_many_files, 413, "too_many_files"),
    "too many bytes": (_too_many_bytes, 413, "too_large_uncompressed"),
    "undecodable image": (lambda: _with({"red_square/broken.png": b"\x89PNG garbage"}), 422,
                          "invalid_data"),
    "decompression bomb": (lambda: _with({"blue_bar/bomb.png": bomb_png()}), 422,
                           "invalid_data"),
    "one class": (lambda: folder_zip(make_samples(3, 6, classes=["red_square"])), 422,
                  "too_few_classes"),
    "label with no image": (lambda: csv_zip(make_samples(2, 7), ["images/nope.png,cat"]), 422,
                            "label_without_image"),
    "image with no label": (lambda: zip_of({"labels.csv": b"filename,label\n",
                                            "a.png": make_samples(1, 8)[0][1]}), 422,
                            "image_without_label"),
    "image outside class folders": (lambda: _with({"stray.png": make_samples(1, 8)[0][1]}),
                                    422, "missing_label"),
    "no images": (lambda: zip_of({"readme.txt": b"hello"}), 422, "no_images"),
    "truncated image": (lambda: _with({"red_square/cut.png": make_samples(1, 9)[0][1][:60]}),
                        422, "invalid_data"),
    "HTML named .png": (lambda: _with({"red_square/page.png": b"<html><script>alert(1)"
                                                              b"</script></html>"}),
                        422, "invalid_data"),
    "10,000 tiny files": (lambda: zip_of({f"red_square/{i}.png": b"" for i in range(10_000)}),
                          413, "too_many_files"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_get_a_precise_4xx_and_store_nothing(alice, service, case):
    make, status, code = BAD_UPLOADS[case]
    before = stored(service)
    total = alice.get("/datasets").json()["total"]
    r = upload(alice, make())
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in r.text
    assert stored(service) == before
    assert alice.get("/datasets").json()["total"] == total


def test_polyglots_odd_names_and_wrong_content_types(alice, service):
    """What is an image is stored and served only as one; names in a zip's legacy
    encoding (cp437, no UTF-8 flag) are read as the zip standard says; a body that is not
    multipart is a 4xx."""
    png = make_samples(1, seed=10)[0][1]
    polyglot = png + b"<html><script>alert(1)</script></html>" + folder_zip(make_samples(1, 11))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for i, (label, data) in enumerate(make_samples(2, seed=12)):
            zf.writestr(f"{label}/{i}.png", data)
        zf.writestr("red_square/poly.png", polyglot)
        zf.writestr("blue_bar/cafX.png", png)
    # A legacy name: the byte 0x82 without the UTF-8 flag, which cp437 reads as "é"
    # (Python's zipfile would set the flag for a non-ASCII name, so the bytes are patched).
    archive = out.getvalue().replace(b"cafX.png", b"caf\x82.png")
    r = upload(alice, archive)
    assert r.status_code == 201, r.text
    items = alice.get(f"/datasets/{r.json()['id']}/items").json()["items"]
    names = {it["filename"]: it["id"] for it in items}
    assert "café.png" in {n.rsplit("/", 1)[-1] for n in names}
    poly = next(i for n, i in names.items() if n.endswith("poly.png"))
    image = alice.get(f"/datasets/{r.json()['id']}/items/{poly}/image")
    assert image.headers["content-type"] == "image/png"
    assert image.headers["x-content-type-options"] == "nosniff"  # never rendered as HTML
    assert alice.delete(f"/datasets/{r.json()['id']}").status_code == 204

    before = stored(service)
    for headers, content in (({"Content-Type": "application/json"}, b'{"file": "x"}'),
                             ({"Content-Type": "text/plain"}, b"hello"),
                             ({"Content-Type": "multipart/form-data; boundary=x"}, b"--x--")):
        r = alice.post("/datasets", content=content, headers=headers)
        assert 400 <= r.status_code < 500, (headers, r.status_code, r.text)
    assert stored(service) == before


def test_bad_append_leaves_dataset_unchanged(alice):
    ds = upload(alice, folder_zip(make_samples(2, seed=10))).json()
    r = alice.post(f"/datasets/{ds['id']}/items",
                   files={"file": ("x.zip", _with({"red_square/bad.png": b"nope"}), "a/zip")})
    assert r.status_code == 422
    assert alice.get(f"/datasets/{ds['id']}").json()["num_items"] == ds["num_items"]
    assert alice.get(f"/datasets/{ds['id']}/items").json()["total"] == ds["num_items"]


def test_upload_without_file_or_oversized_body(alice, service):
    r = alice.post("/datasets", data={"name": "x"})
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    big = b"\0" * (9 * 1024 * 1024)  # over LQF_MAX_UPLOAD_BYTES (8 MiB) in the tests
    r = upload(alice, big)
    assert r.status_code == 413 and r.json()["code"] == "too_large"


def test_unknown_and_malformed_ids_are_404(alice):
    assert alice.get("/datasets/ds_" + "f" * 32).status_code == 404
    assert alice.get("/datasets/../../etc").status_code == 404
    assert alice.get("/datasets/not-an-id/items").status_code == 404
    assert alice.delete("/datasets/ds_" + "f" * 32).status_code == 404
