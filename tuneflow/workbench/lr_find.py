"""``tuneflow lr-find``: the LR range test of :mod:`tuneflow.training.lr_range`, printed or as JSON."""
from __future__ import annotations

import json
import sys

from ..training.lr_range import ADVICE, lr_find


def cli_lr_find(args) -> int:
    out = args.out
    rng = {k: v for k, v in (("start_lr", getattr(args, "min_lr", None)), ("end_lr", getattr(args, "max_lr", None)),
                             ("steps", getattr(args, "steps", None))) if v is not None}
    found = lr_find(args.recipe, args.data, stage=args.stage, overrides=args.overrides, out=out, **rng)
    warning = f"warning: inconclusive: {found['inconclusive']} ({ADVICE})" if found["inconclusive"] else ""
    if args.json:
        print(json.dumps({k: found[k] for k in ("suggested_lr", "rule", "steep", "min", "inconclusive", "tap")}))
        if warning:
            print(warning, file=sys.stderr)  # stdout stays one JSON object
    else:
        print(f"suggested lr {found['suggested_lr']:.3g} ({found['rule']} rule); steepest slope "
              f"{found['steep']:.3g}; minimum/10 {found['min']:.3g}  [{found['stopped']}"
              + (f"; tap {found['tap']}]" if found["tap"] else "]"))
        if warning:
            print(warning)
        if found["note"]:
            print(f"note: {found['note']}")
        print(f"plot: {found['plot']}")
    return 0
