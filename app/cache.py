"""An async LRU with a lock per key: concurrent first requests for one key load it once.

Used for loaded predictors and for LQF posteriors. Loading runs in the caller's task
(which hands blocking work to a thread pool); entries that fall out, or are evicted,
go to `on_drop` (e.g. to close a batcher).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class AsyncLRU(Generic[V]):
    def __init__(self, size: int, on_drop: Callable[[V], Awaitable[None]] | None = None):
        self.size = max(1, size)
        self._on_drop = on_drop
        self._entries: OrderedDict[str, V] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    def peek(self, key: str) -> V | None:
        return self._entries.get(key)

    async def get(self, key: str, load: Callable[[], Awaitable[V]]) -> V:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = await load()
                    self._entries[key] = entry
                    while len(self._entries) > self.size:
                        _, old = self._entries.popitem(last=False)
                        await self._drop(old)
        finally:
            # The last waiter out removes the lock; a failed load leaves nothing behind.
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]
        return entry

    def evict(self, key: str) -> V | None:
        """Forget one entry (the caller disposes of it) -> the entry, if there was one."""
        return self._entries.pop(key, None)

    async def clear(self) -> None:
        while self._entries:
            _, old = self._entries.popitem(last=False)
            await self._drop(old)

    async def _drop(self, entry: V) -> None:
        if self._on_drop is not None:
            await self._on_drop(entry)
