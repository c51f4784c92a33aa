"""The artifact store on object storage: several hosts (stores with their own local
directories) against one real S3-compatible server and one real Redis, sharing nothing
else. What the local store guarantees must hold here too: atomic publication, content
hashes verified on read, tenants kept apart, deletions seen everywhere."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.config import Settings
from app.datasets import service as datasets
from app.launcher import RedisServer
from state.artifacts import ArtifactStore, read_json, write_json
from state.ids import new_id
from state.locks import RedisLocks
from state.registry import Registry
from state.remote import MARKER, IntegrityError, RemoteStore
from tests.integration.datagen import folder_zip, make_samples
from tests.s3server import CREDENTIALS, s3_server


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(S3 endpoint URL, Redis URL), both real servers on loopback."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDENTIALS.items():
            mp.setenv(key, value)
        server = RedisServer(tmp_path_factory.mktemp("redis"), persist=False).start()
        try:
            with s3_server() as url:
                yield url, server.url
        finally:
            server.stop()


@pytest.fixture
def hosts(endpoint, tmp_path) -> list[ArtifactStore]:
    """Three hosts on one fresh bucket prefix, each with its own local directory."""
    s3_url, redis_url = endpoint
    prefix = f"s3://lqf-test/{tmp_path.name}"
    out = []
    for name in ("a", "b", "c"):
        remote = RemoteStore(prefix, endpoint_url=s3_url)
        remote.ensure_bucket()
        locks = RedisLocks(redis.Redis.from_url(redis_url), ttl_s=30, wait_s=10)
        out.append(ArtifactStore(tmp_path / name, remote, locks, remote_check_s=0.5).ensure())
    return out


def publish_model(store: ArtifactStore, tenant: str = "t1", payload: bytes = b"w" * 5000
                  ) -> str:
    model_id = new_id("mdl")
    staging = store.make_staging_dir("model")
    (staging / "model.safetensors").write_bytes(payload)
    write_json(staging / "record.json", {"id": model_id, "tenant": tenant,
                                         "created_at": time.time()})
    store.commit(staging, store.model_dir(model_id))
    return model_id


def test_a_model_published_by_one_host_is_fetched_verified_by_another(hosts):
    a, b, _ = hosts
    model_id = publish_model(a, payload=b"\x01" * 70_000)
    assert not b.model_dir(model_id).exists()
    record = b.model_record(model_id)
    assert record is not None and record["id"] == model_id
    assert (b.model_dir(model_id) / "model.safetensors").read_bytes() == b"\x01" * 70_000
    assert [r["id"] for r in b.list_model_records("t1")] == [model_id]
    # Tenants stay apart on every host.
    assert b.tenant_model("t2", model_id) is None
    assert b.list_model_records("t2") == []
    assert b.tenant_stored_bytes("t1") == a.tenant_stored_bytes("t1") > 70_000
    assert b.tenant_stored_bytes("t2") == 0


def test_a_half_published_model_does_not_exist_for_any_reader(hosts):
    """A writer that died after its files and before its marker left nothing visible."""
    a, b, _ = hosts
    model_id = new_id("mdl")
    staging = a.make_staging_dir("model")
    (staging / "model.safetensors").write_bytes(b"x" * 100)
    write_json(staging / "record.json", {"id": model_id, "tenant": "t1"})
    assert a.remote is not None
    for name in ("model.safetensors", "record.json"):  # the files, not the marker
        a.remote.put_bytes(f"models/{model_id}/{name}", (staging / name).read_bytes())
    assert b.model_record(model_id) is None
    assert b.list_model_records("t1") == []
    assert not b.model_dir(model_id).exists()


def test_a_corrupted_object_is_refused_and_leaves_no_local_copy(hosts):
    a, b, c = hosts
    model_id = publish_model(a)
    assert a.remote is not None
    a.remote.put_bytes(f"models/{model_id}/model.safetensors", b"w" * 4999 + b"!")
    with pytest.raises(IntegrityError, match="does not match the hash"):
        b.model_record(model_id)
    assert not b.model_dir(model_id).exists()
    assert list(b.tmp.iterdir()) == []  # the staging download was removed too
    # A copy already verified on its host keeps being served from there.
    assert (a.model_dir(model_id) / "model.safetensors").read_bytes() == b"w" * 5000
    del c


def test_a_deleted_model_is_gone_from_every_host_within_remote_check_s(hosts):
    a, b, _ = hosts
    model_id = publish_model(a)
    assert b.model_record(model_id) is not None  # b has fetched and serves it
    a.remove(a.model_dir(model_id))
    assert a.model_record(model_id) is None
    started = time.monotonic()
    while b.model_record(model_id) is not None:
        assert time.monotonic() - started < b.remote_check_s + 0.5
        time.sleep(0.05)
    assert time.monotonic() - started <= b.remote_check_s + 0.5
    assert not b.model_dir(model_id).exists()  # its copy was dropped
    assert a.remote is not None and a.remote.children("models") == []


def test_files_added_to_a_model_reach_other_hosts(hosts):
    a, b, _ = hosts
    model_id = publish_model(a)
    assert b.model_record(model_id) is not None
    a.write_model_json(model_id, "rankings/job_" + "1" * 32 + ".json", {"items": [1, 2]})
    # b checked the model a moment ago; a miss makes it look again.
    assert b.read_model_json(model_id, "rankings/job_" + "1" * 32 + ".json") == {
        "items": [1, 2]}
    b.delete_model_file(model_id, "rankings/job_" + "1" * 32 + ".json")
    time.sleep(b.remote_check_s)
    with pytest.raises(FileNotFoundError):
        a.read_model_json(model_id, "rankings/job_" + "1" * 32 + ".json")


def test_datasets_upload_append_and_relabel_across_hosts(hosts):
    a, b, c = hosts
    settings = Settings()
    meta, _, _ = datasets.create(a, settings, "t1",
                                 io.BytesIO(folder_zip(make_samples(3, 0))), "shapes")
    assert b.dataset_meta(meta["id"]) == meta
    assert b.tenant_dataset("t2", meta["id"]) is None
    # An append on b: b syncs under the lock, adds, publishes only the new images.
    assert b.remote is not None
    before = b.remote.tree(f"datasets/{meta['id']}")
    assert before is not None
    appended, added, _, _ = datasets.append(b, settings, "t1", meta["id"],
                                            io.BytesIO(folder_zip(make_samples(2, 5))))
    after = b.remote.tree(f"datasets/{meta['id']}")
    assert after is not None
    new_files = {f for f in after.files if after.files[f] != before.files.get(f)}
    assert new_files == {it.file for it in added} | {"manifest.json", "dataset.json"}
    assert appended["num_items"] == meta["num_items"] + len(added)
    # a and c see the new items, with their images downloaded and verified.
    paths, labels, classes, ids = c.training_items(meta["id"])
    assert len(paths) == appended["num_items"] and all(p.is_file() for p in paths)
    assert a.dataset_meta(meta["id"]) == appended
    assert len(a.manifest(meta["id"]).items) == appended["num_items"]
    for item in a.manifest(meta["id"]).items:
        assert (a.dataset_dir(meta["id"]) / item.file).read_bytes() == \
            (b.dataset_dir(meta["id"]) / item.file).read_bytes()
    # Excluding items (unlearning) on c is seen by a.
    datasets.exclude(c, meta["id"], [0], {"job_id": "job_x"})
    assert a.manifest(meta["id"]).excluded == [0]
    datasets.delete(a, "t1", meta["id"])
    assert b.dataset_meta(meta["id"]) is None and c.list_dataset_metas("t1") == []
    with pytest.raises(FileNotFoundError):
        b.manifest(meta["id"])


def test_model_names_take_versions_from_every_host_without_losing_one(hosts):
    """Writers on different hosts share no file to lock: the lock is in Redis."""
    ids = [new_id("mdl") for _ in range(12)]
    errors: list[BaseException] = []

    def add(store: ArtifactStore, model_ids: list[str]) -> None:
        try:
            for model_id in model_ids:
                Registry(store).add_version("t1", "digits", model_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(store, ids[i::3]))
               for i, store in enumerate(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entry = Registry(hosts[1]).get("t1", "digits")
    assert entry is not None
    assert sorted(v.version for v in entry.versions) == list(range(1, 13))
    assert sorted(v.model_id for v in entry.versions) == sorted(ids)
    assert [n.name for n in Registry(hosts[2]).list("t1")] == ["digits"]
    assert Registry(hosts[2]).list("t2") == []


def test_the_marker_lists_every_file_with_its_hash(hosts, tmp_path: Path):
    a = hosts[0]
    model_id = publish_model(a)
    assert a.remote is not None
    marker = a.remote.get_json(f"models/{model_id}/{MARKER}")
    assert set(marker["files"]) == {"model.safetensors", "record.json"}
    assert marker["summary"] == read_json(a.model_dir(model_id) / "record.json")
    assert marker["files"]["model.safetensors"]["size"] == 5000


def test_readiness_says_when_the_bucket_does_not_answer(hosts):
    from app.launcher import free_port

    assert hosts[0].reachable()
    gone = RemoteStore("s3://lqf-test/x", endpoint_url=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    assert not ArtifactStore(hosts[0].root, gone).reachable()
    assert time.monotonic() - started < 10
