"""Object storage (S3 or any S3-compatible server) as the durable copy of the artifact store.

A directory of the store (a dataset, a model) is a *tree* of objects under its key, and is
published by writing its files first and its marker `{key}/_tree.json` last. The marker
lists every file with its SHA-256 and size and carries the directory's summary (a
dataset's `dataset.json`, a model's `record.json`), so:
- a tree exists exactly when its marker does: a reader never sees a half-written one
  (S3 writes single objects atomically, and the marker names only files already written);
- every file is verified against the marker when it is downloaded;
- listing a tenant's datasets or models reads one object per tree.
Removal deletes the marker first, so the tree is gone at once, then the files.

Small mutable documents (model names, Label Studio connections) are single JSON objects;
their writers hold a lock (in Redis, see state/locks.py) around read-modify-write.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

MARKER = "_tree.json"
UPLOAD_THREADS = 8
CHUNK = 1 << 20


class IntegrityError(RuntimeError):
    """A downloaded file does not match the hash its tree's marker recorded."""


def file_digest(path: Path) -> tuple[str, int]:
    """(SHA-256 hex, size) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def tree_files(directory: Path) -> list[str]:
    """The files of a local tree, as '/'-separated relative paths. Names starting with '.'
    (locks, a writer's temporary files) are local and never published."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name != MARKER:
                out.append(Path(root, name).relative_to(directory).as_posix())
    return sorted(out)


@dataclass(frozen=True)
class Tree:
    """A published tree's marker: its files {path: (sha256, size)} and its summary."""

    files: dict[str, tuple[str, int]]
    summary: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tree:
        return cls({k: (v["sha256"], int(v["size"])) for k, v in data["files"].items()},
                   data.get("summary") or {})

    def to_json(self) -> dict[str, Any]:
        return {"files": {k: {"sha256": h, "size": s} for k, (h, s) in self.files.items()},
                "summary": self.summary}

    @property
    def size(self) -> int:
        return sum(s for _, s in self.files.values())


class RemoteStore:
    """A bucket and a key prefix, e.g. `s3://lqf-artifacts/prod`, through boto3."""

    def __init__(self, url: str, endpoint_url: str | None = None, timeout_s: float = 30.0):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"LQF_ARTIFACTS must look like s3://bucket/prefix, got {url!r}")
        import boto3  # only deployments with object storage need it
        from botocore.config import Config

        self.url = url
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        # Credentials and region come from the usual AWS variables or files; every call
        # has a time bound and a few retries.
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=Config(
            connect_timeout=timeout_s, read_timeout=timeout_s,
            retries={"max_attempts": 4, "mode": "standard"},
            max_pool_connections=UPLOAD_THREADS * 2))
        # /readyz asks a question of its own, answered (or not) within seconds.
        self._probe = boto3.client("s3", endpoint_url=endpoint_url, config=Config(
            connect_timeout=2, read_timeout=2, retries={"max_attempts": 1}))
        self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="s3")

    def reachable(self) -> bool:
        """Does the bucket answer (within about 4 s)?"""
        try:
            self._probe.head_bucket(Bucket=self.bucket)
            return True
        except Exception:
            return False

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (a first start against a fresh server)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            self.client.create_bucket(Bucket=self.bucket)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    # -- single objects -----------------------------------------------------------------
    def get_bytes(self, relative: str) -> bytes | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(relative))["Body"]
        except self.client.exceptions.NoSuchKey:
            return None
        try:
            return bytes(body.read())
        finally:
            body.close()

    def put_bytes(self, relative: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(relative), Body=data)

    def get_json(self, relative: str) -> Any:
        data = self.get_bytes(relative)
        return None if data is None else json.loads(data)

    def put_json(self, relative: str, data: Any) -> None:
        self.put_bytes(relative, json.dumps(data, indent=1).encode())

    def delete(self, relative: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(relative))

    def children(self, relative: str) -> list[str]:
        """The names directly under a folder key (one level, like `ls`)."""
        prefix = self.key(relative.strip("/")) + "/"
        names: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
            names += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
        return sorted(names)

    def delete_folder(self, relative: str) -> None:
        prefix = self.key(relative.strip("/")) + "/"
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    # -- trees --------------------------------------------------------------------------
    def tree(self, relative: str) -> Tree | None:
        data = self.get_json(f"{relative}/{MARKER}")
        return None if data is None else Tree.from_json(data)

    def trees(self, folder: str) -> list[Tree]:
        """The markers of every published tree directly under `folder`."""
        names = self.children(folder)
        markers = self._pool.map(lambda name: self.tree(f"{folder}/{name}"), names)
        return [tree for tree in markers if tree is not None]

    def publish_tree(self, directory: Path, relative: str, summary: dict[str, Any],
                     previous: Tree | None = None) -> Tree:
        """Upload a local tree, then its marker. Files `previous` already holds with the
        same hash are not sent again (a dataset append uploads only its new images)."""
        local = {name: file_digest(directory / name) for name in tree_files(directory)}
        sent = previous.files if previous is not None else {}
        todo = [name for name, digest in local.items() if sent.get(name) != digest]
        self._all(lambda name: self.client.upload_file(
            str(directory / name), self.bucket, self.key(f"{relative}/{name}")), todo)
        tree = Tree(local, summary)
        self.put_json(f"{relative}/{MARKER}", tree.to_json())
        # Files the tree no longer has go after the marker stopped naming them.
        self._all(lambda name: self.delete(f"{relative}/{name}"),
                  [name for name in sent if name not in local])
        return tree

    def download_tree(self, relative: str, tree: Tree, directory: Path,
                      have: Tree | None = None) -> None:
        """Download the files of `tree` into `directory` and verify each against its hash;
        files `have` lists with the same hash (already downloaded) are kept."""
        kept = have.files if have is not None else {}
        todo = [name for name, digest in tree.files.items()
                if kept.get(name) != digest or not (directory / name).is_file()]

        def fetch(name: str) -> None:
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
            self.client.download_file(self.bucket, self.key(f"{relative}/{name}"), str(partial))
            if file_digest(partial) != tree.files[name]:
                partial.unlink(missing_ok=True)
                raise IntegrityError(f"{relative}/{name} does not match the hash in its "
                                     "tree's marker: the object store holds a corrupted copy")
            os.replace(partial, target)

        self._all(fetch, todo)
        for name in tree_files(directory):  # what the tree no longer has (a deleted file)
            if name not in tree.files:
                (directory / name).unlink(missing_ok=True)

    def remove_tree(self, relative: str) -> None:
        """Marker first: from then on the tree does not exist for any reader."""
        self.delete(f"{relative}/{MARKER}")
        self.delete_folder(relative)

    def _all(self, fn: Any, names: Iterable[str]) -> None:
        # Every transfer ends before the first error is raised: a caller that cleans up
        # after a failure must not race a download still writing into its directory.
        futures = [self._pool.submit(fn, name) for name in names]
        wait(futures)
        for future in futures:
            future.result()
