"""Domain exceptions of lqf_core.

Each subclasses a built-in so callers that do not know lqf_core can still catch it
(`except ValueError`), and each message carries the numbers that explain it.
"""

from __future__ import annotations


class LQFError(Exception):
    """Base class of every error lqf_core raises on purpose."""


class InvalidDataError(LQFError, ValueError):
    """The training or prediction data cannot be used (too few classes, bad image...)."""


class InvalidConfigError(LQFError, ValueError):
    """A hyperparameter is unknown or out of range."""


class UnknownBackboneError(LQFError, ValueError):
    """No backbone of that name is registered."""


class WeightsNotFoundError(LQFError, FileNotFoundError):
    """A backbone's pre-trained weights file is not on this machine (never downloaded)."""


class IncompatibleModelError(LQFError, ValueError):
    """A saved model cannot be loaded by this version or on this backbone."""


class Cancelled(LQFError):
    """The caller's `should_stop` callback returned True: a cancelled or stopped job, a
    query past its deadline. Work stops at its next check and leaves no partial result."""


class TrainingCancelled(Cancelled):
    """Raised inside training when the caller's `should_stop` callback returns True."""
