"""The inference child processes: same numbers as in-process, several at once, and they
survive being killed."""

from __future__ import annotations

import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from app.errors import ApiError
from app.predict.inference import InferencePool, InferenceProcess, pool_shape
from lqf_core.artifacts import save_model
from lqf_core.config import TrainConfig
from lqf_core.errors import InvalidDataError
from lqf_core.serving import Predictor
from lqf_core.train import train_model
from tests.core.images import coloured_images


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    images, labels, names = coloured_images(per_class=6)
    config = TrainConfig.from_dict({"backbone": "tiny_cnn", "image_size": 24, "max_iters": 5})
    model = train_model(images, labels, names, config)
    directory = tmp_path_factory.mktemp("models") / "m"
    version = save_model(model, directory)
    predictor = Predictor.load(directory, device="cpu")
    x = torch.stack([predictor.preprocess(im) for im in images])
    return directory, version, predictor, x


@pytest.fixture
def inference():
    process = InferenceProcess("cpu", None, cache_size=2)
    yield process
    process.close()


def test_child_predicts_exactly_what_the_model_does_in_process(saved_model, inference):
    directory, version, predictor, x = saved_model
    expected = predictor.predict_batch(x)
    assert np.array_equal(inference.predict(directory, version, x), expected)
    alone = inference.predict(directory, version, x[:1])
    assert np.array_equal(alone, predictor.predict_batch(x[:1]))
    # A batch of one takes other float32 kernels than a batch of six: the same answer up to
    # rounding, not bit for bit (a CI run saw 0.97242078 against 0.97242079).
    np.testing.assert_allclose(alone, expected[:1], rtol=0, atol=1e-6)


def test_a_killed_child_fails_one_batch_with_503_and_is_replaced(saved_model, inference):
    directory, version, predictor, x = saved_model
    inference.predict(directory, version, x[:2])
    first = inference.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    with pytest.raises(ApiError) as failed:
        inference.predict(directory, version, x[:2])
    assert failed.value.status == 503
    out = inference.predict(directory, version, x[:2])  # a new child answers
    assert inference.pid not in (None, first)
    assert np.array_equal(out, predictor.predict_batch(x[:2]))


def test_errors_in_the_child_reach_the_caller(tmp_path, saved_model, inference):
    _, version, _, x = saved_model
    with pytest.raises(Exception) as missing:
        inference.predict(tmp_path / "no-such-model", version, x[:1])
    assert "no-such-model" in str(missing.value)
    assert not isinstance(missing.value, InvalidDataError | ApiError)
    inference.close()
    assert inference.pid is None


@pytest.fixture
def pool():
    two = InferencePool(2, "cpu", None, cache_size=2, torch_threads=1)
    yield two
    two.close()


def test_the_pool_answers_concurrent_batches_from_two_processes(saved_model, pool):
    directory, version, predictor, x = saved_model
    expected = predictor.predict_batch(x)
    with ThreadPoolExecutor(4) as threads:
        outs = list(threads.map(lambda _: pool.predict(directory, version, x), range(8)))
    assert all(np.array_equal(out, expected) for out in outs)
    pids = pool.pids
    assert None not in pids and len(set(pids)) == 2  # both processes served batches


def test_a_killed_pool_process_fails_only_its_batch(saved_model, pool):
    directory, version, predictor, x = saved_model
    with ThreadPoolExecutor(2) as threads:
        list(threads.map(lambda _: pool.predict(directory, version, x[:2]), range(4)))
    victim = pool.pids[0]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    failures, answers = 0, []
    for _ in range(3):  # free processes are handed out in turn: one of the first two dies
        try:
            answers.append(pool.predict(directory, version, x[:2]))
        except ApiError as exc:
            assert exc.status == 503
            failures += 1
    assert failures == 1
    assert all(np.array_equal(a, predictor.predict_batch(x[:2])) for a in answers)
    assert victim not in pool.pids


def test_pool_shape_defaults():
    cores = len(os.sched_getaffinity(0))
    processes, threads = pool_shape(0, 0, "cpu")
    assert processes == min(cores, 4) and threads == max(1, cores // processes)
    assert pool_shape(0, 0, "cuda") == (1, cores)
    assert pool_shape(3, 2, "cpu") == (3, 2)


def test_warm_loads_the_model_before_its_first_batch(tmp_path, saved_model, inference):
    directory, version, predictor, x = saved_model
    inference.warm(tmp_path / "no-such-model", version)  # a failed warm-up changes nothing
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    inference.warm(copy, version)
    shutil.rmtree(copy)  # only a model loaded by the warm-up can answer now
    assert np.array_equal(inference.predict(copy, version, x), predictor.predict_batch(x))
