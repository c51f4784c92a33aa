"""The micro-batcher: requests that arrive together share a batch; with several
inference processes, several batches are in flight at once."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from app.predict.batcher import MicroBatcher, split


def run(coro):
    return asyncio.run(coro)


def test_requests_that_arrive_together_share_one_batch_and_get_their_own_rows():
    calls: list[int] = []

    def predict(x: torch.Tensor) -> np.ndarray:
        calls.append(x.shape[0])
        return x.flatten(1)[:, :1].numpy() * 2

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(predict, executor, max_batch=8, max_wait_s=0.05)
            inputs = [torch.full((1, 1, 2, 2), float(i)) for i in range(5)]
            outs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
            await batcher.close()
        return outs

    outs = run(scenario())
    assert calls == [5]
    assert [float(o[0, 0]) for o in outs] == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_requests_waiting_while_two_processes_are_idle_run_side_by_side():
    # Each batch waits until two batches are running at once: with one slot the two
    # requests would share one batch and time out; with two they are split and pass.
    both_running = threading.Barrier(2, timeout=5)
    sizes: list[int] = []

    def predict(x: torch.Tensor) -> np.ndarray:
        sizes.append(x.shape[0])
        both_running.wait()
        return np.zeros((x.shape[0], 1))

    async def scenario():
        with ThreadPoolExecutor(2) as executor:
            batcher = MicroBatcher(predict, executor, max_batch=8, max_wait_s=0.01,
                                   concurrency=2)
            await asyncio.gather(*(batcher.submit(torch.zeros(1, 1, 2, 2)) for _ in range(2)))
            await batcher.close()

    run(scenario())
    assert sizes == [1, 1]


def test_max_batch_is_shared_by_the_batches_in_flight():
    sizes: list[int] = []

    def predict(x: torch.Tensor) -> np.ndarray:
        sizes.append(x.shape[0])
        time.sleep(0.01)
        return x.flatten(1)[:, :1].numpy()

    async def scenario():
        with ThreadPoolExecutor(2) as executor:
            batcher = MicroBatcher(predict, executor, max_batch=4, max_wait_s=0.01,
                                   concurrency=2)
            inputs = [torch.full((1, 1, 2, 2), float(i)) for i in range(12)]
            outs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
            await batcher.close()
        return outs

    outs = run(scenario())
    assert [float(o[0, 0]) for o in outs] == [float(i) for i in range(12)]
    assert sum(sizes) == 12 and max(sizes) <= 2


def test_split_deals_images_evenly_and_keeps_requests_whole():
    def request(k: int):
        return (torch.zeros(k, 1, 2, 2), None)

    sizes = [[x.shape[0] for x, _ in g] for g in split([request(1) for _ in range(5)], 2)]
    assert sizes == [[1, 1, 1], [1, 1]]
    assert [[x.shape[0] for x, _ in g] for g in split([request(1), request(5)], 2)] == [[1, 5]]


def test_a_failing_batch_fails_its_own_requests_and_the_next_batch_still_runs():
    def predict(x: torch.Tensor) -> np.ndarray:
        if float(x.sum()) < 0:
            raise ValueError("bad batch")
        return np.ones((x.shape[0], 1))

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(predict, executor, max_batch=1, max_wait_s=0.0)
            bad = await asyncio.gather(batcher.submit(-torch.ones(1, 1, 2, 2)),
                                       return_exceptions=True)
            good = await batcher.submit(torch.ones(1, 1, 2, 2))
            await batcher.close()
        return bad[0], good

    bad, good = run(scenario())
    assert isinstance(bad, ValueError)
    assert good.tolist() == [[1.0]]

