"""A lean HTTP load generator for bench.serve: prepared request bytes over keep-alive
connections, like `wrk`, and the CPU time of a process tree."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return float("nan")


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU seconds of a process and all its descendants (the api and its inference child)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(cpu_seconds(pid) for pid in tree)


def request_bytes(model_id: str, image: bytes, fmt: str, key: str) -> bytes:
    """A whole HTTP/1.1 /predict request, encoded once so the load loop spends no CPU on it."""
    if fmt == "json":
        kw: dict[str, Any] = {"json": {"model_id": model_id,
                                       "images": [base64.b64encode(image).decode()]}}
    else:
        kw = {"data": {"model_id": model_id},
              "files": {"files": ("image.png", image, "image/png")}}
    request = httpx.Request("POST", "http://127.0.0.1/predict", **kw)
    body = request.read()
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: {request.headers['Content-Type']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection that sends prepared requests.

    The load generator shares the machine's two cores with the server, so it is kept as
    lean as `wrk`: no HTTP library per request, just bytes out and a parsed reply.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def send(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(line.split(":", 1)[1]) for line in lines
                      if line.lower().startswith("content-length:"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def run_level(base_url: str, requests: list[bytes], concurrency: int,
                     n_requests: int, cap_s: float, warmup: int,
                     server_pid: int) -> dict[str, Any]:
    """`concurrency` clients share a counter of `n_requests` requests (or `cap_s`)."""
    host, port = httpx.URL(base_url).host, httpx.URL(base_url).port or 80
    latencies: list[float] = []
    failures: list[str] = []
    connections = [await Connection.open(host, port) for _ in range(concurrency)]

    async def worker(conn: Connection, counter: itertools.count[int], total: int,
                     deadline: float, record: bool) -> None:
        for i in counter:
            if i >= total or time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            status, body = await conn.send(requests[i % len(requests)])
            elapsed = time.perf_counter() - start
            if status != 200 or len(json.loads(body)["predictions"]) != 1:
                failures.append(f"{status} {body[:200]!r}")
            elif record:
                latencies.append(elapsed)

    try:
        # Warm-up: lets the batcher settle at this concurrency.
        await asyncio.gather(*(worker(c, itertools.count(), warmup, time.perf_counter() + cap_s,
                                      False) for c in connections))
        cpu0, server0 = time.process_time(), tree_cpu_seconds(server_pid)
        start = time.perf_counter()
        counter, deadline = itertools.count(), start + cap_s
        await asyncio.gather(*(worker(c, counter, n_requests, deadline, True)
                               for c in connections))
        wall = time.perf_counter() - start
        client_cpu = time.process_time() - cpu0
        server_cpu = tree_cpu_seconds(server_pid) - server0
    finally:
        for conn in connections:
            conn.close()
    return {"latencies": latencies, "failures": failures, "wall_s": wall,
            "client_cpu_s": client_cpu, "server_cpu_s": server_cpu}
