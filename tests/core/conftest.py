"""Fixtures shared by the brute-force tests of lqf_core."""

from __future__ import annotations

import pytest

from lqf_core.backbones import load_backbone


@pytest.fixture(scope="module")
def backbone():
    """The tiny CNN in float64, where exact comparisons are meaningful."""
    bb = load_backbone("tiny_cnn")
    for block in bb.blocks:
        block.double()
    return bb
