"""What a run is given, resolved: a recipe (object, name or JSON file, with overrides), data
(folder, ``tfds:``, arrays or a bundle) at the recipe's input size, and the plan a run (or an LR
range test, or the doctor) trains by."""
from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

import tuneflow.recipes as registry

from ..data import DataBundle, check_bundle, load_arrays, load_data, subsample
from ..data.labels import normalize_array_data
from ..errors import RecipeError
from ..recipe import Recipe
from .backbone_probe import resolve_backbone
from .distribute import choose_precision, make_strategy
from .plan import Plan


def resolve_recipe(recipe, overrides=()) -> Recipe:
    """A :class:`Recipe`, a recipe name, or the path of a recipe JSON file (``recipe.json`` of a
    run, or the best recipe a ``tuneflow search`` wrote), with ``overrides`` applied."""
    if isinstance(recipe, (str, Path)):
        text = str(recipe)
        if text.endswith(".json") or Path(text).is_file():
            try:
                recipe = Recipe.from_json(Path(text).read_text())
            except OSError as exc:
                raise RecipeError(f"Cannot read the recipe file {text}: {exc}.") from None
            except RecipeError:
                raise
            except (ValueError, TypeError) as exc:
                raise RecipeError(f"{text} is not a valid recipe file: {exc}") from None
        else:
            recipe = registry.get(text)
    elif not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe={recipe!r}: pass a recipe name, 'auto', a recipe JSON file or a Recipe.")
    if isinstance(overrides, dict):
        return recipe.override(**overrides)
    return recipe.override(*overrides)


def resolve_data(data, recipe: Recipe, size: int) -> DataBundle:
    """A folder, ``tfds:NAME``, ``(x, y)`` arrays (int, string or one-hot labels), a dict of
    splits, or a :class:`DataBundle` -> a bundle at ``size`` pixels."""
    if isinstance(data, DataBundle):
        side = data.train.x.shape[1] if len(data.train) else size
        if side != size:
            raise RecipeError(f"The DataBundle holds {side} px images but the recipe wants input_size={size}: "
                              f"load it with load_data(..., {size}) or --set input_size={side}.")
        return check_bundle(subsample(data, recipe.fraction, recipe.classes, recipe.seed))
    if isinstance(data, (tuple, list, dict)) and not isinstance(data, str):
        arrays, classes = normalize_array_data(data)
        bundle = load_arrays(arrays, size, recipe.val_fraction, classes=classes, resize=recipe.resize,
                             keep=recipe.classes or None)
        return check_bundle(subsample(bundle, recipe.fraction, None, recipe.seed))
    return load_data(data, size, recipe.val_fraction, recipe.fraction, recipe.classes, recipe.seed, recipe.resize)


def prepare(recipe, data, overrides=(), *, one_device: bool = False, stored_backbone: str | None = None,
            verbose: int = 1, deadline=None) -> tuple[Recipe, DataBundle, Plan]:
    """(recipe, bundle, plan): the recipe resolved, its strategy made (``one_device``: the default
    strategy, as an LR range test or the doctor use), the dtype policy set to its precision, the
    data loaded at its input size, and ``backbone=auto`` resolved by the backbone probe
    (``stored_backbone``: the one an interrupted run chose; ``plan.backbone_choice`` says what the
    probe found). ``deadline``: a :class:`~tuneflow.training.budget.Deadline`: the probe gets its
    share, and a plan that cannot fit is refused here, before any run folder exists. The strategy
    comes first: a multi-worker one must be made before anything touches the TensorFlow runtime."""
    recipe = resolve_recipe(recipe, overrides)
    strategy = tf.distribute.get_strategy() if one_device else make_strategy(recipe.strategy)
    precision = choose_precision(recipe.precision)
    keras.mixed_precision.set_global_policy(precision)
    bundle = resolve_data(data, recipe, recipe.pixels)
    if deadline is not None and recipe.backbone == "auto" and not stored_backbone:
        recipe = recipe.override(backbone_probe_seconds=deadline.probe_seconds(recipe.backbone_probe_seconds))
    recipe, choice = resolve_backbone(recipe, bundle, strategy, precision, stored=stored_backbone, verbose=verbose)
    plan = Plan.make(recipe, bundle, strategy, precision)
    plan.backbone_choice = choice
    if deadline is not None:
        deadline.parts["data_and_backbone"] = deadline.spent()
        probes = (choice or {}).get("probes") or {}
        rate = choice.get("winner_images_per_second") if probes else None
        reused = (len(bundle.train) if choice.get("train_cached") else int(choice.get("images", 0))) if probes else 0
        deadline.plan = deadline.check_feasible(len(bundle.train) - reused + len(bundle.val), rate, len(bundle.val))
        plan.deadline = deadline
    return recipe, bundle, plan
