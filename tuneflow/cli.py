"""Command line: ``tuneflow finetune | predict | explain | report | embed | export | serve | index | similar |
search | compare | lr-find | doctor | pack | recipes | suggest | augment-preview``."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .data.augment import BACKENDS
from .errors import is_user_error
from .extras import require
from .version import __version__


def _parser():
    p = argparse.ArgumentParser(prog="tuneflow", description="Fine-tuning recipes for pretrained CNNs.")
    p.add_argument("--version", action="version", version=f"tuneflow {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("finetune", help="train, evaluate and report a recipe")
    f.add_argument("recipe", help="recipe name (see `tuneflow recipes`), 'auto', or a recipe JSON file")
    f.add_argument("--data", required=True, help="folder of class folders, or tfds:NAME[:SPLIT]")
    f.add_argument("--out", help="run folder (default runs/<recipe>-<timestamp>)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe field, e.g. --set batch_size=16 --set head.lr=3e-3")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    f.add_argument("--force", action="store_true",
                   help="with --resume: accept a recipe, overrides or data that differ from the run's")
    f.add_argument("--no-export", action="store_true",
                   help="measure on training's own path, write no model/ (what search trials do)")
    f.add_argument("--budget", metavar="TIME",
                   help="wall-time budget for the whole run: 90s, 10m, 2h; the run plans to it and stops "
                        "complete (exported, evaluated) within it")
    f.add_argument("--quality", choices=("fast", "balanced", "best"),
                   help="fast: no backbone probe, native input size; balanced: the recipe; best: a longer probe")
    pr = sub.add_parser("predict", help="classify images with a trained run")
    pr.add_argument("run", help="a run folder (or its model/ folder)")
    pr.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    pr.add_argument("--top", type=int, default=1, help="how many classes to list per image")
    pr.add_argument("--out", help="write a CSV (path, class, probability, top) instead of printing")
    pr.add_argument("--checkpoint", default="best", help="best (the exported model), last, or a checkpoint path")
    pr.add_argument("--batch-size", type=int, default=None,
                    help="images a batch (default: 64 at 224 px, fewer for larger inputs or less free memory)")
    ex = sub.add_parser("explain", help="Grad-CAM: one PNG per image (image, class-evidence heatmap, top classes)")
    ex.add_argument("run", help="a finished run folder")
    ex.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    ex.add_argument("--out", required=True, help="folder for the PNGs (<image name>.explain.png)")
    ex.add_argument("--top", type=int, default=3, help="classes listed per image")
    rp = sub.add_parser("report", help="(re)write report.html of a run, k-fold or search folder")
    rp.add_argument("run", help="a run, k-fold run or search folder")
    rp.add_argument("--open", action="store_true", help="open it in a browser when one is there")
    r = sub.add_parser("recipes", help="list recipes, or show one")
    r.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    r.add_argument("name", nargs="?")
    s = sub.add_parser("suggest", help="recommend a recipe from the data")
    s.add_argument("data")
    s.add_argument("--backbone", default=None,
                   help="probe this backbone only (default: compare the EfficientNet-Lites, name the best per second; "
                        "the named recipe keeps its own backbone unless one probes clearly above it)")
    s.add_argument("--input-size", type=int, default=0,
                   help="probe at this size in pixels (default: each backbone's own)")
    s.add_argument("--json", action="store_true")
    a = sub.add_parser("augment-preview", help="write a PNG grid of augmented samples")
    a.add_argument("--data", required=True)
    a.add_argument("--preset", default="medium")
    a.add_argument("--backend", default="keras", choices=BACKENDS)
    a.add_argument("--size", type=int, default=160)
    a.add_argument("--out", default="augment-preview.png")
    se = sub.add_parser("search", help="hyperparameter search over recipe fields (Optuna), one process per trial")
    se.add_argument("recipe", help="recipe name (see `tuneflow recipes`), 'auto' (as `tuneflow finetune auto` "
                    "resolves it), or a recipe JSON file")
    se.add_argument("--data", required=True, help="folder of class folders, or tfds:NAME[:SPLIT]")
    se.add_argument("--trials", type=int, required=True, help="finished trials wanted (per round)")
    se.add_argument("--jobs", type=int, default=1, help="trials running at once")
    se.add_argument("--out", help="search folder (default searches/<recipe>-<timestamp>); the same --out continues a search")
    se.add_argument("--sampler", default="tpe", choices=["tpe", "random", "grid"])
    se.add_argument("--space", help="preset (default, lr, regularization; default: derived from what the recipe "
                    "trains, less the keys --set fixes) or a JSON file of key -> range")
    se.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="fixed override for every trial")
    se.add_argument("--fraction", type=float, help="share of the images each trial uses (fast tuning)")
    se.add_argument("--classes", help="comma-separated class subset each trial uses")
    se.add_argument("--narrow", type=int, nargs="?", const=1, default=0, metavar="ROUNDS",
                    help="then search again around the best trials (coarse to fine), ROUNDS times (default 1)")
    se.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    se.add_argument("--prune-warmup", type=int, help="the first epoch at which a trial may be pruned (default: 2 with --prune-on val_loss; with val_accuracy 1, as Optuna's, or the first epoch after the first stage's LR rise: warmup_epochs, or one-cycle's first 25%%)")
    se.add_argument("--prune-startup", type=int, default=5, help="completed trials before pruning starts")
    se.add_argument("--prune-on", default="val_loss", choices=["val_loss", "val_accuracy"],
                    help="the per-epoch figure trials are compared on (default val_loss; the search's "
                         "objective is val accuracy either way)")
    se.add_argument("--seed", type=int, default=0, help="sampler seed")
    co = sub.add_parser("compare", help="one table and one figure comparing run folders")
    co.add_argument("runs", nargs="+", help="run folders")
    co.add_argument("--out", default="compare.png", help="the figure (val accuracy and loss curves)")
    co.add_argument("--json", action="store_true", help="print the rows as JSON")
    lf = sub.add_parser("lr-find", help="LR range test for one stage of a recipe; suggests an lr, plots lr_find.png")
    lf.add_argument("recipe", help="recipe name or recipe JSON file")
    lf.add_argument("--data", required=True, help="folder of class folders, or tfds:NAME[:SPLIT]")
    lf.add_argument("--stage", default="0", help="stage index or name (default 0)")
    lf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    lf.add_argument("--out", help="folder for lr_find.png (default: the current folder)")
    lf.add_argument("--json", action="store_true", help="print {suggested_lr, rule, steep, min, inconclusive, tap} as JSON")
    lf.add_argument("--min-lr", type=float, default=None, help="start of the LR range (default 1e-7)")
    lf.add_argument("--max-lr", type=float, default=None, help="end of the LR range (default 10)")
    lf.add_argument("--steps", type=int, default=None, help="optimizer steps over the range (default 100)")
    dr = sub.add_parser("doctor", help="data, label and model checks before training; writes doctor.md")
    dr.add_argument("recipe", nargs="?", help="recipe name or JSON file (default small_similar)")
    dr.add_argument("--data", required=True, help="folder of class folders, or tfds:NAME[:SPLIT]")
    dr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    dr.add_argument("--out", help="folder for doctor.md and suspects.png (default: the current folder)")
    dr.add_argument("--json", action="store_true", help="print {checks, verdict} as JSON")
    e = sub.add_parser("embed", help="write embeddings of images from a run (.npy, .parquet or .csv)")
    e.add_argument("run", help="run folder")
    e.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDER")
    e.add_argument("--out", required=True, help="FILE.npy (paths in FILE.paths.txt), FILE.parquet or FILE.csv")
    e.add_argument("--checkpoint", default="best", help="best (the exported model), last, or a checkpoint path")
    e.add_argument("--layer", default="pooled", choices=["pooled", "penultimate"])
    e.add_argument("--no-normalize", action="store_true", help="keep raw vectors (default: L2-normalised)")
    e.add_argument("--batch-size", type=int, default=None,
                    help="images a batch (default: 64 at 224 px, fewer for larger inputs or less free memory)")
    e.add_argument("--strict", action="store_true", help="fail on the first unreadable file instead of skipping it")
    e.add_argument("--no-progress", action="store_true")
    x = sub.add_parser("export", help="write the run's model as a SavedModel, ONNX, OpenVINO IR or TFLite")
    x.add_argument("run", help="run folder")
    x.add_argument("--out", required=True, help="folder to write (SavedModel: OUT/1/, for TF Serving)")
    x.add_argument("--format", default="savedmodel", choices=["savedmodel", "onnx", "openvino", "tflite"])
    x.add_argument("--checkpoint", default="best")
    x.add_argument("--parity-images", nargs="+", metavar="IMAGES_OR_FOLDER",
                   help="check the conversion on these instead of the run's validation images")
    x.add_argument("--tolerance", type=float, default=1e-4, help="largest output difference accepted")
    v = sub.add_parser("serve", help="HTTP service: embed, classify and search, micro-batched")
    v.add_argument("run", help="run folder")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed)")
    v.add_argument("--max-batch", type=int, default=64, help="images per model call")
    v.add_argument("--max-wait-ms", type=float, default=5.0, help="wait for more images after the first")
    v.add_argument("--no-pad-batches", dest="pad_batches", action="store_false",
                   help="call the model with any batch size (default: padded to 1, 2, 3, 4, 6, 8, ... "
                        "--max-batch, which keeps the server's memory flat on CPUs)")
    v.add_argument("--index", help="index folder from `tuneflow index`, enables POST /v1/search")
    v.add_argument("--checkpoint", default="best")
    v.add_argument("--max-request-bytes", type=int, default=32 * 2**20)
    v.add_argument("--max-images", type=int, default=64, help="images per request")
    v.add_argument("--max-pixels", type=int, default=40_000_000, help="width x height per image (413 beyond)")
    v.add_argument("--max-request-pixels", type=int, default=200_000_000,
                   help="decoded pixels of one request's images together (413 beyond)")
    v.add_argument("--max-inflight-pixels", type=int, default=None,
                   help="decoded pixels the whole server holds at once (default: 8%% of the "
                        "machine's memory at 40 bytes a pixel; stated in /v1/info)")
    v.add_argument("--max-queue", type=int, default=256,
                   help="images waiting for room in that budget; beyond: 503 with Retry-After")
    v.add_argument("--limit-concurrency", type=int, default=128,
                   help="connections and requests at once (uvicorn's limit; beyond: 503)")
    v.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's headers")
    v.add_argument("--body-timeout", type=float, default=60.0, help="seconds for a request's body (408 beyond)")
    v.add_argument("--api-key-file", help="file holding the API key (else $TUNEFLOW_API_KEY; none: open)")
    v.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (behind the key)")
    n = sub.add_parser("index", help="nearest-neighbour index of a gallery's embeddings (faiss)")
    n.add_argument("source", metavar="RUN", help="run folder (with --add: the index folder)")
    n.add_argument("images", nargs="+", metavar="GALLERY", help="image files or folders")
    n.add_argument("--out", help="index folder to write")
    n.add_argument("--add", action="store_true", help="add images to the index folder given as RUN, no rebuild")
    n.add_argument("--checkpoint", default="best")
    n.add_argument("--layer", default="pooled", choices=["pooled", "penultimate"])
    n.add_argument("--no-normalize", action="store_true")
    n.add_argument("--approximate-above", type=int, default=200_000,
                   help="above this many images, an HNSW index with its recall@10 measured")
    n.add_argument("--batch-size", type=int, default=None,
                    help="images a batch (default: 64 at 224 px, fewer for larger inputs or less free memory)")
    n.add_argument("--strict", action="store_true")
    n.add_argument("--no-progress", action="store_true")
    m = sub.add_parser("similar", help="nearest gallery images of an image, from an index")
    m.add_argument("index", metavar="INDEX_DIR")
    m.add_argument("images", nargs="+", metavar="IMAGE")
    m.add_argument("-k", type=int, default=5)
    m.add_argument("--json", action="store_true")
    pk = sub.add_parser("pack", help="write a folder of class folders as TFRecord shards that --data accepts")
    pk.add_argument("data", help="folder of class folders (optionally under train/ val/ test/)")
    pk.add_argument("--out", required=True, help="new or empty folder for the shards and tuneflow_pack.json")
    pk.add_argument("--classes", help="comma-separated class subset to pack")
    pk.add_argument("--shard-mb", type=float, default=128, help="shard size in MB of encoded images")
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
        if not is_user_error(exc):
            raise
        print(f"tuneflow: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    # Each command imports its own modules when it runs (the lazy imports below): a command needs
    # only its own extra installed (tuneflow.extras), and `tuneflow --help` loads none of them.
    if args.cmd in ("serve", "index", "similar", "search"):
        require("search" if args.cmd == "search" else "serve", f"tuneflow {args.cmd}")
    if args.cmd == "explain":
        from .export.explain import cli_explain
        return cli_explain(args)
    if args.cmd == "report":
        from .runs.html import cli_report
        return cli_report(args)
    if args.cmd == "embed":
        from .export.embed import cli_embed
        return cli_embed(args)
    if args.cmd == "export":
        from .export.formats import cli_export
        return cli_export(args)
    if args.cmd == "serve":
        from .serve.server import cli_serve
        return cli_serve(args)
    if args.cmd == "index":
        from .index import cli_index
        return cli_index(args)
    if args.cmd == "similar":
        from .index import cli_similar
        return cli_similar(args)
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
        result = suggest(args.data, args.backbone, input_size=args.input_size)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"evidence ({result['probe_backbone']} at {result['probe_size']} px):")
            for t, a in result["probe_accuracy"].items():
                print(f"  linear probe at {t:24s} {a:.3f}")
            if result["imagenet_confidence"] is not None:
                print(f"  ImageNet head mean top-1 confidence  {result['imagenet_confidence']:.3f}")
            print(f"  {result['reason']}")
            print(f"  {result['backbone_reason']}")
            print(f"suggested recipe: {result['recipe']} with backbone {result['backbone']}")
        return 0
    if args.cmd == "search":
        from .workbench.search import search
        search(args.recipe, args.data, args.trials, jobs=args.jobs, out=args.out, sampler=args.sampler,
               space=args.space, overrides=args.overrides, fraction=args.fraction, classes=args.classes,
               narrow=args.narrow, seed=args.seed, pruner=args.pruner, prune_warmup=args.prune_warmup,
               prune_startup=args.prune_startup, prune_on=args.prune_on)
        return 0
    if args.cmd == "compare":
        from .workbench.compare import compare, format_table
        rows = compare(args.runs, args.out)
        print(json.dumps(rows, indent=2) if args.json else format_table(rows) + f"\ncurves: {args.out}")
        return 0
    if args.cmd == "lr-find":
        from .workbench.lr_find import cli_lr_find
        return cli_lr_find(args)
    if args.cmd == "doctor":
        from .workbench.doctor import cli_doctor
        return cli_doctor(args)
    if args.cmd == "augment-preview":
        from .data import load_data
        from .data.augment import preview
        bundle = load_data(args.data, args.size)
        print(preview(bundle.train.x[::max(1, len(bundle.train) // 4)][:4], args.preset, args.backend, args.out))
        return 0
    if args.cmd == "pack":
        from .data.pack import pack
        meta = pack(args.data, args.out, classes=args.classes.split(",") if args.classes else None,
                    shard_bytes=int(args.shard_mb * 2**20))
        n = {k: len(v["keys"]) for k, v in meta["splits"].items()}
        print(f"packed {sum(n.values())} images ({', '.join(f'{v} {k}' for k, v in n.items())}) of "
              f"{len(meta['classes'])} classes into {args.out}; train with --data {args.out}")
        return 0
    if args.cmd == "predict":
        from .export.cli import predict_command
        return predict_command(args)
    from .fit.finetune import finetune  # lazy, as every command's modules (see _run)
    finetune(args.recipe, args.data, args.out, overwrite=args.overwrite, resume=args.resume,
             force=args.force, overrides=args.overrides, export=not args.no_export,
             budget=args.budget, quality=args.quality)
    return 0
