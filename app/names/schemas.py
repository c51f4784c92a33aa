from __future__ import annotations

from pydantic import BaseModel, Field


class VersionPublic(BaseModel):
    version: int
    model_id: str
    created_at: str
    job_id: str | None = None


class NamePublic(BaseModel):
    name: str
    created_at: str
    versions: list[VersionPublic]
    # alias -> version; `latest` is always the newest, `production` (if set) is current
    aliases: dict[str, int]
    current: int | None = Field(description="the version the bare name resolves to")


class AliasUpdate(BaseModel):
    version: int = Field(ge=1, strict=True)
