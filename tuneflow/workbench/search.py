"""Hyperparameter search over recipe fields: an Optuna study in a journal file, one process per trial.

Design (why each piece is the way it is):

- The study lives in an Optuna journal file in the search folder (``optuna-journal.log``): a
  search killed at any point and started again with the same command continues. Only the parent
  process writes to it, and it holds an exclusive ``flock`` on ``search.lock`` while it runs, so
  on a restart any trial still marked RUNNING belonged to a dead search: it is marked FAIL
  (user attribute ``interrupted``) and its parameters are queued again. At most one trial per
  ``--jobs`` slot is computed twice.
- Each trial is ``finetune(BASE_RECIPE, overrides=[key=value ...], export=False)`` in a process of its own
  (:mod:`tuneflow.workbench.trial`; what ``tuneflow finetune ... --no-export`` runs), its run folder under ``trials/`` and its output in ``trials/NNNN.log``.
  ``--no-export``: a trial is measured on training's own path (the per-epoch figures the pruner
  reads) and writes no artifact; exporting, reloading and re-reading the validation images took
  ~29 s of a ~36 s trial on ants_bees, and ~70 MB of disk a trial; nor does it write TensorBoard
  histograms or ``top_losses.png`` (~8 s each; curves, metrics and scalars stay; a search's
  ``--set tensorboard_histograms=N`` other than the default, or a space over it, keeps them). ``best_recipe.json`` is trained
  by ``tuneflow finetune``, which exports and measures the artifact. TensorFlow never runs in the
  parent, so the parent's memory does not grow trial after trial (in-process tuners keep graphs,
  datasets and allocator pools alive). A child dies with its parent (``PR_SET_PDEATHSIG`` on Linux).
- Pruning: the parent polls every running trial's ``metrics.csv`` (the engine rewrites it
  atomically after each epoch), reports each epoch's ``val_accuracy`` to the trial at step
  ``epochs of earlier stages + epoch``, asks the pruner, and kills the child when told to prune.
  The engine needs no hook for this; the price is a poll's latency (20 ms), during which a
  cached-feature child may run an epoch or two more. Only complete lines are read (the engine
  appends a row per epoch, so the last line may be half-written). Epoch counts in ``trials.csv`` are the
  epochs that actually ran.
- The first trial of a new search runs the recipe's own value of each searched key the space
  holds (:func:`~tuneflow.workbench.space.own_point`; not on a grid), so the best trial is never
  below the recipe as given.
- Coarse to fine: ``narrow=K`` adds K rounds, each its own study (``round1``, ...) over the
  previous round's numeric ranges narrowed to its top 25% trials (on the log scale where the
  range is logarithmic), widened by 10% of the old width; its first trial re-runs the previous
  round's best parameters.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_file
from ..errors import DataError, RecipeError, RunError
from ..extras import optional
from ..recipe import Recipe
from ..runs import names
from ..runs.folder import validation_curve
from ..runs.html import write_report_html
from ..suggest import apply_suggestion, probe_choices
from ..training.inputs import resolve_recipe
from . import trial as trial_process
from .journal import JOURNAL, claim_folder, journal_storage, lock_folder
from .search_plot import plot_search
from .space import distribution, finite, fmt, grid_points, load_space, narrow_space, own_point, short_value

log = logging.getLogger("tuneflow")

POLL_SECONDS = 0.02  # metrics.csv poll period; an epoch on cached features takes 10-50 ms
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
PRUNE_ON = ("val_loss", "val_accuracy")  # the per-epoch figure the pruner compares trials on
FINISHED = ("COMPLETE", "PRUNED", "FAIL")
SUGGESTION = names.SEARCH_SUGGESTION  # a search of "auto": what `tuneflow suggest` answered
# The child: the public CLI in a fresh interpreter (-P: the working directory is not on sys.path).


@dataclass
class SearchResult:
    """What a search left in ``out``; ``best_*`` are None when no trial completed."""
    out: Path
    best_value: float | None
    best_params: dict
    best_run: Path | None
    best_recipe: Path | None
    trials_csv: Path
    plot: Path | None
    counts: dict = field(default_factory=dict)  # COMPLETE / PRUNED / FAIL -> number of trials
    epochs: int = 0  # epochs run by all finished trials
    auto: dict | None = None  # for recipe "auto": the recipe and backbone it resolved to, and why


def default_prune_warmup(recipe, prune_on: str = "val_loss") -> int:
    """The first epoch at which a trial may be pruned when ``--prune-warmup`` is not given (Optuna's
    ``n_warmup_steps``; steps are epochs counted from 1).

    - Trials compared on ``val_loss`` (the default): 2. The first epoch's loss ranks trials by how
      fast they start (it lost brain_mri_yn's best below); from epoch 2 the median rule kept the
      best trial on every set below.
    - On ``val_accuracy``: 1 (Optuna's own MedianPruner default), or, when the first stage's
      learning rate rises to its value (``Stage.rise_epochs``: a warm-up, one-cycle's first 25%),
      the first epoch after the rise: during it accuracy sits near chance for every trial whose
      LR is still low, whatever it would reach.

    Measured by replaying the median rule (5 startup trials) on the recorded epoch curves of
    20-trial unpruned searches of ``small_similar`` with ``head_solver=sgd`` (random sampler,
    default space; benchmarks/bench_search.py and the README's "search" paragraph): ants_bees with
    one-cycle heads, with constant-LR heads, data/digits and brain_mri_yn with one-cycle heads.
    val_loss from epoch 2 saved 52%, 50%, 51%, 58% of the epochs and kept the best trial on all
    four (from epoch 1 it lost brain_mri_yn's best, 0.816 -> 0.776; from 6, 0.816 -> 0.796: on 49
    validation images the most accurate trial is not the lowest-loss one). val_accuracy from
    epoch 1 saved 58%, 58%, 57%, 42% but lost ants_bees' one-cycle best (0.961 -> 0.954: two
    trials whose LR was still a 25th of its peak; from epochs 2-6 too); waiting out the rise kept
    every best and saved 14-30% (JSON: benchmarks/results/search_replays.json)."""
    if prune_on == "val_loss":
        return 2
    return int(math.floor(recipe.stages[0].rise_epochs)) + 1


def search(recipe, data, trials: int, *, jobs: int = 1, out=None, sampler: str = "tpe", space=None,
           overrides=(), fraction: float | None = None, classes=None, narrow: int = 0, seed: int = 0,
           pruner: str = "median", prune_warmup: int | None = None, prune_startup: int = 5,
           prune_on: str = "val_loss", verbose: bool = True) -> SearchResult:
    """Search recipe fields with Optuna, one ``tuneflow finetune`` process per trial.

    Args:
      recipe: a recipe name, ``"auto"`` (resolved as ``tuneflow finetune auto`` resolves it, by
        ``tuneflow suggest`` in a child process; the result's ``auto`` says what it chose), a
        recipe JSON file, or a :class:`Recipe`.
      data: what ``tuneflow finetune --data`` takes.
      trials: finished trials wanted per round (complete, pruned, or failed on their own).
      jobs: trials running at once.
      out: the search folder (default ``searches/<recipe>-<timestamp>``); the same ``out``
        continues a search.
      sampler: ``tpe`` | ``random`` | ``grid`` (3 values per numeric range).
      space: a preset (``default``, ``lr``, ``regularization``: derived from what the recipe's
        stages train, less the keys ``overrides`` fix; :func:`~tuneflow.workbench.space.default_space`),
        a JSON file or a dict.
      overrides: ``--set`` values applied to every trial (list of ``key=value`` or a dict).
      fraction, classes: subsample every trial's data for speed; ``best_recipe.json`` keeps the
        recipe's own values, so it trains on all the data.
      narrow: coarse-to-fine rounds after the first, each over narrowed ranges.
      pruner: ``median`` (a trial below the median of completed ones at the same epoch stops),
        ``hyperband`` or ``none``; a trial is not pruned before its epoch ``prune_warmup``
        (default :func:`default_prune_warmup`: from epoch 2 on ``val_loss``; on ``val_accuracy``
        from epoch 1, or after the first stage's LR rise), nor before ``prune_startup`` trials
        completed.
      prune_on: the per-epoch figure trials are compared on: ``val_loss`` (the default; the
        validation cross-entropy, which keeps moving where accuracy on a small validation set
        moves in whole images or sits at chance during a warm-up) or ``val_accuracy``. The
        study's objective is the val accuracy either way; the trials' intermediate values are the
        negated loss under ``val_loss`` (Optuna compares them in the study's direction, maximize).

    >>> r = search("small_similar", "data/digits", 20, out="searches/digits")  # doctest: +SKIP
    >>> r.best_value, r.best_recipe                                             # doctest: +SKIP
    """
    optuna = optional("optuna", "tuneflow search")

    if trials < 1 or jobs < 1 or narrow < 0:
        raise RecipeError(f"--trials {trials}, --jobs {jobs}, --narrow {narrow}: trials and jobs must be >= 1, "
                          "narrow >= 0.")
    if sampler not in SAMPLERS:
        raise RecipeError(f"--sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}.")
    if pruner not in PRUNERS:
        raise RecipeError(f"--pruner {pruner!r}: choose one of {', '.join(PRUNERS)}.")
    if prune_on not in PRUNE_ON:
        raise RecipeError(f"--prune-on {prune_on!r}: choose one of {', '.join(PRUNE_ON)}.")
    pairs = _pairs(overrides)
    data = _data_arg(data)
    suggestion = None
    if isinstance(recipe, str) and recipe == "auto":
        suggestion = _suggest(data, pairs, Path(out) if out is not None else None, verbose)
        recipe, pairs = apply_suggestion(suggestion, pairs)
    full = resolve_recipe(recipe, pairs).validate()
    base = full
    if fraction is not None:
        base = base.override(f"fraction={fraction}")
    if classes:
        base = base.override(f"classes={classes if isinstance(classes, str) else ','.join(classes)}")
    fixed = [p.split("=", 1)[0].strip() for p in _pairs(overrides)]  # the user's --set: not searched
    space0 = load_space(space, base, fixed)
    out = Path(out) if out is not None else Path("searches") / f"{base.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = {"base_recipe": base.to_dict(), "full_recipe": full.to_dict(), "data": data, "space": space0}
    if suggestion is not None:
        config["auto"] = _auto_summary(suggestion)

    claim_folder(out)
    lock = lock_folder(out)
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours to print
    try:
        storage = journal_storage(out / JOURNAL)
        runner = _Runner(out, storage, base, config, data, jobs, sampler, seed, pruner, prune_warmup,
                         prune_startup, prune_on, verbose)
        runner.check_config()
        if suggestion is not None:
            _write_atomic(out / SUGGESTION, json.dumps(suggestion, indent=2))
        for r in range(narrow + 1):
            runner.run_round(r, trials)
        result = runner.write_outputs(final=True)
    finally:
        optuna.logging.set_verbosity(level)
        lock.close()  # releases the flock
    result.auto = config.get("auto")
    if verbose:
        _summary(result, base.name, data)
    return result


def _suggest(data: str, pairs: list[str], out: Path | None, verbose: bool) -> dict:
    """What ``auto`` resolves to on ``data``: ``tuneflow suggest`` (as ``tuneflow finetune auto``
    runs it, with the backbone and input size ``--set`` pins) in a child process, so TensorFlow
    never runs in the search's process; a search continued in ``out`` reuses its first answer."""
    saved = out / SUGGESTION if out is not None else None
    if saved is not None and (out / JOURNAL).exists() and saved.exists():
        return json.loads(saved.read_text())
    probe = probe_choices(pairs)
    cmd = [sys.executable, "-P", "-m", "tuneflow", "suggest", data, "--json"]
    if "backbone" in probe:
        cmd += ["--backbone", probe["backbone"]]
    if "input_size" in probe:
        cmd += ["--input-size", str(probe["input_size"])]
    if verbose:
        log.info("auto: probing %s to choose the recipe (%s)", data, " ".join(cmd[3:]))
    p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1].removeprefix("tuneflow: error: ")
        raise RunError(f"search auto: `tuneflow {' '.join(cmd[4:])}` failed (exit {p.returncode}): {last}")
    suggestion = json.loads(p.stdout)
    if verbose:
        log.info("auto: %s -> %s; %s", suggestion["reason"], suggestion["recipe"], suggestion["backbone_reason"])
    return suggestion


def _auto_summary(suggestion: dict) -> dict:
    """What a search report says of ``auto``: the recipe and backbone it resolved to, and why."""
    return {k: suggestion[k] for k in ("recipe", "backbone", "reason", "backbone_reason")}


class _Child:
    """One trial's process and what the parent has read of its metrics.csv."""

    def __init__(self, trial, proc, run: Path, log_file, offsets: list[int], t0: float):
        self.trial, self.proc, self.run, self.log_file, self.offsets, self.t0 = trial, proc, run, log_file, offsets, t0
        self.reported = 0  # metrics rows reported to the trial
        self.stamp = None  # (mtime_ns, size) of metrics.csv when last read
        self.best = (-math.inf, math.inf)  # best (val_accuracy, val_loss) over the epochs read


def _trial_sets(base: Recipe, params: dict) -> list[str]:
    """A trial's ``--set`` values: its parameters, and no TensorBoard histograms (nobody opens a
    trial's: ~8 s of a 60 s trial; scalars stay) unless the search's ``--set`` or its space chose a
    value other than the default."""
    sets = [f"{k}={fmt(v)}" for k, v in params.items()]
    default = Recipe.__dataclass_fields__["tensorboard_histograms"].default
    if "tensorboard_histograms" not in params and base.tensorboard_histograms == default:
        sets.append("tensorboard_histograms=0")
    return sets


class _Runner:
    """The parent loop: asks Optuna for trials, runs them as child processes, reports and prunes."""

    def __init__(self, out, storage, base, config, data, jobs, sampler, seed, pruner, prune_warmup,
                 prune_startup, prune_on, verbose):
        self.out, self.storage, self.base, self.config, self.data = out, storage, base, config, data
        self.jobs, self.sampler_name, self.seed, self.verbose = jobs, sampler, seed, verbose
        self.pruner_name, self.prune_startup, self.prune_on = pruner, prune_startup, prune_on
        self.prune_warmup = prune_warmup if prune_warmup is not None else default_prune_warmup(base, prune_on)
        self.studies: list = []  # one per round so far
        self.spaces: list[dict] = []
        self.base_json = out / "base_recipe.json"
        self.best_key = None

    def check_config(self):
        import optuna
        names = [s.study_name for s in optuna.get_all_study_summaries(self.storage)]
        if "round0" in names:
            stored = optuna.load_study(study_name="round0", storage=self.storage).user_attrs.get("config", {})
            diff = [k for k in ("base_recipe", "data", "space")
                    if json.dumps(stored.get(k), sort_keys=True) != json.dumps(self.config[k], sort_keys=True)]
            if diff:
                raise RunError(f"{self.out} holds a search with a different {', '.join(diff)} "
                               f"(its data: {stored.get('data')}; recipe: {stored.get('base_recipe', {}).get('name')}). "
                               "Repeat that search's command to continue it, or choose another --out.")
        _write_atomic(self.base_json, Recipe.from_dict(self.config["base_recipe"]).to_json())

    def run_round(self, r: int, n: int):
        import optuna
        study = optuna.create_study(study_name=f"round{r}", storage=self.storage, direction="maximize",
                                    load_if_exists=True)
        stored = study.user_attrs.get("prune_on", "val_accuracy" if study.get_trials(deepcopy=False) else None)
        if stored not in (None, self.prune_on):  # the trials' intermediate values are in its units
            raise RunError(f"{self.out} holds a search whose trials were compared on {stored} "
                           f"(--prune-on {stored}); continuing it with --prune-on {self.prune_on} would "
                           f"compare new trials with old ones in other units. Repeat it with --prune-on "
                           f"{stored}, or choose another --out.")
        study.set_user_attr("prune_on", self.prune_on)
        if r == 0:
            space = self.config["space"]
            study.set_user_attr("config", self.config)
            own = own_point(self.base, space)
            if own and self.sampler_name != "grid" and not study.get_trials(deepcopy=False):
                study.enqueue_trial(own)  # the first trial: the recipe as given, so the best is never below it
                log.info("trial 0000 runs the recipe's own values: %s",
                         ", ".join(f"{k}={short_value(v)}" for k, v in own.items()))
        elif "space" in study.user_attrs:
            space = study.user_attrs["space"]
        else:  # a new round: narrow around the previous round's best, start from the best so far
            prev = [(t.params, t.value) for t in self.studies[-1].get_trials(deepcopy=False)
                    if t.state == optuna.trial.TrialState.COMPLETE]
            space = narrow_space(self.spaces[-1], prev)
            best = max(prev, key=lambda t: t[1])[0]
            study.set_user_attr("space", space)
            study.enqueue_trial({k: v for k, v in best.items() if k in space})
            log.info("round %d: narrowed space %s", r, json.dumps(space))
        self.studies.append(study)
        self.spaces.append(space)
        self._requeue_interrupted(study)
        existing = len(study.get_trials(deepcopy=False))
        study.sampler = self._sampler(space, self.seed + 1000 * r + existing)
        study.pruner = self._pruner()
        if self.sampler_name == "grid":
            size = math.prod(len(v) for v in grid_points(space).values())
            if n > size:
                log.info("grid of %d points: %d trials instead of %d", size, size, n)
                n = size
        self._loop(study, r, space, n)

    def _loop(self, study, r, space, n):
        dists = {k: distribution(s) for k, s in space.items()}
        running: list[_Child] = []
        fails_in_row = 0
        restore = _sigterm_as_interrupt()
        try:
            while True:
                done = _count_finished(study)
                if done >= n and not running:
                    break
                while len(running) < self.jobs and done + len(running) < n:
                    running.append(self._launch(study.ask(dists), r))
                for child in list(running):
                    state = self._poll(study, child)
                    if state is None:
                        continue
                    running.remove(child)
                    fails_in_row = fails_in_row + 1 if state == "FAIL" else 0
                    self.write_outputs(final=False)
                    if fails_in_row >= max(3, self.jobs):
                        raise RunError(f"{fails_in_row} trials in a row failed; the last one's log "
                                       f"({child.log_file}) ends with:\n{_tail(child.log_file)}")
                time.sleep(POLL_SECONDS)
        finally:
            for child in running:  # interrupted or failed: these trials run again on a restart
                _kill(child.proc)
                self._mark_interrupted(study, child.trial.number, child.trial.params)
            restore()
            if running:
                self.write_outputs(final=False)

    def _launch(self, trial, r: int) -> _Child:
        params = trial.params
        name = f"{trial.number:04d}" if r == 0 else f"round{r}-{trial.number:04d}"
        run = self.out / "trials" / name
        run.parent.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("run", str(run.relative_to(self.out)))
        recipe = self.base.override(*[f"{k}={fmt(v)}" for k, v in params.items()])
        offsets = [sum(s.epochs for s in recipe.stages[:i]) for i in range(len(recipe.stages))]
        cmd = trial_process.command(os.getpid(), str(self.base_json), self.data, str(run), _trial_sets(self.base, params))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.jobs > 1:  # J trials share the cores: without this each TensorFlow takes all of them
            threads = str(max(1, (os.cpu_count() or 1) // self.jobs))
            env.setdefault("TF_NUM_INTRAOP_THREADS", threads)
            env.setdefault("OMP_NUM_THREADS", threads)
        log_path = run.with_name(name + ".log")
        with open(log_path, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        return _Child(trial, proc, run, log_path, offsets, time.time())

    def _poll(self, study, child: _Child) -> str | None:
        """Report new epochs; prune, or finish the trial when its process ended. Returns the
        trial's final state, or None while it runs."""
        from optuna.trial import TrialState
        rc = child.proc.poll()
        for row in self._new_rows(child):
            step = child.offsets[row["stage"]] + row["epoch"]
            acc, loss = row["val_accuracy"], row["val_loss"]
            child.trial.report(-loss if self.prune_on == "val_loss" else acc, step)
            child.reported += 1
            if (acc, -loss) > (child.best[0], -child.best[1]):
                child.best = (acc, loss)
            if rc is None and self.pruner_name != "none" and child.trial.should_prune():
                _kill(child.proc)
                epochs = len(validation_curve(child.run / names.METRICS))  # the epochs that actually ran
                self._finish(study, child, TrialState.PRUNED, epochs=epochs, at=step)
                return "PRUNED"
        if rc is None:
            return None
        report = _read_json(child.run / names.REPORT)
        if rc != 0 or report is None or not finite(report.get("val_accuracy")):
            self._finish(study, child, TrialState.FAIL, epochs=child.reported, rc=rc)
            return "FAIL"
        self._finish(study, child, TrialState.COMPLETE, epochs=child.reported, report=report)
        return "COMPLETE"

    def _new_rows(self, child: _Child) -> list[dict]:
        path = child.run / names.METRICS
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return []
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == child.stamp:
            return []
        child.stamp = stamp
        return validation_curve(path)[child.reported:]

    def _finish(self, study, child: _Child, state, epochs: int, report=None, rc=None, at=None):
        from optuna.trial import TrialState
        seconds = round(time.time() - child.t0, 2)
        t = child.trial
        t.set_user_attr("epochs", epochs)
        t.set_user_attr("seconds", seconds)
        if state == TrialState.COMPLETE:
            t.set_user_attr("val_loss", report.get("val_loss"))
            study.tell(t, report["val_accuracy"])
            what = f"val accuracy {report['val_accuracy']:.4f}"
        else:
            if child.reported:
                t.set_user_attr("val_accuracy", child.best[0])
                t.set_user_attr("val_loss", child.best[1])
            study.tell(t, state=state)
            what = (f"pruned at epoch {at} (best val accuracy {child.best[0]:.4f})" if state == TrialState.PRUNED
                    else f"failed (exit {rc}; log {child.log_file})")
        if self.verbose:
            params = ", ".join(f"{k}={short_value(v)}" for k, v in t.params.items())
            log.info("trial %s: %s, %d epochs, %.1f s  [%s]", child.run.name, what, epochs, seconds, params)

    def _requeue_interrupted(self, study):
        from optuna.trial import TrialState
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.info("trial %d was running when the search stopped: marked failed, queued again", t.number)
            self._mark_interrupted(study, t.number, t.params)

    def _mark_interrupted(self, study, number: int, params: dict):
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(
            self.storage.get_study_id_from_name(study.study_name), number)
        self.storage.set_trial_user_attr(trial_id, "interrupted", True)
        study.tell(number, state=_state("FAIL"), skip_if_finished=True)
        study.enqueue_trial(params)

    def _sampler(self, space, seed):
        import optuna
        if self.sampler_name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.sampler_name == "grid":
            return optuna.samplers.GridSampler(grid_points(space), seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10)

    def _pruner(self):
        import optuna
        if self.pruner_name == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.prune_startup, n_warmup_steps=self.prune_warmup)
        if self.pruner_name == "hyperband":  # the most epochs a trial may run (the space may search epochs)
            most = sum(max(s.epochs, self.spaces[-1].get(f"{s.name}.epochs", {}).get("high", 0))
                       for s in self.base.stages)
            return optuna.pruners.HyperbandPruner(min_resource=self.prune_warmup, max_resource=most)
        return optuna.pruners.NopPruner()

    def trials(self) -> list[tuple[int, object]]:
        return [(r, t) for r, s in enumerate(self.studies) for t in s.get_trials(deepcopy=False)
                if t.state.name in FINISHED]

    def write_outputs(self, final: bool) -> SearchResult:
        rows = self.trials()
        csv_path = self.out / "trials.csv"
        params = sorted({k for _, t in rows for k in t.params})
        lines = []
        for r, t in rows:
            a = t.user_attrs
            lines.append({"round": r, "number": t.number, "state": t.state.name,
                          **{k: t.params.get(k, "") for k in params},
                          "val_accuracy": t.value if t.value is not None and t.state.name == "COMPLETE"
                          else a.get("val_accuracy", ""),
                          "val_loss": a.get("val_loss", ""), "epochs": a.get("epochs", ""),
                          "seconds": a.get("seconds", ""), "run": a.get("run", "")})
        _write_csv(csv_path, ["round", "number", "state", *params, "val_accuracy", "val_loss", "epochs", "seconds",
                              "run"], lines)
        complete = [(r, t) for r, t in rows if t.state.name == "COMPLETE"]
        best = max(complete, key=lambda rt: (rt[1].value, -(rt[1].user_attrs.get("val_loss") or 0.0)), default=None)
        best_recipe = self.out / "best_recipe.json"
        best_run = None
        if best is not None:
            best_run = self.out / best[1].user_attrs["run"]
            key = (best[0], best[1].number)
            if key != self.best_key or not best_recipe.exists():
                self._write_best(best_run, best, best_recipe)
                self.best_key = key
        plot = None
        if final and rows:
            plot = plot_search(rows, self.spaces, self.out / "search.png")
            try:
                write_report_html(self.out)
            except Exception as exc:  # noqa: BLE001 - the trials and the best recipe are written
                log.warning("report.html not written: %s", exc)
        counts = {s: sum(t.state.name == s for _, t in rows) for s in FINISHED}
        return SearchResult(self.out, best[1].value if best else None, dict(best[1].params) if best else {},
                            best_run, best_recipe if best else None, csv_path, plot, counts,
                            sum(int(t.user_attrs.get("epochs") or 0) for _, t in rows))

    def _write_best(self, run: Path, best, path: Path):
        """The recipe as searched (``--set`` values kept, ``--fraction``/``--classes`` not) with
        the best trial's parameters: what ``tuneflow finetune`` trains on all the data."""
        r, t = best
        recipe = Recipe.from_dict(self.config["full_recipe"]).override(
            *[f"{k}={fmt(v)}" for k, v in t.params.items()])
        auto = self.config.get("auto")
        resolved = (f" (auto: {auto['recipe']} with {recipe.backbone}; {auto['reason']})" if auto else "")
        recipe = dataclasses.replace(
            recipe, description=f"tuneflow search {self.out}: best trial {run.name} "
                                f"(val accuracy {t.value:.4f}) of {recipe.name}{resolved}")
        _write_atomic(path, recipe.validate().to_json())


def _pairs(overrides) -> list[str]:
    if isinstance(overrides, dict):
        return [f"{k.replace('__', '.')}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                for k, v in overrides.items()]
    return list(overrides)


def _data_arg(data) -> str:
    text = str(data)
    if text.startswith("tfds:"):
        return text
    path = Path(text).expanduser()
    if not path.is_dir():
        raise DataError(f"--data {text}: no such folder. Give a folder of class folders or tfds:NAME.")
    return str(path.resolve())  # trials may run from another working directory after a restart


def _sigterm_as_interrupt():
    """SIGTERM stops the search like Ctrl-C (children killed, their trials queued again)."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old)


def _kill(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _count_finished(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state.name in ("COMPLETE", "PRUNED")
               or (t.state.name == "FAIL" and not t.user_attrs.get("interrupted")))


def _state(name):
    from optuna.trial import TrialState
    return TrialState[name]



def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _write_atomic(path: Path, text: str):
    write_file(path, text)


def _write_csv(path: Path, fields: list[str], rows: list[dict]):
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fields)
    w.writeheader()
    w.writerows(rows)
    write_file(path, buf.getvalue())


def _summary(result: SearchResult, name: str, data: str):
    line = "-" * 64
    c = result.counts
    print(line)
    print(f"tuneflow search {name} on {data}  ->  {result.out}")
    if result.auto:
        print(f"  auto: {result.auto['recipe']} with backbone {result.auto['backbone']} ({result.auto['reason']})")
    print(f"  {sum(c.values())} trials: {c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned, "
          f"{c.get('FAIL', 0)} failed; {result.epochs} epochs run")
    if result.best_value is not None:
        params = ", ".join(f"{k}={short_value(v)}" for k, v in result.best_params.items())
        print(f"  best: {result.best_run.name}, val accuracy {result.best_value:.4f}  [{params}]")
        print(f"  best recipe: {result.best_recipe}   (tuneflow finetune {result.best_recipe} --data ...)")
    print(f"  trials: {result.trials_csv}" + (f"; plot: {result.plot}" if result.plot else ""))
    print(line)
