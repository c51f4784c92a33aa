"""Load and soak: mixed traffic on the real service, errors counted, memory watched.

    python -m bench.load                          # 32 clients, 1,000 predicts; 10-minute soak
    python -m bench.load --soak-s 120             # a quicker look

Starts the service as `make serve` does and trains a default lqf model (MobileNetV2,
10 shots of Fashion-MNIST), and sends 8 predicts first (the model loads in each inference
process). Then:
  1. **load**: 32 concurrent clients send 1,000 `POST /predict` requests (one image each),
     while other clients create jobs (tiny `linear_probe` jobs), upload datasets and listen
     to each job's Server-Sent Events until it ends. Every response that is not the expected
     2xx, and every exception, is an error. Predict latency p50 / p99.
  2. **soak**: `--soak-s` seconds of steady traffic (8 predicting clients, a job and an
     upload every 20 s) while the resident memory of the API, its inference processes and
     the worker is sampled every 5 s. The slope (MB/min, least squares after the first
     minute) says whether memory stays flat.
Writes docs/results/load.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.serve import RESULTS, Service, folder_zip, git_commit, machine, make_data, train

FINAL = {"succeeded", "failed", "cancelled"}


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return float("nan")
    xs, ys = [t / 60 for t, _ in samples], [v for _, v in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


class Traffic:
    """The clients, sharing counters of requests, errors and predict latencies."""

    def __init__(self, service: Service, model_id: str, image: bytes,
                 upload_samples: list[tuple[str, bytes]]):
        self.base, self.key = service.base_url, Service.KEY
        self.model_id, self.image = model_id, image
        self.zip = folder_zip(upload_samples)
        self.latencies: list[float] = []
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []
        self.dataset_id: str | None = None

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, timeout=120,
                                 headers={"Authorization": f"Bearer {self.key}"})

    def _count(self, kind: str, ok: bool, detail: str = "") -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if not ok:
            self.errors.append(f"{kind}: {detail}"[:300])

    async def predict(self, c: httpx.AsyncClient) -> None:
        started = time.perf_counter()
        try:
            r = await c.post("/predict", data={"model_id": self.model_id},
                             files={"files": ("q.png", self.image, "image/png")})
            ok = r.status_code == 200
            self._count("predict", ok, f"{r.status_code} {r.text[:200]}")
        except httpx.HTTPError as exc:
            self._count("predict", False, repr(exc))
            return
        if ok:
            self.latencies.append(time.perf_counter() - started)

    async def upload(self, c: httpx.AsyncClient) -> None:
        try:
            r = await c.post("/datasets", files={"file": ("d.zip", self.zip, "application/zip")},
                             data={"name": "load"})
            self._count("upload", r.status_code == 201, f"{r.status_code} {r.text[:200]}")
            if r.status_code == 201:
                self.dataset_id = self.dataset_id or r.json()["id"]
                if self.dataset_id != r.json()["id"]:  # keep the store from growing
                    await c.delete(f"/datasets/{r.json()['id']}")
        except httpx.HTTPError as exc:
            self._count("upload", False, repr(exc))

    async def job_with_listener(self, c: httpx.AsyncClient) -> None:
        """A tiny job, followed to its end over Server-Sent Events."""
        if self.dataset_id is None:
            await self.upload(c)
        try:
            r = await c.post("/jobs", json={"dataset_id": self.dataset_id,
                                            "method": "linear_probe", "backbone": "tiny_cnn",
                                            "hyperparameters": {"image_size": 32}})
            self._count("job", r.status_code == 201, f"{r.status_code} {r.text[:200]}")
            if r.status_code != 201:
                return
            job_id, status = r.json()["id"], None
            async with c.stream("GET", f"/jobs/{job_id}/events",
                                headers={"Accept": "text/event-stream"}) as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        if event.get("type") == "status":
                            status = event.get("status")
            self._count("sse", status in FINAL, f"stream ended at {status}")
            self._count("job_succeeded", status == "succeeded", f"job {job_id} {status}")
        except httpx.HTTPError as exc:
            self._count("sse", False, repr(exc))


async def load_phase(traffic: Traffic, clients: int, requests: int) -> dict[str, Any]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def predictor() -> None:
        async with traffic.client() as c:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await traffic.predict(c)

    async def side_traffic() -> None:
        async with traffic.client() as c:
            await traffic.upload(c)
            jobs = []
            while not queue.empty():
                jobs.append(asyncio.create_task(traffic.job_with_listener(c)))
                await traffic.upload(c)
                await asyncio.sleep(2)
            await asyncio.gather(*jobs)

    started = time.perf_counter()
    await asyncio.gather(side_traffic(), *(predictor() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    lat = sorted(traffic.latencies)
    return {"clients": clients, "predicts": requests, "seconds": round(elapsed, 1),
            "predicts_per_s": round(len(lat) / elapsed, 1),
            "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
            "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1) if lat else None,
            "counts": dict(traffic.counts), "errors": len(traffic.errors),
            "first_errors": traffic.errors[:5]}


async def soak_phase(traffic: Traffic, service: Service, seconds: float) -> dict[str, Any]:
    assert service.api is not None and service.workers
    api_pid, worker_pid = service.api.pid, service.workers[0].pid
    series: dict[str, list[tuple[float, float]]] = {"api": [], "inference": [], "worker": []}
    stop = time.monotonic() + seconds
    started = time.monotonic()

    async def predictor() -> None:
        async with traffic.client() as c:
            while time.monotonic() < stop:
                await traffic.predict(c)

    async def side() -> None:
        async with traffic.client() as c:
            while time.monotonic() < stop:
                await traffic.job_with_listener(c)
                await traffic.upload(c)
                await asyncio.sleep(20)

    async def sampler() -> None:
        while time.monotonic() < stop:
            t = time.monotonic() - started
            series["api"].append((t, rss_mb(api_pid)))
            series["inference"].append((t, sum(rss_mb(p) for p in children(api_pid))))
            series["worker"].append((t, rss_mb(worker_pid) + sum(
                rss_mb(p) for p in children(worker_pid))))
            await asyncio.sleep(5)

    errors_before, counts_before = len(traffic.errors), dict(traffic.counts)
    await asyncio.gather(sampler(), side(), *(predictor() for _ in range(8)))
    out: dict[str, Any] = {"seconds": seconds, "errors": len(traffic.errors) - errors_before,
                           "counts": {k: v - counts_before.get(k, 0)
                                      for k, v in traffic.counts.items()},
                           "first_errors": traffic.errors[errors_before:errors_before + 5]}
    for name, samples in series.items():
        steady = [(t, v) for t, v in samples if t >= 60] or samples
        out[name] = {"rss_mb_start": round(samples[0][1], 1) if samples else None,
                     "rss_mb_end": round(samples[-1][1], 1) if samples else None,
                     "rss_mb_max": round(max(v for _, v in samples), 1) if samples else None,
                     "slope_mb_per_min": round(slope_mb_per_min(steady), 3)}
    return out


def markdown(result: dict[str, Any]) -> str:
    load, soak = result["load"], result["soak"]
    lines = [f"`{result['command']}` · {result['date']} · git {result['git']} · "
             f"{result['machine']['cpu']} ({result['machine']['nproc']} cores)", "",
             "| load | value |", "|---|---|",
             f"| clients / predicts | {load['clients']} / {load['predicts']} |",
             f"| wall time, predicts/s | {load['seconds']} s, {load['predicts_per_s']} |",
             f"| predict p50 / p99 | {load['p50_ms']} / {load['p99_ms']} ms |",
             f"| requests by kind | {load['counts']} |",
             f"| errors | {load['errors']} |", "",
             f"Soak: {soak['seconds']:.0f} s, {soak['errors']} errors.", "",
             "| process | RSS start MB | end MB | max MB | slope after 1 min (MB/min) |",
             "|---|---|---|---|---|"]
    for name in ("api", "inference", "worker"):
        s = soak[name]
        lines.append(f"| {name} | {s['rss_mb_start']} | {s['rss_mb_end']} | {s['rss_mb_max']} "
                     f"| {s['slope_mb_per_min']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--soak-s", type=float, default=600)
    parser.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = parser.parse_args(argv)
    train_set, test_images, source = make_data(10, 1, seed=0)
    result: dict[str, Any] = {
        "command": "python -m bench.load" + (
            f" --soak-s {args.soak_s:g}" if args.soak_s != 600 else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "git": git_commit(),
        "machine": machine(), "data": {"source": source, "items": len(train_set)}}
    with tempfile.TemporaryDirectory(prefix="lqf-load-") as tmp:
        service = Service.under(Path(tmp), {})
        try:
            service.start()
            service.wait_ready(timeout=120)
            record = train(service, train_set, "mobilenet_v2", {}, 1800)
            traffic = Traffic(service, record["id"], test_images[0], train_set[:20])
            with service.client() as c:  # load the model in every inference process first
                for _ in range(8):
                    c.post("/predict", data={"model_id": record["id"]},
                           files={"files": ("q.png", test_images[0], "image/png")})
            print(f"load: {args.clients} clients, {args.requests} predicts ...", flush=True)
            result["load"] = asyncio.run(load_phase(traffic, args.clients, args.requests))
            print(json.dumps(result["load"], indent=1), flush=True)
            print(f"soak: {args.soak_s:.0f} s ...", flush=True)
            result["soak"] = asyncio.run(soak_phase(traffic, service, args.soak_s))
        finally:
            service.stop()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
