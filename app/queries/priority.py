"""A posterior's lock, taken by queries before its background stage.

A posterior answers one computation at a time (what it computes lazily is cached
inside it). Its leverages are computed in the background, a batch of items per turn of
the lock. A plain lock is not fair: the background thread would take it straight back,
or take it while a query is waiting, and a query would wait for several batches. Here
the background takes a turn only while no query holds or waits for the lock, so a query
waits at most for the one batch already running.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

# How often a background turn that is kept waiting checks whether it should stop.
POLL_S = 0.2


class QueryFirstLock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._queries = 0  # holding the lock or waiting for it

    @contextlib.contextmanager
    def query(self) -> Iterator[None]:
        with self._changed:
            self._queries += 1
        try:
            with self._lock:
                yield
        finally:
            with self._changed:
                self._queries -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def background(self, should_stop: Callable[[], bool]) -> Iterator[None]:
        """One turn of background work, taken once no query holds or waits for the lock,
        or once `should_stop()` says so (the work then stops at its own first check)."""
        with self._changed:
            while self._queries and not should_stop():
                self._changed.wait(POLL_S)
            # With no query counted the lock is free: taking it here, before a query can
            # count itself, means no query ever waits for a turn that began after it came.
            taken = self._queries == 0 and self._lock.acquire(blocking=False)
        if not taken:  # told to stop while queries held it: wait for them like one
            self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()
