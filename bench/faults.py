"""Fault injection on the real processes, N rounds each, with nothing lost counted.

    python -m bench.faults                 # 20 rounds of each fault
    python -m bench.faults --rounds 3 --faults worker redis

Faults (each round injects one at a random moment, then lets the service recover):
  worker     SIGKILL the worker mid-job, start a new one
  redis      SIGKILL redis-server mid-job (AOF on, as `make serve` runs it), restart it
             after 0.5-3 s (with the default 30 s lease; the other faults use a 3 s one)
  api-upload SIGKILL the API while a 2,000-image upload is sent or extracted, restart it
  api-predict SIGKILL the API mid-/predict (64 images), restart it
  inference  SIGKILL an inference child process of the API mid-/predict
  disk       fill the artifact store (a 64 MiB tmpfs; needs root) mid-job, then free it

After every round: each job of the round must be final (succeeded, failed or cancelled)
within 90 s -- else *stuck* --, must have entered `running` at most once -- else *run
twice* --, and the artifact store is checked whole: every listed dataset's manifest names
files that exist, every model's tensors match the content hash its metadata records --
else *lost or half-written*. Then `/readyz` must say ready (a live worker) without a
human within 60 s. Requests that failed during the fault are counted by status; they
are allowed (a killed process cannot answer) but must be a clean 503 where the API is up.
Writes docs/results/faults.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from app.launcher import RedisServer, api_command, wait_http
from bench.load import children
from bench.serve import RESULTS, Service, folder_zip, git_commit, machine
from tests.integration.datagen import make_samples

FINAL = {"succeeded", "failed", "cancelled"}
JOB = {"method": "finetune", "backbone": "tiny_cnn",
       "hyperparameters": {"image_size": 32, "epochs": 1000, "patience": 10000}}  # a few s
QUICK = {"method": "linear_probe", "backbone": "tiny_cnn", "hyperparameters": {"image_size": 32}}


def store_problems(data_dir: Path) -> list[str]:
    """Whatever a reader could find half-written or missing in the artifact store."""
    problems = []
    for ds in sorted((data_dir / "datasets").glob("ds_*")):
        try:
            json.loads((ds / "dataset.json").read_text())
            manifest = json.loads((ds / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{ds.name}: {exc!r}")
            continue
        missing = [it["file"] for it in manifest["items"] if not (ds / it["file"]).is_file()]
        if missing:
            problems.append(f"{ds.name}: {len(missing)} files missing")
    for md in sorted((data_dir / "models").glob("mdl_*")):
        if not (md / "record.json").exists():
            continue  # not published
        try:
            meta = json.loads((md / "model.json").read_text())
            digest = hashlib.sha256((md / "model.safetensors").read_bytes()).hexdigest()
        except (OSError, ValueError) as exc:
            problems.append(f"{md.name}: {exc!r}")
            continue
        if digest != meta["content_hash"]:
            problems.append(f"{md.name}: content hash mismatch")
    return problems


class Bench:
    def __init__(self, service: Service, rng: random.Random):
        self.s, self.rng = service, rng
        self.c = service.client()
        self.dataset_id = self._upload(folder_zip(make_samples(6, seed=1)))

    def _upload(self, data: bytes) -> str:
        r = self.c.post("/datasets", files={"file": ("d.zip", data, "application/zip")})
        r.raise_for_status()
        return r.json()["id"]

    def start_job(self, body: dict[str, Any] | None = None) -> str:
        r = self.c.post("/jobs", json={"dataset_id": self.dataset_id, **(body or JOB)})
        r.raise_for_status()
        return r.json()["id"]

    def wait_running(self, job_id: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if self.c.get(f"/jobs/{job_id}").json()["status"] != "queued":
                    return
            time.sleep(0.1)

    def outcome(self, job_id: str, timeout: float = 90) -> dict[str, Any]:
        deadline, job = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                job = self.c.get(f"/jobs/{job_id}").json()
                if job.get("status") in FINAL:
                    break
            time.sleep(0.3)
        events = []
        with contextlib.suppress(httpx.HTTPError, ValueError):
            events = self.c.get(f"/jobs/{job_id}/events").json()
        runs = sum(1 for e in events if e.get("type") == "status" and e.get("status") == "running")
        return {"status": job.get("status"), "stuck": job.get("status") not in FINAL,
                "run_twice": runs > 1, "code": (job.get("error") or {}).get("code")}

    def ready(self, timeout: float = 60) -> bool:
        try:
            self.s.wait_ready(timeout=timeout)
            return True
        except RuntimeError:
            return False

    def restart_api(self) -> None:
        assert self.s.api is not None
        self.s.api.wait(timeout=10)
        self.s.api = self.s._spawn("api", api_command(self.s.host, self.s.port))
        wait_http(f"{self.s.base_url}/livez", [self.s.api], 120)

    # -- the faults -----------------------------------------------------------------
    def worker(self) -> dict[str, Any]:
        job = self.start_job()
        self.wait_running(job)
        time.sleep(self.rng.uniform(0.2, 2.0))
        at_kill = self.c.get(f"/jobs/{job}").json()["status"]
        for proc in self.s.live_workers():
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        self.s.start_worker()
        return {"status_at_fault": at_kill, "jobs": [self.outcome(job)],
                "next_job": self.outcome(self.start_job(QUICK))}

    def redis(self) -> dict[str, Any]:
        job = self.start_job()
        self.wait_running(job)
        time.sleep(self.rng.uniform(0.2, 2.0))
        assert self.s.redis is not None and self.s.redis.proc is not None
        port = self.s.redis.port
        self.s.redis.proc.send_signal(signal.SIGKILL)
        self.s.redis.proc.wait(timeout=10)
        time.sleep(self.rng.uniform(0.5, 3.0))  # down for a while
        self.s.redis = RedisServer(self.s.redis_dir, port=port, persist=True).start()
        return {"jobs": [self.outcome(job)], "next_job": self.outcome(self.start_job(QUICK))}

    def api_upload(self) -> dict[str, Any]:
        big = folder_zip(make_samples(700, seed=self.rng.randint(0, 10**6)))  # 2,100 images
        before = len(list((self.s.data_dir / "datasets").glob("ds_*")))
        statuses: list[str] = []

        def send() -> None:
            try:
                r = self.c.post("/datasets", files={"file": ("big.zip", big, "application/zip")})
                statuses.append(str(r.status_code))
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)

        thread = threading.Thread(target=send)
        thread.start()
        time.sleep(self.rng.uniform(0.02, self.upload_seconds))  # sending, or extracting
        assert self.s.api is not None
        self.s.api.send_signal(signal.SIGKILL)
        thread.join(timeout=60)
        self.restart_api()
        after = len(list((self.s.data_dir / "datasets").glob("ds_*")))
        listed = self.c.get("/datasets", params={"limit": 1000}).json()["total"]
        return {"requests": statuses, "datasets_added": after - before,
                "listed_equals_stored": listed == after}

    def api_predict(self) -> dict[str, Any]:
        statuses = self._predicts_during(lambda: self._kill_api(), clients=2)
        self.restart_api()
        statuses += self._predicts(4)
        return {"requests": statuses}

    def _kill_api(self) -> None:
        assert self.s.api is not None
        self.s.api.send_signal(signal.SIGKILL)

    def inference(self) -> dict[str, Any]:
        assert self.s.api is not None
        api_pid = self.s.api.pid

        def kill_child() -> None:
            kids = children(api_pid)
            if kids:
                os.kill(self.rng.choice(kids), signal.SIGKILL)
        statuses = self._predicts_during(kill_child, clients=3)
        after = self._predicts(6)
        return {"requests": statuses, "after": after,
                "recovered": all(s == "200" for s in after)}

    def disk(self) -> dict[str, Any]:
        job = self.start_job()
        self.wait_running(job)
        at_fault = self.c.get(f"/jobs/{job}").json()["status"]
        time.sleep(self.rng.uniform(0.1, 1.5))
        filler = self.s.data_dir / "filler.bin"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=512"],
                       capture_output=True, check=False)
        out = self.outcome(job)
        filler.unlink(missing_ok=True)
        return {"status_at_fault": at_fault, "jobs": [out],
                "next_job": self.outcome(self.start_job(QUICK))}

    # -- helpers ----------------------------------------------------------------------
    def _predict_body(self) -> dict[str, Any]:
        images = [d for _, d in make_samples(22, seed=3)][:64]
        return {"data": {"model_id": self.model_id},
                "files": [("files", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]}

    def _predicts(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            try:
                out.append(str(self.c.post("/predict", **self._predict_body()).status_code))
            except httpx.HTTPError as exc:
                out.append(type(exc).__name__)
        return out

    def _predicts_during(self, fault: Any, clients: int) -> list[str]:
        statuses: list[str] = []
        stop = threading.Event()

        def loop() -> None:
            with self.s.client() as c:
                while not stop.is_set():
                    try:
                        statuses.append(str(c.post("/predict", **self._predict_body())
                                            .status_code))
                    except httpx.HTTPError as exc:
                        statuses.append(type(exc).__name__)
                        time.sleep(0.2)
        threads = [threading.Thread(target=loop) for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(self.rng.uniform(0.3, 1.5))
        fault()
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        return statuses

    def train_model(self) -> None:
        r = self.c.post("/jobs", json={"dataset_id": self.dataset_id, "method": "lqf",
                                       "backbone": "tiny_cnn",
                                       "hyperparameters": {"image_size": 32}})
        r.raise_for_status()
        job = r.json()["id"]
        assert self.outcome(job)["status"] == "succeeded"
        self.model_id = self.c.get(f"/jobs/{job}").json()["model_id"]
        # How long the large upload takes here, so that the API is killed within it.
        big = folder_zip(make_samples(700, seed=0))
        started = time.monotonic()
        r = self.c.post("/datasets", files={"file": ("big.zip", big, "application/zip")})
        self.upload_seconds = time.monotonic() - started
        self.c.delete(f"/datasets/{r.json()['id']}")


FAULTS = ["worker", "redis", "api-upload", "api-predict", "inference", "disk"]


def run_fault(name: str, rounds: int, root: Path, seed: int) -> dict[str, Any]:
    data_dir = root / name / "data"
    data_dir.mkdir(parents=True)
    if name == "disk":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs",
                                  str(data_dir)], capture_output=True, text=True)
        if mounted.returncode != 0:
            return {"skipped": f"cannot mount a tmpfs: {mounted.stderr.strip()}"}
    env = {"LQF_QUEUE": f"faults-{name}", "LQF_API_KEYS": f"bench:{Service.KEY}",
           "LQF_LEASE_TTL_S": "3", "LQF_SWEEP_INTERVAL_S": "1", "LQF_WORKER_STALE_S": "4",
           "LQF_LOG_LEVEL": "WARNING"}
    if name == "redis":  # the default lease: a Redis restart shorter than it loses no job
        env.update(LQF_LEASE_TTL_S="30", LQF_SWEEP_INTERVAL_S="5", LQF_WORKER_STALE_S="15")
    service = Service(data_dir=data_dir, redis_dir=root / name / "redis", env=env,
                      log_dir=root / name, log_level="WARNING", persist_redis=True)
    rounds_out: list[dict[str, Any]] = []
    try:
        service.start()
        service.wait_ready(timeout=120)
        bench = Bench(service, random.Random(seed))
        bench.train_model()
        for i in range(rounds):
            started = time.monotonic()
            try:
                out = getattr(bench, name.replace("-", "_"))()
            except Exception as exc:  # the bench itself failed: recorded, not hidden
                out = {"bench_error": repr(exc)[:300]}
            out["ready_again"] = bench.ready()
            out["store_problems"] = store_problems(data_dir)
            out["seconds"] = round(time.monotonic() - started, 1)
            rounds_out.append(out)
            print(f"  {name} round {i + 1}: {json.dumps(out)[:240]}", flush=True)
    finally:
        service.stop()
        if name == "disk":
            subprocess.run(["umount", str(data_dir)], capture_output=True)
    return summarise(rounds_out)


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    jobs = [j for r in rounds for j in r.get("jobs", [])]
    next_jobs = [r["next_job"] for r in rounds if "next_job" in r]
    statuses: dict[str, int] = {}
    for r in rounds:
        for s in r.get("requests", []) + r.get("after", []):
            statuses[s] = statuses.get(s, 0) + 1
    return {
        "rounds": len(rounds),
        "jobs_stuck": sum(j["stuck"] for j in jobs),
        "jobs_run_twice": sum(j["run_twice"] for j in jobs),
        "job_outcomes": sorted({f"{j['status']}:{j['code']}" for j in jobs}),
        "store_problems": sum(len(r["store_problems"]) for r in rounds),
        "not_ready_again": sum(not r["ready_again"] for r in rounds),
        "bench_errors": [r["bench_error"] for r in rounds if "bench_error" in r],
        "request_statuses": statuses,
        "half_uploads_listed": sum(1 for r in rounds if r.get("listed_equals_stored") is False),
        "inference_not_recovered": sum(1 for r in rounds if r.get("recovered") is False),
        "status_at_fault": sorted({r["status_at_fault"] for r in rounds
                                   if "status_at_fault" in r}),
        "next_job_outcomes": sorted({f"{j['status']}:{j['code']}" for j in next_jobs}),
        "next_jobs_stuck_or_twice": sum(j["stuck"] or j["run_twice"] for j in next_jobs),
        "mean_round_s": round(sum(r["seconds"] for r in rounds) / max(1, len(rounds)), 1),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`{result['command']}` · {result['date']} · git {result['git']} · "
             f"{result['machine']['cpu']} ({result['machine']['nproc']} cores)", "",
             "| fault | rounds | stuck | run twice | store problems | not ready again | "
             "job outcomes | next job | request statuses |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["faults"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | | |")
            continue
        lines.append(f"| {name} | {r['rounds']} | {r['jobs_stuck']} | {r['jobs_run_twice']} | "
                     f"{r['store_problems']} | {r['not_ready_again']} | "
                     f"{', '.join(r['job_outcomes'])} | {', '.join(r['next_job_outcomes'])} | "
                     f"{r['request_statuses']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=FAULTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "command": "python -m bench.faults" + (
            f" --rounds {args.rounds}" if args.rounds != 20 else "") + (
            f" --faults {' '.join(args.faults)}" if args.faults != FAULTS else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "git": git_commit(),
        "machine": machine(), "faults": {}}
    with tempfile.TemporaryDirectory(prefix="lqf-faults-") as tmp:
        for name in args.faults:
            print(f"{name}: {args.rounds} rounds", flush=True)
            result["faults"][name] = run_fault(name, args.rounds, Path(tmp), args.seed)
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # partial results too
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
