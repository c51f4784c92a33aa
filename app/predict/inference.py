"""Model forward passes in a child process, away from the API's Python threads.

Why a process: an eager forward pass is hundreds of small torch calls, each of which
needs the GIL. With the event loop and request threads busy parsing HTTP, the predict
thread waits for the GIL at every call: measured here, one busy Python thread slowed a
MobileNetV2 LQF batch of 16 from 65 ms to 1,030 ms (docs/benchmarks.md, serving). In a
child process the model has its own interpreter; the API thread that waits for it
blocks in a pipe read, which releases the GIL.

The child keeps its own small LRU of loaded models, keyed by model directory and
version. One batch is in flight at a time (the batcher's single predict thread); a
batch already uses every core through torch's intra-op threads. If the child dies, the
batch in flight fails with a 503 and the next batch starts a new child.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from collections import OrderedDict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.errors import ApiError
from lqf_core.serving import Predictor

log = logging.getLogger("lqf.api")


class InferenceProcess:
    """The parent's handle on the inference child; thread-safe, one request at a time."""

    def __init__(self, device: str, weights_dir: Path | None, cache_size: int,
                 torch_threads: int = 0):
        self._args = (device, str(weights_dir) if weights_dir else None, cache_size,
                      torch_threads)
        self._lock = threading.Lock()
        self._process: Any = None  # multiprocessing's process type is context-specific
        self._conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the child if it is not running (its torch import takes a few seconds)."""
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._conn is not None:
            return self._conn
        self._stop_child()
        # spawn, not fork: a forked child of a process that has used torch can hang on
        # its first OpenMP call.
        context = mp.get_context("spawn")
        parent_end, child_end = context.Pipe()
        process = context.Process(target=serve, args=(child_end, *self._args),
                                  name="lqf-inference", daemon=True)
        process.start()
        child_end.close()
        self._process, self._conn = process, parent_end
        log.info("inference process started", extra={"pid": process.pid})
        return parent_end

    def predict(self, directory: Path, version: str, x: torch.Tensor) -> np.ndarray:
        """(n, 3, s, s) -> class probabilities (n, C), computed in the child."""
        with self._lock:
            conn = self._ensure_started()
            try:
                conn.send(("predict", str(directory), version, x.numpy()))
                status, payload = conn.recv()
            except (EOFError, OSError) as exc:
                code = self._process.exitcode if self._process is not None else None
                self._stop_child()
                log.error("inference process died", extra={"exitcode": code, "error": repr(exc)})
                raise ApiError(503, "the inference process stopped during this batch; "
                                    "retry the request", "inference_unavailable") from None
        if status == "error":
            raise payload
        return payload  # type: ignore[no-any-return]

    def evict(self, directory: Path) -> None:
        """Drop a deleted model from the child's cache (best effort)."""
        with self._lock:
            if self._conn is not None and self._process is not None and self._process.is_alive():
                try:
                    self._conn.send(("evict", str(directory)))
                except OSError:
                    self._stop_child()

    def close(self) -> None:
        with self._lock:
            self._stop_child()

    def _stop_child(self) -> None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            try:
                conn.send(("stop",))
            except OSError:
                pass
            conn.close()
        if process is not None:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


def serve(conn: Connection, device: str, weights_dir: str | None, cache_size: int,
          torch_threads: int) -> None:
    """The child's loop: answer ("predict", dir, version, x) until ("stop",) or EOF."""
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)

    models: OrderedDict[tuple[str, str], Predictor] = OrderedDict()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the API process went away
            return
        if message[0] == "stop":
            return
        if message[0] == "evict":
            for key in [k for k in models if k[0] == message[1]]:
                del models[key]
            continue
        _, directory, version, x = message
        try:
            key = (directory, version)
            predictor = models.get(key)
            if predictor is None:
                predictor = Predictor.load(directory, device=device, weights_dir=weights_dir)
                models[key] = predictor
                while len(models) > cache_size:
                    models.popitem(last=False)
            models.move_to_end(key)
            reply: tuple[str, Any] = ("ok", predictor.predict_batch(torch.from_numpy(x)))
        except Exception as exc:  # the API turns it into the request's error
            reply = ("error", exc)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception:  # an exception that does not pickle: send its text
            conn.send(("error", RuntimeError(repr(reply[1]))))
