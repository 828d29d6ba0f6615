"""The run's artifact: the model the report measured, usable without tuneflow, through load/predict/embed."""
import csv
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import tuneflow
from conftest import REPO, SHARED, make_image_folder, random_lite0_weights

FAST = {"input_size": 48, "backbone": "efficientnet_lite0", "weights": random_lite0_weights(), "batch_size": 8, "precision": "float32",
        "head__epochs": 3}


def _predictions(run):
    with open(run / "val_predictions.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifact")
    # Images of several sizes and aspect ratios: the model resizes and crops them itself.
    data = make_image_folder(root / "data", classes=("cat", "dog", "owl"), per_class=8, size=60)
    for i, f in enumerate(sorted(data.rglob("*.png"))[::3]):
        Image.open(f).resize((60 + 13 * (i % 4), 60 + 7 * (i % 3))).save(f)
    res = tuneflow.finetune("small_similar", data, root / "run", overrides=FAST, verbose=0)
    return res


def test_run_folder_holds_the_portable_artifact(run):
    d = run.run_dir
    for name in ("model.keras", "labels.json", "val_predictions.csv", "model/saved_model.pb",
                 "model/tuneflow.json", "report.json", "report.md"):
        assert (d / name).exists(), name
    assert json.loads((d / "labels.json").read_text()) == {"0": "cat", "1": "dog", "2": "owl"}
    rows = _predictions(d)
    assert len(rows) == run.report["num_val"]
    assert set(rows[0]) >= {"path", "true_class", "predicted_class", "probability"}
    acc = np.mean([r["true_class"] == r["predicted_class"] for r in rows])
    assert acc == pytest.approx(run.report["val_accuracy"])
    assert "model/" in run.report["evaluated"] and "files" in run.report["evaluated"]


def test_load_predict_and_embed_reproduce_the_report(run):
    rows = _predictions(run.run_dir)
    p = tuneflow.load(run.run_dir)
    assert p.classes == ["cat", "dog", "owl"]
    out = p.predict([r["path"] for r in rows], top=2)
    for r, o in zip(rows, out):
        assert o["class"] == r["predicted_class"]
        assert o["probability"] == pytest.approx(float(r["probability"]), abs=1e-5)
        assert len(o["top"]) == 2 and o["top"][0][0] == o["class"]
    # Result gives the same object; arrays and bytes work as well as paths.
    assert run.predictor.classes == p.classes
    first = rows[0]["path"]
    pixels = np.asarray(Image.open(first).convert("RGB"))
    by_path, by_array, by_bytes = (p.predict_proba([x]) for x in (first, pixels, Path(first).read_bytes()))
    np.testing.assert_array_equal(by_path, by_array)
    np.testing.assert_array_equal(by_path, by_bytes)
    e = run.embed([r["path"] for r in rows])
    assert e.shape == (len(rows), p.embedding_dim) and p.embedding_dim == 1280
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    pen = p.embed([first], layer="penultimate", normalize=False)
    assert pen.shape == (1, p.info["penultimate_dim"])
    with pytest.raises(tuneflow.DataError, match="layer='bogus'"):
        p.embed([first], layer="bogus")
    with pytest.raises(tuneflow.DataError, match="not an image"):
        p.predict([b"definitely not an image"])


def test_batch_of_one_equals_batch_of_many(run):
    p = tuneflow.load(run.run_dir)
    paths = [r["path"] for r in _predictions(run.run_dir)]
    many = p.embed(paths, batch_size=64)
    one = np.concatenate([p.embed([x], batch_size=1) for x in paths])
    np.testing.assert_allclose(one, many, atol=1e-5)


NO_TUNEFLOW = textwrap.dedent("""
    import sys, json, csv
    sys.modules["tuneflow"] = None  # any `import tuneflow` now fails
    try:
        import tuneflow
        raise SystemExit("tuneflow was importable")
    except ImportError:
        pass
    import numpy as np, tensorflow as tf, keras
    from PIL import Image
    run = sys.argv[1]
    rows = list(csv.DictReader(open(run + "/val_predictions.csv")))
    classes = json.load(open(run + "/labels.json"))
    m = tf.saved_model.load(run + "/model")
    want = np.array([[float(r["p_" + classes[str(k)]]) for k in range(len(classes))] for r in rows])
    # bytes in (PNG: TensorFlow's decoder gives PIL's pixels), then one image at a time as uint8
    out = m.signatures["serving_default"](images=tf.constant([open(r["path"], "rb").read() for r in rows]))
    np.testing.assert_allclose(out["probabilities"].numpy(), want, atol=1e-5)
    assert [c.decode() for c in out["class_names"].numpy()] == [r["predicted_class"] for r in rows]
    for r, w in zip(rows, want):
        px = np.asarray(Image.open(r["path"]).convert("RGB"))[None]
        got = m.signatures["classify_pixels"](images=tf.constant(px))["probabilities"].numpy()
        np.testing.assert_allclose(got[0], w, atol=1e-5)
    emb = m.signatures["embed"](images=tf.constant([open(rows[0]["path"], "rb").read()]))["embedding"].numpy()
    assert abs(np.linalg.norm(emb) - 1) < 1e-5
    k = keras.models.load_model(run + "/model.keras")
    assert k.dtype_policy.name == "float32" or all(w.dtype == "float32" for w in k.weights)
    for r, w in zip(rows, want):
        px = np.asarray(Image.open(r["path"]).convert("RGB"))[None]
        np.testing.assert_allclose(k.predict(px, verbose=0)[0], w, atol=1e-5)
    print("OK", len(rows))
""")


def test_artifact_loads_and_reproduces_the_report_without_tuneflow(run, tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(NO_TUNEFLOW)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(script), str(run.run_dir)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_predict_command_prints_and_writes_csv(run, tmp_path):
    rows = _predictions(run.run_dir)
    folder = Path(rows[0]["path"]).parent
    (folder.parent / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.csv"
    cli = [str(Path(sys.executable).parent / "tuneflow")]
    r = subprocess.run(cli + ["predict", str(run.run_dir), str(folder), rows[1]["path"], "--top", "2",
                              "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(out) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(list(folder.glob("*.png"))) + 1
    by_path = {g["path"]: g for g in got}
    assert by_path[rows[1]["path"]]["class"] == rows[1]["predicted_class"]
    r = subprocess.run(cli + ["predict", str(run.run_dir), str(tmp_path / "missing.jpg")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "missing.jpg: no such file" in r.stderr and "Traceback" not in r.stderr


def test_load_from_the_last_checkpoint_and_clear_errors(run, tmp_path):
    p = tuneflow.load(run.run_dir, checkpoint="last")
    rows = _predictions(run.run_dir)
    out = p.predict_proba([r["path"] for r in rows])
    assert out.shape == (len(rows), 3) and np.allclose(out.sum(1), 1, atol=1e-5)
    with pytest.raises(tuneflow.RunError, match="does not exist"):
        tuneflow.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(tuneflow.RunError, match="no exported model"):
        tuneflow.load(tmp_path / "empty")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["strings", "onehot"])
def test_numpy_labels_as_strings_or_one_hot(tmp_path, form):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (24, 40, 40, 3)).astype(np.uint8)
    names = np.array(["zebra", "ant", "mole"])
    idx = np.arange(24) % 3
    x[idx == 1, 10:30, 10:30] = 250
    y = names[idx] if form == "strings" else np.eye(3, dtype=np.float32)[idx]
    res = tuneflow.finetune("small_similar", (x, y), tmp_path / "r", overrides=FAST, verbose=0)
    want = sorted(names) if form == "strings" else ["0", "1", "2"]
    assert res.report["classes"] == want and res.classes == want


@pytest.mark.slow
def test_a_loaded_data_bundle_and_a_recipe_file_are_accepted(tmp_path, run):
    from tuneflow.data import load_data
    data = make_image_folder(tmp_path / "d", per_class=6)
    bundle = load_data(data, 48)
    res = tuneflow.finetune(run.run_dir / "recipe.json", bundle, tmp_path / "r",
                            overrides={**FAST, "head__epochs": 1}, verbose=0)
    assert res.report["num_train"] == len(bundle.train)
    with pytest.raises(tuneflow.RecipeError, match="input_size=64"):
        tuneflow.finetune("small_similar", bundle, tmp_path / "r2", overrides={**FAST, "input_size": 64}, verbose=0)


@pytest.mark.slow
def test_nothing_global_survives_a_run(tmp_path):
    import matplotlib
    data = make_image_folder(tmp_path / "d", per_class=6)
    keras.mixed_precision.set_global_policy("mixed_float16")
    random.seed(123)
    np.random.seed(123)
    backend = matplotlib.get_backend()
    py_before, np_before = random.getstate(), np.random.get_state()[1].copy()
    try:
        tuneflow.finetune("small_similar", data, tmp_path / "r", overrides={**FAST, "head__epochs": 1}, verbose=0)
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert random.getstate() == py_before
    np.testing.assert_array_equal(np.random.get_state()[1], np_before)
    assert matplotlib.get_backend() == backend


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["mixed_bfloat16", "float32"])
def test_artifact_is_float32_whatever_the_training_precision(tmp_path, precision):
    data = make_image_folder(tmp_path / "d", per_class=8)
    res = tuneflow.finetune("large_similar", data, tmp_path / "r", verbose=0,
                            overrides={**FAST, "precision": precision, "finetune__epochs": 1})
    assert res.report["precision"] == precision
    k = keras.models.load_model(res.run_dir / "model.keras")
    assert all(layer.dtype_policy.compute_dtype == "float32" for layer in k._flatten_layers()
               if hasattr(layer, "dtype_policy"))
    rows = _predictions(res.run_dir)
    p = tuneflow.load(res.run_dir).predict([r["path"] for r in rows])
    assert [o["class"] for o in p] == [r["predicted_class"] for r in rows]
    fast = res.report["fast_path"]
    assert fast["precision"] == precision and "val_accuracy" in fast


def test_cli_prints_our_errors_as_one_line_and_shows_bugs(tmp_path):
    exe = str(Path(sys.executable).parent / "tuneflow")
    r = subprocess.run([exe, "finetune", "small_similar", "--data", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("tuneflow: error:")
    assert "Traceback" not in r.stderr
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == f"tuneflow {tuneflow.__version__}"
    # A ValueError that is not a TuneflowError is a bug: its traceback is shown.
    code = ("import sys, tuneflow.cli as c; import tuneflow.recipes as reg\n"
            "def boom(name): raise ValueError('internal bug')\n"
            "reg.get = boom\nsys.exit(c.main(['recipes', 'show', 'small_similar']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr and "internal bug" in r.stderr


@pytest.mark.slow
def test_pip_install_builds_a_working_package(tmp_path):
    """`pip install .` packages every module and the recipes (dependencies from this venv)."""
    import sysconfig
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # the deps, not tuneflow
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(REPO)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(venv / "bin" / "tuneflow"), "--version"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "tuneflow" in r.stdout, r.stderr[-2000:]
    code = ("import tuneflow, tuneflow.recipes as r, tuneflow.export.predictor, tuneflow.fit.finetune; "
            "print(tuneflow.__file__, r.NAMES)")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and str(venv) in r.stdout and "small_similar" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("recipe, dataset", [("small_similar", "ants_bees"), ("small_different", "brain_mri_yn")])
def test_real_data_report_equals_the_loaded_artifact(tmp_path, recipe, dataset):
    if not (SHARED / dataset).exists():
        pytest.skip(f"{SHARED / dataset} is absent")
    res = tuneflow.finetune(recipe, SHARED / dataset, tmp_path / "r", verbose=0)
    rows = _predictions(res.run_dir)
    assert len(rows) == res.report["num_val"]
    got = tuneflow.load(res.run_dir).predict([r["path"] for r in rows])
    assert [g["class"] for g in got] == [r["predicted_class"] for r in rows]
    acc = np.mean([g["class"] == r["true_class"] for g, r in zip(got, rows)])
    assert acc == pytest.approx(res.report["val_accuracy"])


@pytest.mark.slow
def test_export_of_another_checkpoint(run, tmp_path):
    exe = str(Path(sys.executable).parent / "tuneflow")
    r = subprocess.run([exe, "export", str(run.run_dir), "--out", str(tmp_path / "x"), "--checkpoint", "last"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "x" / "1" / "saved_model.pb").exists()
    assert not list(tmp_path.glob(".export-ckpt-*"))  # the scratch artifact is gone


def _format_zoo(folder: Path) -> dict:
    """Real files of every format the artifact's bytes signatures take, larger than the model's
    input (so JPEGs decode at a reduced DCT scale): name -> path."""
    import tensorflow as tf
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)

    def photo(w, h):
        y, x = np.mgrid[:h, :w]
        img = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1)
        return np.clip(img + rng.integers(-25, 25, img.shape), 0, 255).astype(np.uint8)
    base = Image.fromarray(photo(210, 160))
    files = {}

    def save(name, im, fmt, **kw):
        files[name] = folder / f"{name}.{fmt.lower()}"
        im.save(files[name], format=fmt, **kw)
    save("jpeg_colour", base, "JPEG", quality=85)
    save("jpeg_grey", base.convert("L"), "JPEG")
    save("jpeg_progressive", Image.fromarray(photo(430, 400)), "JPEG", progressive=True)
    for orientation in (3, 6, 8):  # rotated phone photos: the EXIF tag says how to turn them
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(f"jpeg_exif{orientation}", Image.fromarray(photo(240, 130)), "JPEG", exif=exif.tobytes())
    save("png_rgb", base, "PNG")
    save("png_grey16", Image.fromarray((photo(120, 90)[..., 0].astype(np.uint16) * 257
                                        + rng.integers(0, 257, (90, 120))).astype(np.uint16)), "PNG")
    files["png_rgb16"] = folder / "png_rgb16.png"
    files["png_rgb16"].write_bytes(tf.io.encode_png(tf.constant(
        (photo(100, 80).astype(np.uint16) * 257 + rng.integers(0, 257, (80, 100, 3))).astype(np.uint16))).numpy())
    save("png_palette", base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    save("png_palette_transparent", base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=5)
    rgba = np.asarray(base.convert("RGBA")).copy()
    rgba[..., 3] = rng.integers(0, 256, rgba.shape[:2])
    save("png_alpha", Image.fromarray(rgba, "RGBA"), "PNG")
    save("gif", base.convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    save("bmp", base, "BMP")
    save("bmp_grey", base.convert("L"), "BMP")
    return files


BYTES_NO_TUNEFLOW = textwrap.dedent("""
    import sys, json
    sys.modules["tuneflow"] = None  # any `import tuneflow` now fails
    import numpy as np, tensorflow as tf
    model, files, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    m = tf.saved_model.load(model)
    blobs = [open(f, "rb").read() for f in files]
    probs = m.signatures["serving_default"](images=tf.constant(blobs))["probabilities"].numpy()
    one_by_one = np.concatenate([m.signatures["serving_default"](images=tf.constant([b]))["probabilities"].numpy()
                                 for b in blobs])
    np.save(out, np.stack([probs, one_by_one]))
""")


@pytest.mark.slow
def test_bytes_signatures_decode_every_format_as_tuneflow_does(run, tmp_path):
    """The same pixels from the graph's decoder as from PIL, and the same predictions from
    ``serving_default`` in a process without tuneflow as from Predictor, for every format."""
    import tensorflow as tf

    from tuneflow.export.graph_decode import decode_bytes, graph_mismatch
    from tuneflow.imageops import decode_pixels
    p = tuneflow.load(run.run_dir)
    size = p.input_size
    files = _format_zoo(tmp_path / "zoo")
    graph = tf.function(lambda b: decode_bytes(b, size), input_signature=[tf.TensorSpec([], tf.string)])
    for name, path in files.items():
        with Image.open(path) as im:
            assert graph_mismatch(im) is None, name
        ours = decode_pixels(path, size=size)
        theirs = graph(tf.constant(path.read_bytes())).numpy()
        assert theirs.shape == ours.shape and np.array_equal(theirs, ours), name
    assert decode_pixels(files["jpeg_progressive"], size=size).shape == (50, 54, 3)  # 1/8 scale of 430 x 400
    assert decode_pixels(files["jpeg_exif6"], size=size).shape[:2] == (240 // 2, 130 // 2)  # turned upright
    want = p.predict_proba(list(files.values()))
    out = tmp_path / "probs.npy"
    r = subprocess.run([sys.executable, "-c", BYTES_NO_TUNEFLOW, str(run.run_dir / "model"),
                        json.dumps([str(f) for f in files.values()]), str(out)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    for got in np.load(out):
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert list(got.argmax(1)) == list(want.argmax(1))
    webp = tmp_path / "x.webp"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(webp)
    with Image.open(webp) as im:
        assert "WEBP" in graph_mismatch(im)  # the service refuses it by this name
