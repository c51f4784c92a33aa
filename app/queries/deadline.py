"""A time bound that blocking work can poll from its thread."""

from __future__ import annotations

import threading
import time

from lqf_core.errors import Cancelled


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self._at = time.monotonic() + seconds
        self._expired = threading.Event()

    def remaining(self) -> float:
        return max(0.0, self._at - time.monotonic())

    def passed(self) -> bool:
        return self._expired.is_set() or time.monotonic() >= self._at

    def expire(self) -> None:
        """Make it pass now (the waiting side gave up)."""
        self._expired.set()

    def check(self) -> None:
        if self.passed():
            raise Cancelled(f"stopped at its deadline of {self.seconds:g} s")
