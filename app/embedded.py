"""One command, whole service: `python -m app.embedded` (what `make serve` runs).

Starts a real Redis, one Celery worker and the API (app.launcher), prints the URL and an
API key, and on Ctrl-C (or SIGTERM) stops all three in order, leaving nothing behind. If
one of them dies the others are stopped too, so a half-running service never lingers.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from app.config import Settings
from app.launcher import LocalService, port_in_use

DEFAULT_TENANT = "default"


def load_or_create_key(data_dir: Path) -> str:
    path = data_dir / "api_key"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    key = "lqf_" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


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

    service = LocalService(data_dir=data_dir, redis_dir=data_dir / "redis",
                           env={"LQF_API_KEYS": api_keys}, host=args.host, port=args.port,
                           persist_redis=True, log_level=settings.log_level)
    code = 0
    try:
        service.start()
        base = service.base_url
        print(
            f"\nLQF Serve is running\n"
            f"  API:      {base}\n"
            f"  Docs:     {base}/docs\n"
            f"  Dashboard: {base}/ui   (sign in with the API key)\n"
            f"  API key:  {shown_key}   ({key_note})\n"
            f"  Data:     {data_dir}\n"
            f"  Try:      curl -H 'Authorization: Bearer {shown_key}' {base}/datasets\n"
            f"Press Ctrl-C to stop.\n",
            flush=True,
        )
        while not stopping:
            dead = service.exited()
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
        service.stop()
        print("stopped.", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
