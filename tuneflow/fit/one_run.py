"""One model trained, exported and measured in a run folder (a whole run, or one fold of a k-fold run)."""
from __future__ import annotations

from pathlib import Path

from ..data import DataBundle
from ..export.evaluate import evaluate
from ..runs.checkpoints import Checkpoints
from ..runs.folder import RunDir
from ..training import assemble as asm_mod
from ..training.plan import Plan
from ..training.stages import run_stages
from ..training.taps import choose_tap


def train_and_evaluate(plan: Plan, bundle: DataBundle, run: RunDir, verbose, resume, read_dir=None,
                       export: bool = True):
    """Build, train every stage (resuming if asked), export and evaluate: (report, trained model)."""
    r = plan.recipe
    with plan.strategy.scope():
        backbone = asm_mod.make_backbone(plan)
    tap_scores: dict = {}
    tap = choose_tap(plan, bundle, backbone, tap_scores, _stored_tap(run) if resume else None)
    run.status("running", tap=tap)
    with plan.strategy.scope():
        asm = asm_mod.assemble(plan, backbone, tap)
    ckpts = Checkpoints(run / "checkpoints", asm.model,
                        read_folder=Path(read_dir) / "checkpoints" if read_dir is not None else None)
    resume_from = ckpts.latest_good() if resume else None
    outcome = run_stages(plan, bundle, run, asm, ckpts, resume_from, verbose)
    report = evaluate(plan, bundle, run, asm, outcome, export=export)
    report["taps"] = tap_scores or None
    if r.weights is None:
        report["advice"] = (report.get("advice") or "") + (
            " Trained from scratch (weights=None): every layer trained in every stage.")
    return report, asm.model


def _stored_tap(run: RunDir):
    """The tap an interrupted run chose (its depth probe is not run again on resume)."""
    return run.run_info().get("tap")
