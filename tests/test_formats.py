"""tuneflow export: SavedModel for TF Serving (signature and a real PredictRequest), ONNX, OpenVINO and TFLite checked for parity, refused when they disagree."""
import base64
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from tuneflow.errors import RunError


def _val(run):
    import csv
    with open(run / "val_predictions.csv", newline="") as f:
        return [r["path"] for r in csv.DictReader(f)]


@pytest.mark.slow
def test_savedmodel_export_answers_a_tf_serving_predict_request(serving_run, tmp_path):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    import tuneflow
    run, _ = serving_run
    out = subprocess.run([sys.executable, "-m", "tuneflow", "export", str(run), "--out", str(tmp_path / "sm")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads((tmp_path / "sm" / "export.json").read_text())
    assert record["files"] == ["1/"] and record["parity"]["max_diff"]["embedding"] == 0.0
    assert json.loads((tmp_path / "sm" / "labels.json").read_text()) == {"0": "a", "1": "b", "2": "c"}

    # what tensorflow_model_server does with a gRPC PredictRequest: the named signature, fed the
    # request's TensorProto, answering TensorProtos
    val = _val(run)[:5]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tuneflow"
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([open(p, "rb").read() for p in val]))
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())  # over the wire
    model = tf.saved_model.load(str(tmp_path / "sm" / "1"))
    fn = model.signatures[request.model_spec.signature_name]
    assert set(fn.structured_input_signature[1]) == set(request.inputs)
    outputs = {k: tf.make_tensor_proto(v) for k, v in
               fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}).items()}
    predictor = tuneflow.load(run)
    ref = predictor.predict_proba(val)
    np.testing.assert_allclose(tf.make_ndarray(outputs["probabilities"]), ref, atol=1e-5)
    assert [n.decode() for n in tf.make_ndarray(outputs["class_names"])] == \
        [predictor.classes[i] for i in ref.argmax(1)]
    # the REST form ({"instances": [{"b64": ...}]}) carries the same bytes
    rest = {"signature_name": "embed", "instances": [{"b64": base64.b64encode(open(p, "rb").read()).decode()}
                                                     for p in val]}
    blobs = [base64.b64decode(i["b64"]) for i in rest["instances"]]
    emb = model.signatures[rest["signature_name"]](images=tf.constant(blobs))["embedding"].numpy()
    assert np.abs(emb - predictor.embed(val)).max() <= 1e-5


@pytest.mark.slow
def test_onnx_openvino_tflite_exports_match_the_savedmodel(serving_run, tmp_path):
    import onnxruntime as ort
    import openvino as ov

    import tuneflow
    from tuneflow.export.formats import OPENVINO_OUTPUTS, export
    run, _ = serving_run
    predictor = tuneflow.load(run)
    x = predictor.prepare([predictor.decode(p) for p in _val(run)])
    probs = predictor.classify_prepared(x)
    emb = predictor.embed_prepared(x)
    for fmt in ("onnx", "openvino", "tflite"):
        record = export(run, tmp_path / fmt, fmt)
        assert record["parity"]["images"] == len(x) and max(record["parity"]["max_diff"].values()) <= 1e-4
        assert record["input"]["shape"] == [None, 64, 64, 3]
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    # each written file, loaded by its own runtime, reproduces the run's predictor
    s = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"images": x})))
    assert np.abs(got["probabilities"] - probs).max() <= 1e-4 and np.abs(got["embedding"] - emb).max() <= 1e-4
    compiled = ov.Core().compile_model(str(tmp_path / "openvino" / "model.xml"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    r = compiled(x)
    got = {k: r[i] for i, k in enumerate(OPENVINO_OUTPUTS)}
    assert np.abs(got["probabilities"] - probs).max() <= 1e-4 and np.abs(got["embedding"] - emb).max() <= 1e-4
    from tuneflow.export.formats import _interpreter
    runner = _interpreter((tmp_path / "tflite" / "model.tflite").read_bytes()).get_signature_runner("serving_default")
    got = runner(images=x)
    assert np.abs(got["probabilities"] - probs).max() <= 1e-4 and np.abs(got["embedding"] - emb).max() <= 1e-4


@pytest.mark.slow
def test_export_refuses_a_conversion_that_disagrees_and_writes_nothing(serving_run, tmp_path, monkeypatch):
    from tuneflow.export import formats
    run, images = serving_run
    real = formats.CONVERTERS["savedmodel"]

    def off_by_a_bit(model_dir, loaded, size, tmp):
        fn, files = real(model_dir, loaded, size, tmp)
        return (lambda x: {k: v + 1e-3 if k == "embedding" else v for k, v in fn(x).items()}), files
    monkeypatch.setitem(formats.CONVERTERS, "savedmodel", off_by_a_bit)
    with pytest.raises(RunError, match=r"'embedding' differs by 0.001.*nothing was written"):
        formats.export(run, tmp_path / "bad", "savedmodel", parity_images=[images / "a"])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(RunError, match="not an earlier tuneflow export"):
        formats.export(run, tmp_path / "mine", "savedmodel")
