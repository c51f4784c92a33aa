"""Dynamic micro-batching: requests that arrive together share one predict_batch call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
import torch

from app import metrics


class MicroBatcher:
    """Collects request tensors for up to `max_wait_s` or `max_batch` images, then runs
    `predict` once on the concatenation in `executor` (never on the event loop)."""

    def __init__(self, predict: Callable[[torch.Tensor], np.ndarray], executor: Executor,
                 max_batch: int, max_wait_s: float):
        self.predict, self.executor = predict, executor
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future[np.ndarray]]] = (
            asyncio.Queue()
        )
        self._task: asyncio.Task[None] | None = None

    async def submit(self, x: torch.Tensor) -> np.ndarray:
        """(k, 3, s, s) -> (k, C) probabilities."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((x, future))
        return await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            size = batch[0][0].shape[0]
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
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
            metrics.PREDICT_BATCH_SIZE.observe(size)
            x = torch.cat([b[0] for b in batch])
            try:
                probs = await loop.run_in_executor(self.executor, self.predict, x)
            except Exception as exc:  # one bad batch must not kill the loop
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for xi, future in batch:
                end = start + xi.shape[0]
                if not future.done():  # the client may have gone away
                    future.set_result(probs[start:end])
                start = end
