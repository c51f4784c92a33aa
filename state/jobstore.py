"""Job state in Redis, shared by app (create, read, cancel) and worker (claim, progress, finish).

Every status change is one Lua script that checks the current status first, so a cancel,
a worker finishing and the sweeper can race without ever moving a job backwards.

Keys (all under `lqf:`):
    job:{id}           hash: the job record (JSON-encoded fields marked below)
    job:{id}:events    list of JSON events; an event's `seq` is its index
    job:{id}:lease     the id of the worker running it; expires unless renewed
    job:{id}:cancel    set when a user asked to stop it; the worker polls it
    jobs:active        ids of running/cancelling jobs, for the sweeper
    tenant:{t}:jobs    sorted set of a tenant's job ids by creation time
    idem:{t}:{key}     Idempotency-Key -> "job id|request fingerprint"
    stats:outcomes     hash: count of jobs per final status
    workers            sorted set: worker name -> last heartbeat (unix time)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import redis

from state.ids import new_id, utc_now

JSON_FIELDS = ("hyperparameters", "progress", "metrics", "error", "forget_item_ids")
IDEMPOTENCY_TTL_S = 24 * 3600
MAX_EVENTS = 5000


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
ACTIVE = {JobStatus.RUNNING, JobStatus.CANCELLING}


class JobKind(StrEnum):
    """What a job does; each kind has one Celery task (state.queue) and one worker module."""

    TRAIN = "train"  # train a new model on a dataset
    FORGET = "forget"  # retrain model `parent_model_id` without `forget_item_ids`
    SELF_INFLUENCE = "self_influence"  # cross-fit `parent_model_id` for mislabel scores
    # import a Label Studio project's annotations (connection `connection_id`) as a
    # dataset snapshot, train on it, add the model to the connection's name
    LABEL_STUDIO_TRAIN = "label_studio_train"
    # only the snapshot: a new dataset from connection `connection_id`'s project
    LABEL_STUDIO_IMPORT = "label_studio_import"
    # which items of dataset `pool_dataset_id` to label next under model `parent_model_id`
    RANK = "rank"


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


def _k(*parts: str) -> str:
    return "lqf:" + ":".join(parts)


# KEYS: job, events, active, stats   ARGV: id, allowed-from (JSON list), to, event, k1, v1, ...
_TRANSITION = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {0, ''} end
local allowed = false
for _, v in ipairs(cjson.decode(ARGV[2])) do if v == s then allowed = true end end
if not allowed then return {0, s} end
redis.call('HSET', KEYS[1], 'status', ARGV[3])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[3] == 'running' or ARGV[3] == 'cancelling' then
  redis.call('SADD', KEYS[3], ARGV[1])
elseif ARGV[3] ~= 'queued' then
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[4], ARGV[3], 1)
end
redis.call('RPUSH', KEYS[2], ARGV[4])
return {1, s}
"""

# KEYS: job, events, active, lease   ARGV: id, worker, ttl ms, now, event
_CLAIM = """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' then return s or '' end
if not redis.call('SET', KEYS[4], ARGV[2], 'NX', 'PX', ARGV[3]) then return 'leased' end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'started_at', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[5])
return 'ok'
"""

# KEYS: lease   ARGV: worker, ttl ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease   ARGV: worker
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobStore:
    def __init__(self, client: redis.Redis):
        # decode_responses=True is assumed: every reply is str (redis-py types say bytes | str).
        # Only this class talks to Redis: the key layout above is its business alone.
        self.r: Any = client
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(
            redis.Redis.from_url(
                url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5,
                health_check_interval=30,
            )
        )

    def ping(self) -> bool:
        return bool(self.r.ping())

    def queue_depth(self, queue: str) -> int:
        """Tasks waiting in a Celery queue. kombu keeps priority levels in sibling lists
        named queue + "\x06\x16" + level."""
        keys = [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]
        return sum(int(self.r.llen(k)) for k in keys)

    # -- create / read ----------------------------------------------------------------
    def create(
        self,
        tenant: str,
        kind: JobKind,
        fields: dict[str, Any],
        idempotency_key: str | None = None,
        fingerprint: str = "",
        admit: Callable[[], None] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Store a new queued job -> (job, created). An idempotent retry returns the old job.
        `admit` runs before a new job is stored (a limit check that may raise); a retry
        is never refused by it."""
        job_id = new_id("job")
        if idempotency_key:
            idem = _k("idem", tenant, idempotency_key)
            value = f"{job_id}|{fingerprint}"
            if not self.r.set(idem, value, nx=True, ex=IDEMPOTENCY_TTL_S):
                existing = self.r.get(idem) or ""
                old_id, _, old_fp = existing.partition("|")
                if old_fp != fingerprint:
                    raise IdempotencyConflict(idempotency_key)
                job = self.get(old_id)
                if job is not None:
                    return job, False
                # The key outlived its job record (should not happen): treat as new.
                self.r.set(idem, value, ex=IDEMPOTENCY_TTL_S)
        if admit is not None:
            try:
                admit()
            except BaseException:
                if idempotency_key:  # refused: the key may be used again
                    self.r.delete(_k("idem", tenant, idempotency_key))
                raise
        now = time.time()
        record = {
            "id": job_id,
            "tenant": tenant,
            "status": JobStatus.QUEUED.value,
            "created_at": utc_now(),
            "progress": {"step": 0, "total": 0, "fraction": 0.0, "stage": "queued"},
            "metrics": {},
            "error": None,
            "attempts": 0,
            **fields,
            "kind": kind.value,
        }
        pipe = self.r.pipeline()
        pipe.hset(_k("job", job_id), mapping=_encode(record))
        pipe.zadd(_k("tenant", tenant, "jobs"), {job_id: now})
        pipe.rpush(_k("job", job_id, "events"), _event("status", status="queued"))
        pipe.execute()
        return self.get(job_id) or record, True

    def drop_idempotency_key(self, tenant: str, idempotency_key: str) -> None:
        """Let the next create with this key make a new job (e.g. a retry after a failure)."""
        self.r.delete(_k("idem", tenant, idempotency_key))

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(_k("job", job_id))
        return _decode(raw) if raw else None

    def count_unfinished(self, tenant: str) -> int:
        """The tenant's jobs that are queued, running or cancelling."""
        pipe = self.r.pipeline()
        for job_id in self.list_ids(tenant):
            pipe.hget(_k("job", job_id), "status")
        terminal = {s.value for s in TERMINAL}
        return sum(1 for status in pipe.execute() if status is not None
                   and status not in terminal)

    def list_ids(self, tenant: str) -> list[str]:
        return list(self.r.zrevrange(_k("tenant", tenant, "jobs"), 0, -1))

    def list_jobs(
        self, tenant: str, status: str | None, limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        jobs = [j for j in (self.get(i) for i in self.list_ids(tenant)) if j is not None]
        if status:
            jobs = [j for j in jobs if j["status"] == status]
        return jobs[offset : offset + limit], len(jobs)

    def events(self, job_id: str, start: int = 0) -> list[dict[str, Any]]:
        raw = self.r.lrange(_k("job", job_id, "events"), start, -1)
        return [{"seq": start + i, **json.loads(e)} for i, e in enumerate(raw)]

    # -- transitions ------------------------------------------------------------------
    def transition(
        self,
        job_id: str,
        allowed: set[JobStatus],
        to: JobStatus,
        *,
        message: str | None = None,
        **fields: Any,
    ) -> tuple[bool, str]:
        """Move to `to` if the status is one of `allowed` -> (done, status before)."""
        if to in TERMINAL:
            fields.setdefault("finished_at", utc_now())
        event = _event("status", status=to.value, message=message, **_public_fields(fields))
        args: list[Any] = [job_id, json.dumps([s.value for s in allowed]), to.value, event]
        for key, value in _encode(fields).items():
            args += [key, value]
        done, before = self._transition(
            keys=[_k("job", job_id), _k("job", job_id, "events"), _k("jobs", "active"),
                  _k("stats", "outcomes")],
            args=args,
        )
        return bool(done), before

    def request_cancel(self, job_id: str) -> str:
        """Ask a job to stop -> the status it now has (unchanged if already final)."""
        done, before = self.transition(
            job_id, {JobStatus.QUEUED}, JobStatus.CANCELLED, message="cancelled before it started"
        )
        if done:
            return JobStatus.CANCELLED.value
        # Flag first: the worker may finish between the flag and the status change.
        self.r.set(_k("job", job_id, "cancel"), "1", ex=7 * 24 * 3600)
        done, before = self.transition(
            job_id, {JobStatus.RUNNING}, JobStatus.CANCELLING, message="cancel requested"
        )
        if done:
            return JobStatus.CANCELLING.value
        if before == JobStatus.QUEUED.value:  # a race with the claim: try again
            return self.request_cancel(job_id)
        return before

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(_k("job", job_id, "cancel")))

    # -- worker side ------------------------------------------------------------------
    def claim(self, job_id: str, worker: str, lease_ttl_s: float) -> str:
        """queued -> running under a lease held by `worker`. 'ok' or why not."""
        return self._claim(
            keys=[_k("job", job_id), _k("job", job_id, "events"), _k("jobs", "active"),
                  _k("job", job_id, "lease")],
            args=[job_id, worker, int(lease_ttl_s * 1000), utc_now(),
                  _event("status", status="running", worker=worker)],
        )

    def renew_lease(self, job_id: str, worker: str, lease_ttl_s: float) -> bool:
        return bool(self._renew(keys=[_k("job", job_id, "lease")],
                                args=[worker, int(lease_ttl_s * 1000)]))

    def has_lease(self, job_id: str) -> bool:
        return bool(self.r.exists(_k("job", job_id, "lease")))

    def release_lease(self, job_id: str, worker: str) -> None:
        self._release(keys=[_k("job", job_id, "lease")], args=[worker])

    def report_progress(
        self, job_id: str, progress: dict[str, Any], metrics: dict[str, float], event: bool
    ) -> None:
        pipe = self.r.pipeline()
        mapping = {"progress": json.dumps(progress)}
        if metrics:
            mapping["metrics"] = json.dumps(metrics)
        pipe.hset(_k("job", job_id), mapping=mapping)
        if event:
            pipe.rpush(_k("job", job_id, "events"),
                       _event("progress", progress=progress, metrics=metrics or None))
            pipe.ltrim(_k("job", job_id, "events"), 0, MAX_EVENTS - 1)
        pipe.execute()

    def sweep_lost(self) -> list[str]:
        """Fail every running job whose worker stopped renewing its lease (died)."""
        swept = []
        for job_id in self.r.smembers(_k("jobs", "active")):
            if self.r.exists(_k("job", job_id, "lease")):
                continue
            job = self.get(job_id)
            if job is None or job["status"] not in {s.value for s in ACTIVE}:
                self.r.srem(_k("jobs", "active"), job_id)
                continue
            if job["status"] == JobStatus.CANCELLING.value:
                done, _ = self.transition(
                    job_id, {JobStatus.CANCELLING}, JobStatus.CANCELLED,
                    message="cancelled; its worker stopped before acknowledging",
                )
            else:
                step = (job.get("progress") or {}).get("step", 0)
                message = (
                    f"the worker running this job ({job.get('worker', '?')}) stopped "
                    f"responding at step {step} (killed or crashed); the job was not "
                    "retried, submit it again"
                )
                done, _ = self.transition(
                    job_id, {JobStatus.RUNNING}, JobStatus.FAILED, message=message,
                    error={"code": "worker_lost", "message": message},
                )
            if done:
                swept.append(job_id)
        return swept

    # -- workers and stats --------------------------------------------------------------
    def worker_heartbeat(self, name: str) -> None:
        self.r.zadd(_k("workers"), {name: time.time()})

    def worker_gone(self, name: str) -> None:
        self.r.zrem(_k("workers"), name)

    def alive_workers(self, stale_s: float) -> list[str]:
        return list(self.r.zrangebyscore(_k("workers"), time.time() - stale_s, "+inf"))

    def outcome_counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(_k("stats", "outcomes")).items()}

    def active_count(self) -> int:
        return int(self.r.scard(_k("jobs", "active")))


def _event(kind: str, **data: Any) -> str:
    entry = {"time": utc_now(), "type": kind}
    entry.update({k: v for k, v in data.items() if v is not None})
    return json.dumps(entry)


def _public_fields(fields: dict[str, Any]) -> dict[str, Any]:
    keep = ("error", "model_id", "metrics")
    return {k: v for k, v in fields.items() if k in keep}


def _encode(record: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in record.items():
        if key in JSON_FIELDS:
            out[key] = json.dumps(value)
        elif value is None:
            out[key] = ""
        else:
            out[key] = str(value)
    return out


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(raw)
    for key in JSON_FIELDS:
        if key in out:
            out[key] = json.loads(out[key]) if out[key] else None
    for key in ("seed", "attempts", "batch_size"):
        if out.get(key, "") != "":
            out[key] = int(out[key])
    return {k: (None if v == "" else v) for k, v in out.items()}
