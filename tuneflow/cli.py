"""Command line: ``tuneflow finetune | recipes | suggest | augment-preview``."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _parser():
    p = argparse.ArgumentParser(prog="tuneflow", description="Fine-tuning recipes for pretrained CNNs.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("finetune", help="train, evaluate and report a recipe")
    f.add_argument("recipe", help="recipe name (see `tuneflow recipes`) or 'auto'")
    f.add_argument("--data", required=True, help="folder of class folders, or tfds:NAME[:SPLIT]")
    f.add_argument("--out", help="run folder (default runs/<recipe>-<timestamp>)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe field, e.g. --set batch_size=16 --set head.lr=3e-3")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r = sub.add_parser("recipes", help="list recipes, or show one")
    r.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    r.add_argument("name", nargs="?")
    s = sub.add_parser("suggest", help="recommend a recipe from the data")
    s.add_argument("data")
    s.add_argument("--backbone", default="efficientnet_lite0")
    s.add_argument("--json", action="store_true")
    a = sub.add_parser("augment-preview", help="write a PNG grid of augmented samples")
    a.add_argument("--data", required=True)
    a.add_argument("--preset", default="medium")
    a.add_argument("--backend", default="keras", choices=["keras", "albumentations"])
    a.add_argument("--size", type=int, default=160)
    a.add_argument("--out", default="augment-preview.png")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="tuneflow: %(message)s")
    for noisy in ("absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error reaches the user as one readable message
        from .errors import is_user_error
        if not is_user_error(exc):
            raise
        print(f"tuneflow: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.cmd == "recipes":
        import tuneflow.recipes as registry
        if args.action == "show":
            if not args.name:
                print("tuneflow: error: `tuneflow recipes show NAME`", file=sys.stderr)
                return 2
            recipe = registry.get(args.name)
            doc = sys.modules[f"tuneflow.recipes.{args.name}"].__doc__ or ""
            print(doc.strip() + "\n")
            print(recipe.to_json())
            return 0
        for n in registry.NAMES:
            print(f"{n:16s} {registry.get(n).description}")
        return 0
    if args.cmd == "suggest":
        from .suggest import suggest
        result = suggest(args.data, args.backbone)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print("evidence:")
            for t, a in result["probe_accuracy"].items():
                print(f"  linear probe at {t:24s} {a:.3f}")
            if result["imagenet_confidence"] is not None:
                print(f"  ImageNet head mean top-1 confidence  {result['imagenet_confidence']:.3f}")
            print(f"  {result['reason']}")
            print(f"suggested recipe: {result['recipe']}")
        return 0
    if args.cmd == "augment-preview":
        from .data import load_data
        from .data.augment import preview
        bundle = load_data(args.data, args.size)
        print(preview(bundle.train.x[::max(1, len(bundle.train) // 4)][:4], args.preset, args.backend, args.out))
        return 0
    from .training.finetune import finetune
    recipe = args.recipe
    if recipe == "auto":
        from .suggest import suggest
        s = suggest(args.data)
        print(f"auto: {s['reason']} -> {s['recipe']}")
        recipe = s["recipe"]
    finetune(recipe, args.data, args.out, overwrite=args.overwrite, resume=args.resume,
             overrides=args.overrides)
    return 0
