"""Model forward passes in child processes, away from the API's Python threads.

Why a process: an eager forward pass is hundreds of small torch calls, each of which
needs the GIL. With the event loop and request threads busy parsing HTTP, the predict
thread waits for the GIL at every call: measured here, one busy Python thread slowed a
MobileNetV2 LQF batch of 16 from 65 ms to 1,030 ms (docs/benchmarks.md, serving). In a
child process the model has its own interpreter; the API thread that waits for it
blocks in a pipe read, which releases the GIL.

Why several (`InferencePool`): torch's intra-op threads scale poorly on these batches.
Measured on two cores, MobileNetV2 LQF at 64 px, batch 32: one process with 2 threads
330 images/s, two processes with 1 thread each 440-520 images/s together. So the pool
runs one process per core by default, each with its share of the threads, and the
batcher keeps one batch in flight per process.

Each child keeps its own small LRU of loaded models, keyed by model directory and
version. If a child dies, the batch in flight fails with a 503 and that slot's next
batch starts a new child.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.errors import ApiError
from lqf_core.device import is_gpu
from lqf_core.serving import Predictor

log = logging.getLogger("lqf.api")


class InferenceProcess:
    """The parent's handle on the inference child; thread-safe, one request at a time."""

    def __init__(self, device: str, weights_dirs: Sequence[Path] | None, cache_size: int,
                 torch_threads: int = 0):
        self._args = (device, [str(d) for d in weights_dirs or []], cache_size, torch_threads)
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

    def warm(self, directory: Path, version: str) -> None:
        """Have the child load the model and run it once, before its first batch (best
        effort: a failure here shows again, properly, on the first real batch)."""
        with self._lock:
            try:
                conn = self._ensure_started()
                conn.send(("warm", str(directory), version))
                conn.recv()
            except (EOFError, OSError):
                self._stop_child()

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


class InferencePool:
    """`size` inference processes; each batch goes to a free one (thread-safe)."""

    def __init__(self, size: int, device: str, weights_dirs: Sequence[Path] | None, cache_size: int,
                 torch_threads: int = 0):
        self.processes = [InferenceProcess(device, weights_dirs, cache_size, torch_threads)
                          for _ in range(size)]
        self._free: queue.SimpleQueue[InferenceProcess] = queue.SimpleQueue()
        for process in self.processes:
            self._free.put(process)

    @property
    def size(self) -> int:
        return len(self.processes)

    @property
    def pids(self) -> list[int | None]:
        return [process.pid for process in self.processes]

    def start(self) -> None:
        for process in self.processes:
            process.start()

    def predict(self, directory: Path, version: str, x: torch.Tensor) -> np.ndarray:
        # Waits while every process is busy (e.g. batches of several models at once).
        process = self._free.get()
        try:
            return process.predict(directory, version, x)
        finally:
            self._free.put(process)

    def warm(self, directory: Path, version: str) -> None:
        """Load the model in every process, in the background: the first batch then
        skips the load and the first passes' set-up (about 1.5 s of a first 64-image
        /predict on two cores, docs/benchmarks.md)."""
        for process in self.processes:
            threading.Thread(target=process.warm, args=(directory, version),
                             name="lqf-inference-warm", daemon=True).start()

    def evict(self, directory: Path) -> None:
        for process in self.processes:
            process.evict(directory)

    def close(self) -> None:
        for process in self.processes:
            process.close()


def pool_shape(processes: int, torch_threads: int, device: str) -> tuple[int, int]:
    """(processes, intra-op threads each) for the settings' 0 = automatic values."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    gpu = is_gpu(device)
    if processes <= 0:
        processes = 1 if gpu else min(cores, MAX_AUTO_PROCESSES)
    if torch_threads <= 0:
        torch_threads = max(1, cores // processes)
    return processes, torch_threads


# Each process holds its own torch runtime and model copies (a few hundred MB).
MAX_AUTO_PROCESSES = 4


def warm_up(predictor: Predictor) -> None:
    """Two passes on a small batch: the first calls of a loaded model are 2-3x slower
    than the later ones (allocations, kernel selection)."""
    size = predictor.model.config.input_size
    x = torch.zeros(2, 3, size, size)
    for _ in range(2):
        predictor.predict_batch(x)


def serve(conn: Connection, device: str, weights_dirs: list[str], cache_size: int,
          torch_threads: int) -> None:
    """The child's loop: answer ("predict", dir, version, x) and ("warm", dir, version)
    until ("stop",) or EOF."""
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
        kind, directory, version, *rest = message
        try:
            key = (directory, version)
            predictor = models.get(key)
            if predictor is None:
                predictor = Predictor.load(directory, device=device, weights_dir=weights_dirs)
                models[key] = predictor
                while len(models) > cache_size:
                    models.popitem(last=False)
            models.move_to_end(key)
            if kind == "warm":
                warm_up(predictor)
                reply: tuple[str, Any] = ("ok", None)
            else:
                reply = ("ok", predictor.predict_batch(torch.from_numpy(rest[0])))
        except Exception as exc:  # the API turns it into the request's error
            reply = ("error", exc)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception:  # an exception that does not pickle: send its text
            conn.send(("error", RuntimeError(repr(reply[1]))))
