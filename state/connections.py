"""Label Studio connections: a model name served to one Label Studio project.

Label Studio sends its webhooks (annotation events, "start training") without the ML
backend's credentials, so a connection is authenticated by a secret in its URL,
`/label-studio/c/<secret>`, which Label Studio copies into the webhook it creates. The
store keeps only the secret's SHA-256 (as the file name), never the secret itself; who
does not know the secret cannot learn that a connection or its name exists.

What /setup tells us (Label Studio's URL, the project, its labeling config and an access
token for its files) is kept here for the training jobs the connection starts, with the
last error Label Studio would hide from its user.

Layout: labelstudio/{sha256(secret)}.json, written atomically under a lock per file.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from state.artifacts import ArtifactStore
from state.ids import new_id, utc_now


@dataclass
class Connection:
    id: str  # public handle ("lsc_..."), for listing; not a credential
    key: str  # sha256 of the secret: the file name
    tenant: str
    name: str  # the model name it serves and trains
    created_at: str
    min_annotations: int = 1  # annotation events that start a training job
    # What its training jobs run: method, backbone, hyperparameters, seed (as POST /jobs)
    training: dict[str, Any] = field(default_factory=dict)
    label_studio_url: str | None = None  # from /setup ("hostname")
    access_token: str | None = None  # from /setup: Label Studio's token for its files
    project: int | None = None
    label_config: str | None = None
    pending_annotations: int = 0  # annotation events since the last training job started
    last_job_id: str | None = None
    last_error: str | None = None
    # The last review sent to Label Studio (mislabel scores, neighbors): version, tasks,
    # solver, seconds, when, or the error that stopped it
    last_review: dict[str, Any] | None = None
    updated_at: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Connection:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def public(self) -> dict[str, Any]:
        """Everything but the credentials."""
        out = asdict(self)
        for secret in ("key", "access_token"):
            out.pop(secret)
        out["has_access_token"] = self.access_token is not None
        return out


def version_label(name: str, version: int) -> str:
    """How Label Studio sees a version of the connection's name ("digits@v4")."""
    return f"{name}@v{version}"


def secret_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ConnectionStore:
    def __init__(self, artifacts: ArtifactStore):
        self.artifacts = artifacts
        self.root = artifacts.root / "labelstudio"

    def create(self, tenant: str, name: str, min_annotations: int,
               training: dict[str, Any]) -> tuple[Connection, str]:
        """A new connection -> (it, its secret: shown once, never stored)."""
        secret = secrets.token_urlsafe(32)
        conn = Connection(id=new_id("lsc"), key=secret_key(secret), tenant=tenant, name=name,
                          created_at=utc_now(), min_annotations=min_annotations,
                          training=training)
        self.artifacts.write_doc(self.root / f"{conn.key}.json", asdict(conn))
        return conn, secret

    def by_secret(self, secret: str) -> Connection | None:
        return self.by_key(secret_key(secret))

    def by_key(self, key: str) -> Connection | None:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            return None
        try:
            return Connection.from_json(self.artifacts.read_doc(self.root / f"{key}.json"))
        except FileNotFoundError:
            return None

    def by_id(self, tenant: str, conn_id: str) -> Connection | None:
        return next((c for c in self.list(tenant) if c.id == conn_id), None)

    def list(self, tenant: str) -> list[Connection]:
        out = [Connection.from_json(d) for d in self.artifacts.list_docs(self.root)]
        return sorted((c for c in out if c.tenant == tenant), key=lambda c: c.created_at)

    @contextlib.contextmanager
    def updating(self, key: str) -> Iterator[Connection]:
        """Read-modify-write one connection under its lock; written when the block ends."""
        path = self.root / f"{key}.json"
        with self.artifacts.doc_lock(path):
            conn = Connection.from_json(self.artifacts.read_doc(path))
            yield conn
            conn.updated_at = utc_now()
            self.artifacts.write_doc(path, asdict(conn))

    def delete(self, key: str) -> None:
        self.artifacts.delete_doc(self.root / f"{key}.json")
        (self.root / f"{key}.lock").unlink(missing_ok=True)
