"""A run's artifact graphs (float32) built from its trained model, or rebuilt from one of its
checkpoints (``tuneflow.load(run, checkpoint="last")``)."""
from __future__ import annotations

import json
from pathlib import Path

import keras
import tensorflow as tf

from ..version import __version__
from ..backbones import get_spec
from ..errors import RunError
from ..recipe import Recipe
from ..runs import names
from ..runs.checkpoints import restore_model
from ..training.assemble import Assembly, assemble, make_backbone
from ..training.heads import choose_norm
from ..training.plan import Plan
from .artifact import ArtifactInfo, ArtifactModels, float32_twin, in_memory_functions


def artifact_models(plan: Plan, asm: Assembly, checkpoint: str = "best") -> ArtifactModels:
    """The float32 graphs of the artifact, with ``asm``'s trained weights."""
    twin = float32_twin(lambda: assemble(plan, make_backbone(plan, weights=None), asm.tap), asm.model)
    info = ArtifactInfo(classes=list(plan.classes), input_size=plan.size, resize=plan.recipe.resize,
                        backbone=plan.spec.name, recipe=plan.recipe.name, tap=asm.tap,
                        embedding_dim=int(twin.feature_model.output.shape[-1]),
                        penultimate_dim=int(twin.head.layers[-1].kernel.shape[0]),
                        checkpoint=checkpoint, tuneflow_version=__version__)
    return ArtifactModels(twin.feature_model, twin.head, info)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} is missing: {path.parent} is not a tuneflow run folder ({what}).") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{path} is unreadable ({exc}); the run folder is damaged.") from None


def plan_of_run(run_dir: Path) -> tuple[Plan, str | None]:
    """The float32 plan of a finished or interrupted run, and its tap, from the files it wrote."""
    recipe = Recipe.from_dict(_read_json(run_dir / names.RECIPE, f"no {names.RECIPE}"))
    labels = _read_json(run_dir / names.LABELS, f"no {names.LABELS}")
    classes = [labels[str(i)] for i in range(len(labels))]
    info = _read_json(run_dir / names.RUN, f"no {names.RUN}")
    spec = get_spec(recipe.backbone)
    plan = Plan(recipe=recipe, spec=spec, size=recipe.pixels,
                strategy=tf.distribute.get_strategy(), precision="float32", classes=classes,
                class_weights=None, norm=choose_norm(recipe.norm, recipe.batch_size), freeze_bn=False)
    return plan, info.get("tap")


def functions_from_checkpoint(run_dir: str | Path, checkpoint: str):
    """The artifact's endpoint functions for ``checkpoint`` (``"last"`` or a checkpoint path)."""
    models = artifact_from_checkpoint(run_dir, checkpoint)
    return in_memory_functions(models), models.info


def artifact_from_checkpoint(run_dir: str | Path, checkpoint: str) -> ArtifactModels:
    """The artifact's float32 graphs with the weights of ``checkpoint`` (``"last"`` or a path)."""
    run_dir = Path(run_dir)
    plan, tap = plan_of_run(run_dir)
    where = run_dir / "checkpoints" / "last" if checkpoint == "last" else Path(checkpoint)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        asm = assemble(plan, make_backbone(plan, weights=None), tap)
        try:
            used = restore_model(asm.model, where)
        except FileNotFoundError as exc:
            raise RunError(f"checkpoint={checkpoint!r}: {exc} Use 'best', 'last' or a checkpoint path "
                           f"such as {run_dir}/checkpoints/ckpt-000003.") from None
        models: ArtifactModels = artifact_models(plan, asm, checkpoint=str(used))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return models
