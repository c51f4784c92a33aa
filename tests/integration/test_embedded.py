"""`make serve`'s launcher: starts Redis, a worker and the API, prints the URL and a key that
persists, and on Ctrl-C (SIGINT) stops all three, leaving no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.launcher import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def children_of(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return {int(x) for x in out.split()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has not reaped it yet).
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def start(data_dir: Path, port: int) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LQF_")}
    env.update(LQF_PORT=str(port), LQF_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "app.embedded"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if match := re.search(r"API key:\s+(\S+)", line):
            return proc, match.group(1)
        assert time.monotonic() < deadline and proc.poll() is None
    raise AssertionError(f"launcher exited with {proc.wait()} before printing a key")


def test_one_command_start_and_clean_ctrl_c(tmp_path):
    port = free_port()
    proc, key = start(tmp_path / "data", port)
    try:
        kids = children_of(proc.pid)
        assert len(kids) == 3  # redis-server, celery worker, uvicorn
        assert (tmp_path / "data" / "api_key").read_text().strip() == key
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            deadline = time.monotonic() + 60
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, c.get("/readyz").text
                time.sleep(0.3)
            assert c.get("/datasets").status_code == 401
            r = c.get("/datasets", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.json()["total"] == 0
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal delivers
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in kids)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The key is kept: a second start prints the same one.
    proc, again = start(tmp_path / "data", free_port())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    assert again == key
