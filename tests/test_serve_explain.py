"""The service's new routes (tuneflow.serve.explain, .page, .card): POST /v1/explain, thumbnails by id, the page's files, the model card in /v1/info."""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from test_serve import FakePredictor, _png


def _client(*args, **kw):
    from fastapi.testclient import TestClient

    from tuneflow.serve import ServeConfig, create_app
    return TestClient(create_app(*args, cfg=kw.pop("cfg", ServeConfig(max_wait_ms=1)), **kw))


def test_explain_and_thumbnails_refuse_with_readable_errors_when_they_cannot_answer():
    with _client(FakePredictor()) as c:
        r = c.post("/v1/explain", files=[("files", ("a.png", _png()))])
        assert r.status_code == 503 and r.json()["code"] == "explain_unavailable"
        assert "explanations are unavailable for this model: RuntimeError: the server was started without" \
            in r.json()["error"]
        r = c.post("/v1/explain?class=zebra", files=[("files", ("a.png", _png()))])
        assert r.status_code == 422 and r.json()["error"] == "class='zebra' is not one of the model's classes (x, y)."
        r = c.post("/v1/explain", content=b"GIF89a", headers={"content-type": "image/gif"})
        assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
        r = c.get("/v1/index/items/0/thumbnail")
        assert r.status_code == 404 and r.json()["code"] == "no_index"
        home = c.get("/")
        assert home.status_code == 200 and '<script src="/static/app.js">' in home.text
        assert c.get("/static/style.css").headers["content-type"].startswith("text/css")
        assert c.get("/static/missing.js").json()["code"] == "not_found"
        info = c.get("/v1/info").json()
        assert info["card"] is None and info["serving"]["max_batch"] == 64  # no run folder: no card


def test_explain_answers_grid_pngs_and_the_prediction_of_the_served_model(serving_run):
    import tuneflow
    from tuneflow.export.explain import Explainer
    run, images = serving_run
    files = [sorted((images / c).glob("*.png"))[0] for c in ("a", "c")]
    upload = [("files", (f.name, f.read_bytes())) for f in files]
    with _client(tuneflow.load(run), run_dir=run, explainer=lambda: Explainer.from_run(run)) as c:
        out = c.post("/v1/explain", files=upload).json()["explanations"]
        want = c.post("/v1/classify", files=upload).json()["predictions"]
        assert len(out) == 2
        for e, p in zip(out, want):
            assert e["class"] == p["class"]  # the predicted class by default
            assert e["prediction"]["class"] == p["class"]
            np.testing.assert_allclose([q for _, q in e["prediction"]["top"]], [q for _, q in p["top"]], atol=1e-5)
            grid = np.array(e["grid"])
            assert grid.shape == tuple(e["grid_shape"]) == (2, 2) and grid.min() >= 0 and grid.max() == 1.0
            heat = Image.open(io.BytesIO(base64.b64decode(e["heatmap_png"])))
            view = Image.open(io.BytesIO(base64.b64decode(e["overlay_png"])))
            assert (heat.mode, heat.size) == ("RGBA", (64, 64)) and (view.mode, view.size) == ("RGB", (64, 64))
        other = c.post("/v1/explain?class=b", files=upload[:1]).json()["explanations"][0]
        assert other["class"] == "b" and other["probability"] == pytest.approx(
            dict(other["prediction"]["top"])["b"], abs=1e-6)
        card = c.get("/v1/info").json()["card"]
        report = json.loads((run / "report.json").read_text())
        assert card["val_accuracy"] == report["val_accuracy"] and card["majority_rate"] == report["majority_rate"]
        assert card["confusion_matrix"] == report["confusion_matrix"] and card["classes"] == ["a", "b", "c"]
        assert len(card["curves"]) == report["epochs"] and card["recipe"]["name"] == "small_similar"


def test_with_a_key_the_page_is_open_and_explain_and_thumbnails_are_not():
    from fastapi.testclient import TestClient

    from tuneflow.serve import ServeConfig, create_app
    with TestClient(create_app(FakePredictor(), ServeConfig(max_wait_ms=1), api_key="k")) as c:
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
        for r in (c.post("/v1/explain", files=[("files", ("a.png", _png()))]), c.get("/v1/index/items/0/thumbnail")):
            assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        r = c.get("/v1/index/items/0/thumbnail", headers={"Authorization": "Bearer k"})
        assert r.status_code == 404 and r.json()["code"] == "no_index"  # past the key
