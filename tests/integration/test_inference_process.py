"""The inference child process: same numbers as in-process, and it survives being killed."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from app.errors import ApiError
from app.predict.inference import InferenceProcess
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
    assert np.array_equal(inference.predict(directory, version, x[:1]), expected[:1])


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
