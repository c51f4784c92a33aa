"""One shape for every list response: a page of items and where it sits in the whole."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

T = TypeVar("T")
S = TypeVar("S")

Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0)]


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


def page(rows: Sequence[S], limit: int, offset: int, to_item: Callable[[S], T],
         total: int | None = None) -> Page[T]:
    """`rows` is everything (the page is cut here) unless `total` says it is already cut."""
    cut = rows if total is not None else rows[offset: offset + limit]
    return Page[T](items=[to_item(r) for r in cut],
                   total=len(rows) if total is None else total, limit=limit, offset=offset)
