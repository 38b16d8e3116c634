"""Exceptions that say the cause of a failure.

:class:`UserError` is bad input (arguments, files, settings, a checkpoint that cannot be
used): the ``diffalign`` command prints its message in one line and exits with 2. Any other
exception is a fault of the program and ends with a traceback (exit 1).
"""

from __future__ import annotations

__all__ = ["TrainingDiverged", "UserError"]


class UserError(ValueError):
    """Bad input: the message says what is wrong and how to put it right.

    A subclass of ValueError, so callers that caught the ValueErrors of argument checks
    still catch it.
    """


class TrainingDiverged(UserError):
    """The training loss stayed non-finite after a restart from the last good weights at half
    the learning rate (the settings, usually the learning rate, need changing)."""
