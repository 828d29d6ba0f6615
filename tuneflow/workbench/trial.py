"""One search trial's process: ``python -m tuneflow.workbench.trial PARENT_PID RECIPE_JSON --data DATA
--out RUN [--set KEY=VALUE ...]`` trains the trial with :func:`tuneflow.fit.finetune.finetune` (no
artifact: the search reads its metrics and report), and dies with the search."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..errors import is_user_error
from ..fit.finetune import finetune


def command(parent_pid: int, recipe_json: str, data: str, out: str, sets: list[str]) -> list[str]:
    """The trial's command line (``-P``: the search's working folder is not put on ``sys.path``)."""
    cmd = [sys.executable, "-P", "-m", __name__, str(parent_pid), recipe_json, "--data", data, "--out", out]
    return cmd + [a for kv in sets for a in ("--set", kv)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tuneflow-trial")
    p.add_argument("parent", type=int)
    p.add_argument("recipe")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    if sys.platform.startswith("linux"):
        import ctypes  # the prctl call below: Linux only
        try:  # PR_SET_PDEATHSIG = 1: the kernel kills this trial if the search process dies
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != args.parent:  # the search died before the line above took effect
        return 1
    logging.basicConfig(level=logging.INFO, format="tuneflow: %(message)s")
    try:
        finetune(args.recipe, args.data, args.out, overrides=args.overrides, export=False)
    except Exception as exc:  # noqa: BLE001 - a user error is one line in the trial's log; a bug keeps its traceback
        if not is_user_error(exc):
            raise
        print(f"tuneflow: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
