"""The dashboard's pure parts: held-out evaluation against brute force, SVG charts that
parse and escape what they show, thumbnails."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from app.ui.charts import line_chart, reliability_diagram
from app.ui.evaluation import evaluate, reliability_bins
from app.ui.thumbnails import thumbnail
from app.ui.web import safe_next
from lqf_core.calibration import expected_calibration_error


def test_evaluation_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 4, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 4, (200,), generator=gen)
    temperature = 1.7
    ev = evaluate({"split": "val", "item_ids": [str(i) for i in range(200)],
                   "logits": logits.tolist()}, labels.tolist(), list("abcd"), temperature)
    probs = torch.softmax(logits / temperature, dim=1)
    predicted = probs.argmax(1)
    for t in range(4):
        for p in range(4):
            assert ev.confusion[t][p] == int(((labels == t) & (predicted == p)).sum())
        assert ev.per_class_accuracy[t] == pytest.approx(
            float((predicted[labels == t] == t).double().mean()))
    assert ev.accuracy == pytest.approx(float((predicted == labels).double().mean()))
    assert ev.ece == pytest.approx(expected_calibration_error(probs, labels))
    assert sum(b["count"] for b in ev.bins) == 200
    confidence = probs.max(1).values
    for b in ev.bins:
        inside = (confidence > b["lo"]) & (confidence <= b["hi"])
        assert b["count"] == int(inside.sum())
        if b["count"]:
            assert b["accuracy"] == pytest.approx(
                float((predicted[inside] == labels[inside]).double().mean()))


def test_a_class_without_held_out_items_has_no_accuracy() -> None:
    ev = evaluate({"split": "val", "item_ids": ["0", "1"], "logits": [[3, 0, 0], [0, 3, 0]]},
                  [0, 1], ["a", "b", "c"], 1.0)
    assert ev.per_class_accuracy == [1.0, 1.0, None]
    assert sum(b["count"] for b in reliability_bins(torch.eye(3), torch.arange(3))) == 3


def test_charts_are_svg_that_escape_their_labels() -> None:
    hostile = '<script>alert("x")</script>'
    chart = line_chart([(1, 0.5), (2, 0.1), (3, 0.01)], label=hostile, x_label="iteration",
                       y_label=hostile, log_y=True)
    root = ET.fromstring(str(chart))  # well-formed, so the label did not break out
    assert root.tag.endswith("svg") and root.get("aria-label") == hostile
    assert "<script>" not in str(chart)
    assert len(root.findall(".//{http://www.w3.org/2000/svg}circle")) == 3
    diagram = reliability_diagram(
        [(hostile, "plain", [{"count": 1, "confidence": 0.9, "accuracy": 1.0}])], label="r")
    assert "<script>" not in str(diagram)
    ET.fromstring(str(diagram))
    assert "No points" in str(line_chart([], label="x", x_label="a", y_label="b"))


@pytest.mark.parametrize("target, expected", [
    ("/ui/models", "/ui/models"), ("//evil.example/ui", "/ui"), ("https://evil/ui", "/ui"),
    ("/ui\\\\evil", "/ui"), (None, "/ui"), ("/docs", "/ui")])
def test_after_sign_in_only_dashboard_paths(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def _encoded(size: tuple[int, int], fmt: str, **options: object) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize(("size", "fmt", "expected"), [
    ((2000, 1500), "JPEG", ("image/jpeg", (192, 144))),  # a photo: shrunk, aspect kept
    ((1500, 2000), "TIFF", ("image/jpeg", (144, 192))),  # browsers show no TIFF
    ((60, 40), "PNG", ("image/png", (60, 40))),  # small: as it is, losslessly
])
def test_thumbnails_are_small_and_displayable(size, fmt, expected) -> None:
    data = _encoded(size, fmt)
    body, media_type = thumbnail(data)
    with Image.open(io.BytesIO(body)) as shown:
        assert (media_type, shown.size) == expected
        assert shown.format == media_type.removeprefix("image/").upper()
    if size[0] > 192:
        assert len(body) < len(data) / 20


def test_a_thumbnail_is_upright_as_the_model_reads_it() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side, shown rotated by 90 degrees
    body, _ = thumbnail(_encoded((400, 300), "JPEG", exif=exif))
    with Image.open(io.BytesIO(body)) as shown:
        assert shown.size == (144, 192)
