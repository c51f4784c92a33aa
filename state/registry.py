"""Model names: each name has immutable, numbered versions (each a model id) and aliases.

A name is a tenant's handle on "the current model for this task" (as MLflow's registered
models): jobs can target a name, and every success adds version n + 1; prediction,
queries and Label Studio accept a name, `name@alias`, `name@<version>` or a model id.
`latest` is always the newest version; `production`, when set, is what the name means
on its own (else `latest`): rolling back moves `production` to an older version.

Layout: registry/{tenant}/{name}.json, written atomically under a per-name lock.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from state.artifacts import ArtifactStore
from state.ids import is_valid_id, utc_now

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
LATEST, PRODUCTION = "latest", "production"


class RegistryError(ValueError):
    """A name, alias or version that does not exist or is not allowed."""


@dataclass
class Version:
    version: int
    model_id: str
    created_at: str
    job_id: str | None = None


@dataclass
class ModelName:
    name: str
    tenant: str
    created_at: str
    versions: list[Version] = field(default_factory=list)
    aliases: dict[str, int] = field(default_factory=dict)  # set by users; `latest` implied

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelName:
        return cls(name=data["name"], tenant=data["tenant"], created_at=data["created_at"],
                   versions=[Version(**v) for v in data.get("versions", [])],
                   aliases={k: int(v) for k, v in data.get("aliases", {}).items()})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def version(self, number: int) -> Version:
        for v in self.versions:
            if v.version == number:
                return v
        raise RegistryError(f"{self.name} has no version {number} "
                            f"(versions: {[v.version for v in self.versions]})")

    @property
    def latest(self) -> Version | None:
        return self.versions[-1] if self.versions else None

    def all_aliases(self) -> dict[str, int]:
        latest = self.latest
        return {**self.aliases, **({LATEST: latest.version} if latest else {})}

    def current(self) -> Version:
        """What the bare name means: `production` if set, else `latest`."""
        if PRODUCTION in self.aliases:
            return self.version(self.aliases[PRODUCTION])
        if self.latest is None:
            raise RegistryError(f"{self.name} has no version yet")
        return self.latest

    def resolve(self, selector: str | None) -> Version:
        """None: current; "3" or "v3": that version; otherwise an alias."""
        if selector is None or selector == "":
            return self.current()
        digits = selector[1:] if selector[:1] == "v" else selector
        if digits.isdigit():
            return self.version(int(digits))
        aliases = self.all_aliases()
        if selector not in aliases:
            raise RegistryError(f"{self.name} has no alias {selector!r} "
                                f"(aliases: {sorted(aliases)})")
        return self.version(aliases[selector])


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or is_valid_id(name, "mdl"):
        raise RegistryError(f"model name {name!r} must be 1-100 letters, digits, '_', '.' or "
                            "'-', start with a letter or digit, and not look like a model id")
    return name


class Registry:
    def __init__(self, artifacts: ArtifactStore):
        self.artifacts = artifacts
        self.root = artifacts.root / "registry"

    def _folder(self, tenant: str) -> Path:
        # Tenants come from our own configuration (LQF_API_KEYS), but may hold any
        # character: quoted and prefixed, so always one path component ("..", too).
        return self.root / ("t_" + quote(tenant, safe=""))

    def _path(self, tenant: str, name: str) -> Path:
        return self._folder(tenant) / f"{check_name(name)}.json"

    @contextlib.contextmanager
    def _locked(self, tenant: str, name: str) -> Iterator[Path]:
        path = self._path(tenant, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.artifacts.doc_lock(path):
            yield path

    def get(self, tenant: str, name: str) -> ModelName | None:
        try:
            return ModelName.from_json(self.artifacts.read_doc(self._path(tenant, name)))
        except FileNotFoundError:
            return None

    def list(self, tenant: str) -> list[ModelName]:
        names = [ModelName.from_json(d) for d in self.artifacts.list_docs(self._folder(tenant))]
        return sorted(names, key=lambda n: n.name)

    def add_version(self, tenant: str, name: str, model_id: str,
                    job_id: str | None = None) -> int:
        """Register `model_id` as the name's next version (creating the name) -> its number."""
        with self._locked(tenant, name) as path:
            entry = self.get(tenant, name) or ModelName(name, tenant, utc_now())
            number = (entry.latest.version if entry.latest else 0) + 1
            entry.versions.append(Version(number, model_id, utc_now(), job_id))
            self.artifacts.write_doc(path, entry.to_json())
        return number

    def remove_version(self, tenant: str, name: str, model_id: str) -> None:
        """Undo `add_version` (its model was removed before its job was marked done)."""
        with self._locked(tenant, name) as path:
            entry = self.get(tenant, name)
            if entry is None:
                return
            entry.versions = [v for v in entry.versions if v.model_id != model_id]
            numbers = {v.version for v in entry.versions}
            entry.aliases = {a: n for a, n in entry.aliases.items() if n in numbers}
            self.artifacts.write_doc(path, entry.to_json())

    def set_alias(self, tenant: str, name: str, alias: str, version: int) -> ModelName:
        if alias == LATEST:
            raise RegistryError("'latest' always means the newest version; set another alias")
        if not ALIAS_RE.match(alias):
            raise RegistryError(f"alias {alias!r} must be 1-40 lower-case letters, digits, "
                                "'_' or '-', starting with a letter")
        with self._locked(tenant, name) as path:
            entry = self._existing(tenant, name)
            entry.version(version)  # must exist
            entry.aliases[alias] = version
            self.artifacts.write_doc(path, entry.to_json())
        return entry

    def delete_alias(self, tenant: str, name: str, alias: str) -> ModelName:
        with self._locked(tenant, name) as path:
            entry = self._existing(tenant, name)
            if alias not in entry.aliases:
                raise RegistryError(f"{name} has no alias {alias!r} to delete")
            del entry.aliases[alias]
            self.artifacts.write_doc(path, entry.to_json())
        return entry

    def _existing(self, tenant: str, name: str) -> ModelName:
        entry = self.get(tenant, name)
        if entry is None:
            raise LookupError(name)
        return entry
