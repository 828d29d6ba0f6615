"""The exceptions tuneflow raises for people to act on: all derive from :class:`TuneflowError`.

The CLI prints a ``TuneflowError`` as one line (what was wrong, the value, what to do) and
lets anything else, a bug in tuneflow or its dependencies, show its whole traceback.
"""
from __future__ import annotations


class TuneflowError(Exception):
    """Base class: the user can fix this (bad data, recipe, run folder, weights or input)."""


class DataError(TuneflowError, ValueError):
    """The data cannot be trained on or read; the message says why and what to do."""


class RecipeError(TuneflowError, ValueError):
    """A bad recipe value or override; the message lists what is valid."""


class SetupError(TuneflowError, ValueError):
    """The environment a command runs in is not as it needs (TF_CONFIG, an engine not installed)."""


class RunError(TuneflowError):
    """A run folder, checkpoint or artifact cannot be created, resumed or loaded as asked."""


class ServeError(TuneflowError):
    """Settings of ``tuneflow serve`` that cannot work together, or an unreadable API key file."""


def is_user_error(exc: BaseException) -> bool:
    """True for the errors the CLI prints as one line."""
    return isinstance(exc, TuneflowError)


class MissingExtraError(TuneflowError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""
