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
