"""Loaded models (LRU cache), each with its micro-batcher, and the prediction path."""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.errors import ApiError
from app.predict.batcher import MicroBatcher
from app.predict.inference import InferencePool, pool_shape
from lqf_core.data import open_image
from lqf_core.serving import Predictor
from worker.store import ArtifactStore

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
        self.size = settings.model_cache_size
        processes, threads = pool_shape(settings.predict_processes,
                                        settings.predict_torch_threads, settings.predict_device)
        # The API process also loads each model: for preprocessing, class names and the
        # closed-form queries. Batches of predictions run in the inference processes.
        self.inference = (
            InferencePool(processes, settings.predict_device, settings.weights_dir,
                          settings.model_cache_size, threads)
            if settings.predict_process else None
        )
        # A thread per batch in flight (each waits on its process), one for model loads.
        self.executor = ThreadPoolExecutor(processes + 1, thread_name_prefix="predict")
        self._models: OrderedDict[str, Loaded] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, store: ArtifactStore, model_id: str, version: str) -> Loaded:
        loaded = self._models.get(model_id)
        if loaded is not None:
            self._models.move_to_end(model_id)
            return loaded
        lock = self._locks.setdefault(model_id, asyncio.Lock())
        async with lock:  # concurrent first requests load the model once
            loaded = self._models.get(model_id)
            if loaded is None:
                directory = store.model_dir(model_id)
                predictor = await asyncio.get_running_loop().run_in_executor(
                    self.executor, lambda: Predictor.load(
                        directory, device=self.settings.predict_device,
                        weights_dir=self.settings.weights_dir))
                predict, concurrency = predictor.predict_batch, 1
                if self.inference is not None and await self._inference_started():
                    predict = functools.partial(self.inference.predict, directory,
                                                predictor.model_version or version)
                    concurrency = self.inference.size
                batcher = MicroBatcher(predict, self.executor,
                                       self.settings.predict_max_batch,
                                       self.settings.predict_max_wait_ms / 1000, concurrency)
                loaded = Loaded(predictor, batcher, predictor.model_version or version, directory)
                self._models[model_id] = loaded
                while len(self._models) > self.size:
                    _, old = self._models.popitem(last=False)
                    await old.batcher.close()
        self._locks.pop(model_id, None)
        return loaded

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

    def evict(self, model_id: str) -> None:
        loaded = self._models.pop(model_id, None)
        if loaded is not None:
            asyncio.ensure_future(loaded.batcher.close())
            if self.inference is not None:  # in the predict thread: never block the loop
                self.executor.submit(self.inference.evict, loaded.directory)

    async def close(self) -> None:
        for loaded in self._models.values():
            await loaded.batcher.close()
        self._models.clear()
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
    return torch.stack([predictor.preprocess(open_image(data, name=name))
                        for name, data in images])


async def predict(loaded: Loaded, x: torch.Tensor, top_k: int | None) -> list[dict[str, Any]]:
    """Preprocessed images (see prepare_async) -> one prediction each, via the batcher."""
    probs: np.ndarray = await loaded.batcher.submit(x)
    names = loaded.predictor.class_names
    k = min(top_k or len(names), len(names))
    out: list[dict[str, Any]] = []
    for row in probs:
        order = np.argsort(-row)[:k]
        out.append({"label": names[int(order[0])],
                    "probabilities": {names[int(i)]: float(row[i]) for i in order}})
    return out


def check_count(n: int, settings: Settings) -> None:
    if n == 0:
        raise ApiError(422, "no images given", "no_images")
    if n > settings.max_predict_images:
        raise ApiError(413, f"{n} images in one request, the limit is "
                            f"{settings.max_predict_images}", "too_many_images")
