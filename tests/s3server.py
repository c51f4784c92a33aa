"""A real S3-compatible server for the object-storage tests: moto's server mode, an HTTP
server speaking the S3 REST protocol (signed requests, multipart uploads, listing with
delimiters, conditional writes) that boto3 talks to exactly as it talks to AWS.
It keeps objects in memory, so each test module starts its own."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

from app.launcher import free_port, spawn, stop_process

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lqf-test", "AWS_SECRET_ACCESS_KEY": "lqf-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server(timeout: float = 30) -> Iterator[str]:
    """Start moto's S3 server on a loopback port -> its endpoint URL; stopped after."""
    port = free_port()
    proc = spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError("moto's S3 server exited at start")
            with contextlib.suppress(OSError, socket.timeout):
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server did not answer on {url}")
            time.sleep(0.1)
        yield url
    finally:
        stop_process(proc)
