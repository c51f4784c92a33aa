"""Per-tenant limits: request rate, unfinished jobs, stored bytes. Each refusal names the
limit and the setting that sets it (429, or 413 for storage); 0 turns a limit off."""

from __future__ import annotations

import math
import threading
import time

from app.config import Settings
from app.errors import ApiError
from state.artifacts import ArtifactStore
from state.jobstore import JobStore


class RateLimiter:
    """A token bucket per tenant: `rate` requests a second on average, bursts up to
    `burst`. In-process: each API process (replica) counts its own requests, so N replicas
    admit up to N times the rate."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._lock = threading.Lock()

    def admit(self, tenant: str, rate: float, burst: float) -> float:
        """0 if admitted, else the seconds until a request would be."""
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(tenant, (burst, now))
            tokens = min(burst, tokens + (now - at) * rate)
            if tokens >= 1:
                self._buckets[tenant] = (tokens - 1, now)
                return 0.0
            self._buckets[tenant] = (tokens, now)
            return (1 - tokens) / rate


RATE_LIMITER = RateLimiter()


def admit_request(tenant: str, settings: Settings) -> None:
    rate = settings.tenant_requests_per_s
    if rate <= 0:
        return
    burst = max(1.0, settings.tenant_request_burst or 2 * rate)
    wait = RATE_LIMITER.admit(tenant, rate, burst)
    if wait > 0:
        raise ApiError(429, f"tenant {tenant!r} is over its request rate of {rate:g}/s "
                            f"(bursts of {burst:g}; LQF_TENANT_REQUESTS_PER_S); retry after "
                            f"{wait:.1f} s", "rate_limited",
                       headers={"Retry-After": str(max(1, math.ceil(wait)))})


def admit_job(jobs: JobStore, settings: Settings, tenant: str) -> None:
    """Checked as a new job is stored (never for an Idempotency-Key retry). Two requests
    at the same instant may both pass: the limit can be overshot by the requests in flight."""
    limit = settings.tenant_max_unfinished_jobs
    if limit <= 0:
        return
    unfinished = jobs.count_unfinished(tenant)
    if unfinished >= limit:
        raise ApiError(429, f"tenant {tenant!r} has {unfinished} unfinished jobs, the limit "
                            f"is {limit} (LQF_TENANT_MAX_UNFINISHED_JOBS); wait for one to "
                            "finish or cancel one", "too_many_jobs",
                       headers={"Retry-After": "10"})


def admit_bytes(store: ArtifactStore, settings: Settings, tenant: str, incoming: int) -> None:
    """Refuse what would take the tenant's datasets and models past its storage limit."""
    limit = settings.tenant_max_stored_bytes
    if limit <= 0:
        return
    used = store.tenant_stored_bytes(tenant)
    if used + incoming > limit:
        raise ApiError(413, f"tenant {tenant!r} stores {used} bytes; {incoming} more would "
                            f"pass its limit of {limit} (LQF_TENANT_MAX_STORED_BYTES); delete "
                            "datasets or models first", "storage_limit")
