from __future__ import annotations

import json

import pytest

from lqf_core.cli import main
from tests.core.images import write_image_folder

FAST = ["--backbone", "tiny_cnn", "--image-size", "24", "--max-iters", "10"]


def test_train_then_predict_json(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", per_class=8)
    assert main(["train", str(data), "--out", str(tmp_path / "model"), *FAST]) == 0
    out = capsys.readouterr().out
    assert "cv_accuracy" in out and "saved to" in out  # 24 items: cross-fitted calibration
    images = sorted(str(p) for p in (data / "red").iterdir())[:2]
    assert main(["predict", str(tmp_path / "model"), *images, "--json", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, images, strict=True):
        record = json.loads(line)
        assert record["image"] == path
        assert record["label"] == "red"
        assert set(record["probabilities"]) == {"red", "green", "blue"}
        assert sum(record["probabilities"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        ("empty", [], "no images found"),
        ("one_class", [], "at least 2 classes"),
        ("unreadable", [], "not a readable image"),
        ("ok", ["--backbone", "vgg99"], "unknown backbone 'vgg99'"),
        ("ok", ["--weight-decay", "-1"], "weight_decay must be null (the solver's default) or"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, setup, extra, message):
    data = tmp_path / "data"
    if setup == "empty":
        data.mkdir()
    elif setup == "one_class":
        write_image_folder(data, per_class=3)
        for name in ("green", "blue"):
            for p in (data / name).iterdir():
                p.unlink()
            (data / name).rmdir()
    else:
        write_image_folder(data, per_class=3)
        if setup == "unreadable":
            (data / "red" / "broken.png").write_bytes(b"not an image")
    args = ["train", str(data), "--out", str(tmp_path / "m"), *FAST, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "m").exists()


def test_predict_on_missing_model_exits_2(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope"), "x.png"]) == 2
    assert "not a saved model" in capsys.readouterr().err
