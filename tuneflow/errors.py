"""Which exceptions are the user's to fix (printed as one line) rather than tuneflow bugs."""
from __future__ import annotations


def is_user_error(exc: BaseException) -> bool:
    from .backbones import WeightsUnavailableError
    from .data import DataError
    from .engine.checkpoints import CheckpointMismatchError
    from .engine.run import RunExistsError
    from .recipe import RecipeError
    return isinstance(exc, (RecipeError, DataError, RunExistsError, WeightsUnavailableError,
                            CheckpointMismatchError, FileNotFoundError, ValueError))
