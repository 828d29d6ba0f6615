"""``tuneflow predict``: classify image files with a run's model, printed or written as CSV."""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

from ..errors import DataError
from .predictor import load


def image_files(paths) -> list[Path]:
    """Files as given, folders searched recursively for files PIL can read (by extension)."""
    from PIL import Image
    exts = {e.lower() for e in Image.registered_extensions()}
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts
                          and not f.name.startswith("."))
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder.")
    if not out:
        raise DataError(f"No image files in {', '.join(map(str, paths))}.")
    return out


def predict_command(args) -> int:
    predictor = load(args.run, args.checkpoint)
    files = image_files(args.images)
    rows, skipped = [], []
    batch = []

    def flush():
        if not batch:
            return
        probs = predictor.classify_prepared(predictor.prepare([im for _, im in batch]))
        for (f, _), p in zip(batch, probs):
            rows.append((f, predictor.describe(p, args.top)))
        batch.clear()

    from tqdm.auto import tqdm
    for f in tqdm(files, unit="img", disable=len(files) < 200, leave=False):
        try:
            batch.append((f, predictor.decode(f)))
        except DataError as exc:
            skipped.append(str(exc))
            print(f"tuneflow: skipped {exc}", file=sys.stderr)
        if len(batch) >= (args.batch_size or predictor.batch_size):
            flush()
    flush()
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "class", "probability", "top"])
            for f, d in rows:
                w.writerow([str(f), d["class"], f"{d['probability']:.6f}",
                            ";".join(f"{n}:{p:.6f}" for n, p in d["top"])])
        os.replace(tmp, args.out)
        print(f"tuneflow: {len(rows)} predictions written to {args.out}"
              + (f"; {len(skipped)} unreadable files skipped" if skipped else ""))
    else:
        for f, d in rows:
            tops = "  ".join(f"{n} {p:.4f}" for n, p in d["top"])
            print(f"{f}\t{d['class']}\t{d['probability']:.4f}" + (f"\t{tops}" if args.top > 1 else ""))
        if skipped:
            print(f"tuneflow: {len(skipped)} unreadable files skipped", file=sys.stderr)
    return 0
