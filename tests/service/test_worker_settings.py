"""The worker's own settings that reach lqf_core."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lqf_core import signals
from worker.config import WorkerSettings, apply_fit_memory_budget


def test_the_signals_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LQF_SIGNALS_MAX_GB", "0.5")
    monkeypatch.setattr(signals, "MAX_BYTES", signals.MAX_BYTES)  # restored afterwards
    apply_fit_memory_budget(WorkerSettings())
    assert signals.MAX_BYTES == 512 * 1024**2


def test_a_negative_budget_is_refused(monkeypatch):
    monkeypatch.setenv("LQF_SIGNALS_MAX_GB", "-1")
    with pytest.raises(ValidationError, match="signals_max_gb"):
        WorkerSettings()
