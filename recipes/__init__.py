"""The recipe table: one module per cell; ``from tuneflow.recipes import small_similar``.

Each module defines ``recipe``; the module's name is the recipe's name. The package
binds each name to its :class:`~tuneflow.recipe.Recipe` object, so the import above
gives the recipe itself, ready for ``tuneflow.finetune(small_similar, data)``.
"""
from __future__ import annotations

import importlib
import pkgutil

from tuneflow.recipe import Recipe, RecipeError

NAMES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))
_RECIPES: dict[str, Recipe] = {n: importlib.import_module(f"{__name__}.{n}").recipe.validate()
                               for n in NAMES}
globals().update(_RECIPES)  # replaces the submodule attributes with the recipe objects


def get(name: str) -> Recipe:
    """Return the recipe called ``name`` (validated)."""
    if name not in _RECIPES:
        raise RecipeError(f"Unknown recipe {name!r}; available: {', '.join(NAMES)} (or 'auto').")
    return _RECIPES[name]


__all__ = ["NAMES", "get", *NAMES]
