"""Loaded models (LRU cache), each with its micro-batcher, and the prediction path."""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.cache import AsyncLRU
from app.config import Settings, get_settings
from app.errors import ApiError
from app.predict.batcher import MicroBatcher
from app.predict.inference import InferencePool, pool_shape
from lqf_core.serving import Predictor
from state.artifacts import ArtifactStore

log = logging.getLogger("lqf.api")


@dataclass
class Loaded:
    predictor: Predictor
    batcher: MicroBatcher
    version: str
    directory: Path


class PredictorCache:
    """Keeps the `size` most recently used models in memory; loads each once."""

    def __init__(self, settings: Settings):
        self.settings = settings
        processes, threads = pool_shape(settings.predict_processes,
                                        settings.predict_torch_threads, settings.predict_device)
        # The API process also loads each model: for preprocessing, class names and the
        # closed-form queries. Batches of predictions run in the inference processes.
        self.inference = (
            InferencePool(processes, settings.predict_device, settings.weights_dirs(),
                          settings.model_cache_size, threads)
            if settings.predict_process else None
        )
        # A thread per batch in flight (each waits on its process), one for model loads.
        self.executor = ThreadPoolExecutor(processes + 1, thread_name_prefix="predict")
        self._models: AsyncLRU[Loaded] = AsyncLRU(settings.model_cache_size,
                                                  on_drop=self._dispose)

    async def get(self, store: ArtifactStore, model_id: str, version: str) -> Loaded:
        return await self._models.get(model_id, lambda: self._load(store, model_id, version))

    async def _load(self, store: ArtifactStore, model_id: str, version: str) -> Loaded:
        directory = store.model_dir(model_id)
        predictor = await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: Predictor.load(
                directory, device=self.settings.predict_device,
                weights_dir=self.settings.weights_dirs()))
        predict, concurrency = predictor.predict_batch, 1
        if self.inference is not None and await self._inference_started():
            predict = functools.partial(self.inference.predict, directory,
                                        predictor.model_version or version)
            concurrency = self.inference.size
            self.inference.warm(directory, predictor.model_version or version)
        batcher = MicroBatcher(predict, self.executor, self.settings.predict_max_batch,
                               self.settings.predict_max_wait_ms / 1000, concurrency)
        return Loaded(predictor, batcher, predictor.model_version or version, directory)

    async def _inference_started(self) -> bool:
        """Start the inference processes; if this API process cannot spawn them (e.g. it was
        started from a script without a `__main__` guard), predict in a thread instead."""
        assert self.inference is not None
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.inference.start)
            return True
        except Exception as exc:
            log.warning("no inference processes, predicting in the API process",
                        extra={"error": repr(exc)})
            self.inference.close()
            self.inference = None
            return False

    async def _dispose(self, loaded: Loaded) -> None:
        await loaded.batcher.close()
        if self.inference is not None:  # in the predict thread: never block the loop
            self.executor.submit(self.inference.evict, loaded.directory)

    def evict(self, model_id: str) -> None:
        loaded = self._models.evict(model_id)
        if loaded is not None:
            asyncio.ensure_future(self._dispose(loaded))

    async def close(self) -> None:
        await self._models.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.inference is not None:
            self.inference.close()


# Decoding a few small images takes less time than a thread-pool hop; bigger ones would
# hold up the event loop, so they are decoded in a thread.
INLINE_DECODE_PIXELS = 256 * 256


def decodes_quickly(images: list[tuple[str, bytes]]) -> bool:
    """True when the images' headers say they are small in total (no pixel decoded)."""
    total = 0
    for _, data in images:
        try:
            with Image.open(io.BytesIO(data)) as img:
                total += img.width * img.height
        except Exception:  # unreadable: the threaded path reports it properly
            return False
        if total > INLINE_DECODE_PIXELS:
            return False
    return True


async def prepare_async(predictor: Predictor, images: list[tuple[str, bytes]]) -> torch.Tensor:
    if decodes_quickly(images):
        return prepare(predictor, images)
    return await run_in_threadpool(prepare, predictor, images)


def prepare(predictor: Predictor, images: list[tuple[str, bytes]]) -> torch.Tensor:
    # InvalidDataError (undecodable, bomb) names the image and becomes a 422.
    return torch.stack([predictor.load_image(data, name=name)
                        for name, data in images])


async def predict(loaded: Loaded, x: torch.Tensor, top_k: int | None) -> list[dict[str, Any]]:
    """Preprocessed images (see prepare_async) -> one prediction each, via the batcher,
    within LQF_PREDICT_TIMEOUT_S (a 504 past it; the batch, a bounded computation, may
    still finish in its inference process, and its answer is dropped)."""
    timeout_s = get_settings().predict_timeout_s
    try:
        probs: np.ndarray = await asyncio.wait_for(loaded.batcher.submit(x), timeout_s)
    except TimeoutError:
        raise ApiError(504, f"the prediction took longer than {timeout_s:g} s "
                            "(LQF_PREDICT_TIMEOUT_S); retry, or send fewer images",
                       "predict_timeout") from None
    names = loaded.predictor.class_names
    k = min(top_k or len(names), len(names))
    out: list[dict[str, Any]] = []
    for row in probs:
        order = np.argsort(-row)[:k]
        out.append({"label": names[int(order[0])],
                    "probabilities": {names[int(i)]: float(row[i]) for i in order}})
    return out
