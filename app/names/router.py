"""Model names: versions and aliases (state.registry). A job with `model_name` adds a
version; `/predict`, the query routes and Label Studio accept the name itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Path

from app.deps import Artifacts, Tenant
from app.errors import ApiError, not_found
from app.names.schemas import AliasUpdate, NamePublic, VersionPublic
from app.pagination import Limit, Offset, Page, page
from state.artifacts import ArtifactStore
from state.registry import ALIAS_RE, NAME_RE, PRODUCTION, ModelName, Registry, RegistryError

router = APIRouter(prefix="/names", tags=["names"])

# The schema documents the rules; state.registry checks them (422 invalid_name / _alias).
NamePath = Annotated[str, Path(json_schema_extra={"pattern": NAME_RE.pattern})]
AliasPath = Annotated[str, Path(json_schema_extra={"pattern": ALIAS_RE.pattern})]


def public(entry: ModelName) -> NamePublic:
    try:
        current: int | None = entry.current().version
    except RegistryError:
        current = None
    return NamePublic(name=entry.name, created_at=entry.created_at,
                      versions=[VersionPublic(**vars(v)) for v in entry.versions],
                      aliases=entry.all_aliases(), current=current)


def _change(store: ArtifactStore, tenant: str, name: str,
            change: Callable[[Registry], ModelName]) -> NamePublic:
    registry = Registry(store)
    try:
        if registry.get(tenant, name) is None:
            raise not_found("name", name)
        return public(change(registry))
    except RegistryError as exc:
        raise ApiError(422, str(exc), "invalid_alias") from None


@router.get("", response_model=Page[NamePublic])
def list_names(tenant: Tenant, store: Artifacts, limit: Limit = 100,
               offset: Offset = 0) -> Page[NamePublic]:
    return page(Registry(store).list(tenant), limit, offset, public)


@router.get("/{name}", response_model=NamePublic)
def get_name(name: NamePath, tenant: Tenant, store: Artifacts) -> NamePublic:
    try:
        entry = Registry(store).get(tenant, name)
    except RegistryError:
        entry = None
    if entry is None:
        raise not_found("name", name)
    return public(entry)


@router.put("/{name}/aliases/{alias}", response_model=NamePublic)
def set_alias(name: NamePath, alias: AliasPath, body: AliasUpdate, tenant: Tenant,
              store: Artifacts) -> NamePublic:
    """Point `alias` at a version, e.g. `production` (which the bare name then means)."""
    return _change(store, tenant, name,
                   lambda r: r.set_alias(tenant, name, alias, body.version))


@router.delete("/{name}/aliases/{alias}", response_model=NamePublic)
def delete_alias(name: NamePath, alias: AliasPath, tenant: Tenant, store: Artifacts) -> NamePublic:
    return _change(store, tenant, name, lambda r: r.delete_alias(tenant, name, alias))


@router.post("/{name}/rollback", response_model=NamePublic)
def rollback(name: NamePath, tenant: Tenant, store: Artifacts) -> NamePublic:
    """Make the version before the current one current (`production` moves to it)."""
    def back(registry: Registry) -> ModelName:
        entry = registry.get(tenant, name)
        assert entry is not None
        current = entry.current().version
        earlier = [v.version for v in entry.versions if v.version < current]
        if not earlier:
            raise ApiError(409, f"{name} is at its first version {current}; nothing to roll "
                                "back to", "no_earlier_version")
        return registry.set_alias(tenant, name, PRODUCTION, earlier[-1])

    return _change(store, tenant, name, back)
