"""Small pieces of the service that need no running processes."""

from __future__ import annotations

import logging
import shutil

from state.artifacts import ArtifactStore, write_json
from state.logs import configure_logging


def test_model_records_are_cached_but_follow_the_file(tmp_path):
    store = ArtifactStore(tmp_path).ensure()
    model_id = "mdl_" + "a" * 32
    directory = store.model_dir(model_id)
    directory.mkdir()
    assert store.model_record(model_id) is None
    write_json(directory / "record.json", {"id": model_id, "tenant": "t1"})
    first = store.model_record(model_id)
    assert first == {"id": model_id, "tenant": "t1"}
    assert store.model_record(model_id) is first  # served from the cache
    write_json(directory / "record.json", {"id": model_id, "tenant": "t2"})  # a new file
    assert store.model_record(model_id) == {"id": model_id, "tenant": "t2"}
    shutil.rmtree(directory)  # deleted, e.g. by another api replica
    assert store.model_record(model_id) is None
    assert store.model_record("not-an-id") is None


def test_log_level_also_governs_uvicorn_access_lines():
    access = logging.getLogger("uvicorn.access")
    access.setLevel(logging.INFO)  # what uvicorn does at start
    try:
        configure_logging("WARNING")
        assert not access.isEnabledFor(logging.INFO)
        configure_logging("INFO")
        assert access.isEnabledFor(logging.INFO)
    finally:
        configure_logging("INFO")


def test_an_archive_that_takes_too_long_to_store_leaves_nothing(tmp_path):
    """Past LQF_UPLOAD_PROCESS_TIMEOUT_S the upload stops between images: a 503, and
    neither a dataset nor a staging directory remains (a new one and an append alike)."""
    import io

    import pytest

    from app.config import Settings
    from app.datasets import service
    from app.errors import ApiError
    from tests.integration.datagen import folder_zip, make_samples

    store = ArtifactStore(tmp_path).ensure()
    archive = folder_zip(make_samples(4, seed=1))
    kept = service.create(store, Settings(), "t1", io.BytesIO(archive), "kept")[0]
    hurried = Settings(upload_process_timeout_s=-1.0)  # already past: stops at once
    with pytest.raises(ApiError) as refused:
        service.create(store, hurried, "t1", io.BytesIO(archive), "late")
    assert refused.value.status == 503 and refused.value.code == "upload_timeout"
    with pytest.raises(ApiError):
        service.append(store, hurried, "t1", kept["id"], io.BytesIO(archive))
    assert [m["id"] for m in store.list_dataset_metas("t1")] == [kept["id"]]
    assert len(store.manifest(kept["id"]).items) == 12  # the append added nothing
    assert not any(store.tmp.iterdir())  # no staging directory left behind
