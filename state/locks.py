"""Writer locks of the artifact store: a file lock on one host, a Redis lock across hosts.

With a shared POSIX directory every writer (api or worker, any host) takes `flock` on a
lock file beside what it changes. With object storage there is no shared file to lock,
so writers take a lock in the Redis every process already talks to. It expires after
`ttl_s` so that a writer that died frees it, and waiting for it is bounded too.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import redis
from redis.exceptions import LockError


class StoreBusy(RuntimeError):
    """Another writer held the lock for longer than a writer waits."""


class Locks(Protocol):
    def hold(self, name: str, path: Path) -> contextlib.AbstractContextManager[None]:
        """Hold the lock called `name` (a store-relative key); `path` is its lock file
        for the file implementation."""
        ...


class FileLocks:
    @contextlib.contextmanager
    def hold(self, name: str, path: Path) -> Iterator[None]:
        # No mkdir: locking something that was deleted fails (FileNotFoundError) instead
        # of bringing its directory back.
        with open(path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class RedisLocks:
    def __init__(self, client: redis.Redis, ttl_s: float = 900.0, wait_s: float = 60.0):
        self.client, self.ttl_s, self.wait_s = client, ttl_s, wait_s

    @contextlib.contextmanager
    def hold(self, name: str, path: Path) -> Iterator[None]:
        lock = self.client.lock(f"lqf:lock:{name}", timeout=self.ttl_s,
                                blocking_timeout=self.wait_s)
        if not lock.acquire():
            raise StoreBusy(f"{name} is being changed by another request; try again shortly")
        try:
            yield
        finally:
            with contextlib.suppress(LockError):  # expired under us: nothing left to free
                lock.release()
