"""``tuneflow export``: the run's SavedModel as is, or converted to ONNX, OpenVINO IR or TFLite, each checked against the SavedModel before it is written.

Every format is made from the artifact itself (``RUN/model``, the model the report measured),
never from a retrained or rebuilt twin. ``savedmodel`` copies it whole, with all its signatures
(see :mod:`tuneflow.export.artifact`), into ``OUT/1/``: the numbered version folder that
TensorFlow Serving expects under ``--model_base_path=OUT``. The converted formats hold one function of the
``*_resized`` signatures: float32 ``images [N, S, S, 3]`` (RGB 0..255, already resized by the
model's resize, e.g. ``tuneflow.load(run).prepare(images)``) -> ``probabilities [N, K]``,
``embedding [N, D]`` (L2-normalised), ``pooled [N, D]``, ``penultimate [N, P]``. Decoding bytes
and the antialiased resize stay outside them: the field's converters do not all carry those ops.

Before anything is written, the converted model runs on the run's validation images (up to 200,
evenly spaced, from ``val_predictions.csv``) and every output must agree with the SavedModel to
``TOLERANCE`` (absolute for outputs within [-1, 1], relative to the largest value otherwise);
otherwise the export is refused and says by how much it failed. ``export.json`` records the
figures.
"""
from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import replace_dir
from ..errors import DataError, RunError
from ..extras import optional
from ..runs import names
from .artifact import INFO_FILE, SAVEDMODEL_DIR, write_artifact
from .embed import list_images
from .predictor import load
from .restore import artifact_from_checkpoint

FORMATS = ("savedmodel", "onnx", "openvino", "tflite")
OUTPUTS = ("probabilities", "embedding", "pooled", "penultimate")
# float32 everywhere; converters reorder and fuse operations, which moves the last bits of a
# float32 (1e-7 relative per operation, ~1e-6 after a network's depth); 1e-4 leaves room for
# that and still catches a wrong op (a wrong op is off by 1e-2 or more).
TOLERANCE = 1e-4
PARITY_IMAGES = 200
ONNX_OPSET = 17
EXPORT_FILE = "export.json"
SAVEDMODEL_VERSION = "1"
OPENVINO_OUTPUTS = tuple(sorted(OUTPUTS))  # the converted model's outputs, by position


def _model_dir(run) -> Path:
    run = Path(run)
    d = run if (run / INFO_FILE).exists() else run / SAVEDMODEL_DIR
    if not (d / "saved_model.pb").is_file():
        raise RunError(f"{run} holds no exported model ({d}/saved_model.pb is missing); export needs a "
                       "finished run made by `tuneflow finetune`.")
    return d


def validation_paths(run, limit: int = PARITY_IMAGES) -> list[Path]:
    """Up to ``limit`` of the run's validation images (``val_predictions.csv``), evenly spaced."""
    f = Path(run) / names.PREDICTIONS
    if not f.is_file():
        raise RunError(f"{f} is missing, so there are no validation images to check the conversion on; "
                       "pass --parity-images FOLDER (images like the training data).")
    with open(f, newline="", encoding="utf-8") as fh:
        paths = [Path(r["path"]) for r in csv.DictReader(fh)]
    paths = [p if p.is_absolute() else Path(run) / p for p in paths]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise RunError(f"none of the validation images listed in {f} exists any more; pass "
                       "--parity-images FOLDER.")
    return _spread(paths, limit)


def _spread(paths, limit):
    if len(paths) <= limit:
        return list(paths)
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, limit)]


def _reference(loaded, x: np.ndarray, batch: int = 32) -> dict:
    """The SavedModel's own outputs for prepared images, by its ``*_resized`` signatures."""
    import tensorflow as tf
    cls, emb = loaded.signatures["classify_resized"], loaded.signatures["embed_resized"]
    parts = {k: [] for k in OUTPUTS}
    for i in range(0, len(x), batch):
        t = tf.constant(x[i:i + batch])
        out = {**{k: v.numpy() for k, v in cls(images=t).items()}, **{k: v.numpy() for k, v in emb(images=t).items()}}
        for k in OUTPUTS:
            parts[k].append(out[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _resized_function(loaded, size: int):
    """One tf.function: prepared images -> the four outputs; both signatures call the same traced
    network, which the converters' graph optimisers (and grappler) keep as one copy."""
    import tensorflow as tf
    cls, emb = loaded.signatures["classify_resized"], loaded.signatures["embed_resized"]

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    def resized(images):
        c, e = cls(images=images), emb(images=images)
        return {"probabilities": c["probabilities"], "embedding": e["embedding"],
                "pooled": e["pooled"], "penultimate": e["penultimate"]}
    return resized


def compare(ref: dict, got: dict) -> dict:
    """Per output: max |got - ref|, absolute within [-1, 1], else relative to max |ref|."""
    out = {}
    for k in OUTPUTS:
        scale = max(1.0, float(np.abs(ref[k]).max())) if ref[k].size else 1.0
        out[k] = float(np.abs(np.asarray(got[k], np.float32) - ref[k]).max() / scale) if ref[k].size else 0.0
    return out


def _run_batches(fn, x: np.ndarray, batch: int = 32) -> dict:
    parts = {k: [] for k in OUTPUTS}
    for i in range(0, len(x), batch):
        out = fn(x[i:i + batch])
        for k in OUTPUTS:
            parts[k].append(np.asarray(out[k], np.float32))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _savedmodel(model_dir, loaded, size, tmp: Path):
    import tensorflow as tf

    # OUT/1/: TensorFlow Serving reads numbered versions under --model_base_path=OUT
    shutil.copytree(model_dir, tmp / SAVEDMODEL_VERSION)
    copy = tf.saved_model.load(str(tmp / SAVEDMODEL_VERSION))  # what a user loads, read back from the copy
    return lambda x: _reference(copy, x), [SAVEDMODEL_VERSION + "/"]


def _onnx(model_dir, loaded, size, tmp: Path):
    onnx = optional("onnx", "tuneflow export --format onnx")
    ort = optional("onnxruntime", "tuneflow export --format onnx")
    tf2onnx = optional("tf2onnx", "tuneflow export --format onnx")
    fn = _resized_function(loaded, size)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=ONNX_OPSET)
    # the artifact's class-name table is captured by the classify signature but feeds no output
    # kept here; tf2onnx leaves it as a dangling string input, which runtimes would demand
    used = {i for n in proto.graph.node for i in n.input}
    for inp in [i for i in proto.graph.input if i.name not in used]:
        proto.graph.input.remove(inp)
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp / "model.onnx"))
    session = ort.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return (lambda x: dict(zip(names, session.run(None, {"images": x})))), ["model.onnx"]


def _openvino(model_dir, loaded, size, tmp: Path):
    import openvino as ov
    fn = _resized_function(loaded, size)
    model = ov.convert_model(fn)
    # outputs come in the order tf.nest flattens the dict (sorted keys: OPENVINO_OUTPUTS); the
    # converter names them after graph tensors, and two outputs may be one tensor (pooled is the
    # penultimate layer for a linear head), which then carries both names: read them by position
    assert len(model.outputs) == len(OPENVINO_OUTPUTS), [o.get_names() for o in model.outputs]
    for out, key in zip(model.outputs, OPENVINO_OUTPUTS):
        out.get_tensor().add_names({key})
    model.inputs[0].get_tensor().set_names({"images"})
    ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
    # checked at float32: on CPUs with bf16 units OpenVINO otherwise picks bf16 for speed
    compiled = ov.Core().compile_model(str(tmp / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def run(x):
        r = compiled(x)
        return {key: r[i] for i, key in enumerate(OPENVINO_OUTPUTS)}
    return run, ["model.xml", "model.bin"]


def _interpreter(content: bytes):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import warnings

        import tensorflow as tf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TF's own interpreter warns it is moving to ai_edge_litert
            return tf.lite.Interpreter(model_content=content)
    return Interpreter(model_content=content)


def _tflite(model_dir, loaded, size, tmp: Path):
    import tensorflow as tf
    fn = _resized_function(loaded, size)
    module = tf.Module()
    module.loaded = loaded  # tracks the variables the function captures
    module.resized = fn
    staging = tmp / "staging"
    tf.saved_model.save(module, str(staging), signatures={"serving_default": fn.get_concrete_function()})
    content = tf.lite.TFLiteConverter.from_saved_model(str(staging)).convert()
    shutil.rmtree(staging)
    (tmp / "model.tflite").write_bytes(content)
    runner = _interpreter(content).get_signature_runner("serving_default")
    return (lambda x: runner(images=x)), ["model.tflite"]


CONVERTERS = {"savedmodel": _savedmodel, "onnx": _onnx, "openvino": _openvino, "tflite": _tflite}


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_FILE).is_file())):
        raise RunError(f"--out {out} exists and is not an earlier tuneflow export (no {EXPORT_FILE}); "
                       "choose an empty or new folder: tuneflow does not replace what it did not write.")
    out.parent.mkdir(parents=True, exist_ok=True)


def export(run, out, fmt: str = "savedmodel", *, parity_images=None, max_images: int = PARITY_IMAGES,
           tolerance: float = TOLERANCE) -> dict:
    """Write the run's model in ``fmt`` to the folder ``out`` after checking it against the
    SavedModel on validation images -> what ``export.json`` says (files, parity, tolerance).

    ``parity_images``: image files or folders to check on instead of the run's validation images.
    Raises RunError (nothing written) when a converter fails or the parity check does."""
    import tensorflow as tf

    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    out = Path(out)
    model_dir = _model_dir(run)
    _prepare_out(out)
    predictor = load(run)
    paths = _spread(list_images(parity_images), max_images) if parity_images else validation_paths(run, max_images)
    images = []
    for p in paths:
        try:
            images.append(predictor.decode(p))
        except DataError:
            continue  # an unreadable validation image cannot be compared on; the count says how many were
    if not images:
        raise DataError(f"none of the {len(paths)} parity images could be read; pass --parity-images FOLDER.")
    x = predictor.prepare(images)
    loaded = tf.saved_model.load(str(model_dir))
    ref = _reference(loaded, x)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            run_fn, files = CONVERTERS[fmt](model_dir, loaded, predictor.input_size, tmp)
            got = _run_batches(run_fn, x)
        except Exception as exc:  # noqa: BLE001 - a converter's failure is reported, not half-written
            raise RunError(f"the {fmt} conversion of {model_dir} failed ({type(exc).__name__}: "
                           f"{str(exc)[:300]}); nothing was written. The SavedModel (--format "
                           "savedmodel) is always available.") from exc
        diffs = compare(ref, got)
        worst = max(diffs, key=diffs.get)
        top1 = float(np.mean(np.argmax(got["probabilities"], 1) == np.argmax(ref["probabilities"], 1)))
        if diffs[worst] > tolerance or top1 < 1.0:
            raise RunError(f"the {fmt} model does not reproduce the SavedModel on {len(x)} validation images: "
                           f"'{worst}' differs by {diffs[worst]:.3g} (tolerance {tolerance:g}), top-1 agreement "
                           f"{top1:.4f}; nothing was written. Use --format savedmodel, or report this conversion.")
        info = json.loads((model_dir / "tuneflow.json").read_text())
        record = {
            "format": fmt, "files": files, "source": str(model_dir.resolve()),
            "input": None if fmt == "savedmodel" else {
                "name": "images", "dtype": "float32", "shape": [None, predictor.input_size, predictor.input_size, 3],
                "pixels": f"RGB 0..255, already resized by the model's resize ({info.get('resize')}: "
                          "bilinear with antialiasing, rounded to whole grey levels), e.g. "
                          "tuneflow.load(run).prepare(images)"},
            "outputs": ["probabilities", "class_ids", "class_names", "embedding", "pooled", "penultimate"]
            if fmt == "savedmodel" else list(OUTPUTS),
            "parity": {"images": len(x), "checked_against": "SavedModel classify_resized/embed_resized",
                       "tolerance": tolerance, "max_diff": diffs, "top1_agreement": top1,
                       "rule": "max |a - b|, divided by max |SavedModel| where that exceeds 1"},
            "classes": info.get("classes"), "tuneflow_version": predictor.info.get("tuneflow_version")}
        if fmt == "openvino":
            record["outputs"] = list(OPENVINO_OUTPUTS)
            record["note"] = ("outputs by position as listed; checked with INFERENCE_PRECISION_HINT=f32 "
                              "(OpenVINO picks bf16 on CPUs that have it unless told)")
        if fmt != "savedmodel":
            (tmp / "tuneflow.json").write_text(json.dumps(info, indent=2))
        labels = {str(i): c for i, c in enumerate(info.get("classes", []))}
        (tmp / names.LABELS).write_text(json.dumps(labels, indent=2))
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        replace_dir(tmp, out)
        record["out"] = str(out)
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cli_export(args) -> int:
    """``tuneflow export RUN --out DIR [--format ...]``."""
    run = args.run
    scratch = None
    if args.checkpoint != "best":
        # Another checkpoint: its artifact is built and written like the run's own (same graphs,
        # signatures and checks), into a scratch run folder that shares the run's validation list.
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix=".export-ckpt-", dir=Path(args.out).expanduser().parent))
        write_artifact(artifact_from_checkpoint(run, args.checkpoint), scratch)
        for name in (names.PREDICTIONS, names.RECIPE, names.REPORT):
            if (Path(run) / name).exists():
                shutil.copy2(Path(run) / name, scratch / name)
        run = scratch
    try:
        r = export(run, args.out, args.format, parity_images=args.parity_images or None,
                   tolerance=args.tolerance)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    p = r["parity"]
    worst = max(p["max_diff"], key=p["max_diff"].get)
    print(f"tuneflow: exported {args.run} as {args.format} -> {r['out']} ({', '.join(r['files'])}); parity on "
          f"{p['images']} images: max diff {p['max_diff'][worst]:.2g} ({worst}) <= {p['tolerance']:g}, "
          f"top-1 agreement {p['top1_agreement']:.4f}")
    return 0
