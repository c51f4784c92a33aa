"""Dynamic micro-batching: requests that arrive together share one predict_batch call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
import torch

from app import metrics

# A request's input images and the future its handler awaits.
Request = tuple[torch.Tensor, "asyncio.Future[np.ndarray]"]


class MicroBatcher:
    """Collects request tensors for up to `max_wait_s` or a full batch, then runs
    `predict` once on the concatenation in `executor` (never on the event loop).

    Up to `concurrency` batches are in flight at once (one per inference process), and
    `max_batch` images in all: a batch takes at most max_batch / concurrency. Under
    load, while one process computes, the next batch fills and goes to the next one, so
    the event loop's request handling overlaps the forward passes instead of
    alternating with them. Under light load, a batch collected while other processes
    are idle is split among them. (Measured in docs/benchmarks.md, serving.)
    """

    def __init__(self, predict: Callable[[torch.Tensor], np.ndarray], executor: Executor,
                 max_batch: int, max_wait_s: float, concurrency: int = 1):
        self.predict, self.executor = predict, executor
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: asyncio.Queue[Request] = asyncio.Queue()
        self._slots = asyncio.Semaphore(concurrency)
        self._batch_limit = -(-max_batch // concurrency)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    async def submit(self, x: torch.Tensor) -> np.ndarray:
        """(k, 3, s, s) -> (k, C) probabilities."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((x, future))
        return await future

    async def close(self) -> None:
        """Stop collecting; batches already in flight still answer their requests."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            parts = 1
            while parts < len(batch) and not self._slots.locked():
                await self._slots.acquire()  # free: returns at once
                parts += 1
            groups = split(batch, parts)
            for _ in range(parts - len(groups)):  # fewer groups than slots (big requests)
                self._slots.release()
            for part in groups:
                task = asyncio.create_task(self._dispatch(part))
                self._in_flight.add(task)  # keep a reference until it is done
                task.add_done_callback(self._in_flight.discard)

    async def _collect(self) -> list[Request]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        size = batch[0][0].shape[0]
        deadline = loop.time() + self.max_wait_s
        while size < self._batch_limit:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            batch.append(item)
            size += item[0].shape[0]
        return batch

    async def _dispatch(self, batch: list[Request]) -> None:
        try:
            x = torch.cat([b[0] for b in batch])
            metrics.PREDICT_BATCH_SIZE.observe(x.shape[0])
            loop = asyncio.get_running_loop()
            probs = await loop.run_in_executor(self.executor, self.predict, x)
        except Exception as exc:  # one bad batch fails its own requests only
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._slots.release()
        start = 0
        for xi, future in batch:
            end = start + xi.shape[0]
            if not future.done():  # the client may have gone away
                future.set_result(probs[start:end])
            start = end


def split(batch: list[Request], parts: int) -> list[list[Request]]:
    """`parts` consecutive groups of requests with about the same number of images."""
    total = sum(x.shape[0] for x, _ in batch)
    groups: list[list[Request]] = [[] for _ in range(parts)]
    done = 0
    for item in batch:
        # the group this request's first image falls in, if images were dealt evenly
        groups[min(parts - 1, done * parts // total)].append(item)
        done += item[0].shape[0]
    return [g for g in groups if g]
