"""Why a run's model predicted a class: Grad-CAM on the backbone's last convolutional block, and its pictures.

Grad-CAM (Selvaraju et al., 2017): the gradient of the class score (the classifier's logit,
before the softmax) with respect to the feature map of the backbone's last block, averaged over
the map's positions, weighs each channel; the weighted sum of the channels, negative parts set
to zero, is the map of where the evidence for that class lies. The feature map is the one the
head reads (the run's tap; the final block unless the recipe tapped a shallower one), so the
map explains the model the run exported: ``model.keras``, the float32 classifier.

>>> ex = Explainer.from_run("runs/photos")                      # doctest: +SKIP
>>> result = ex.explain(ex.prepare([pixels]))                   # doctest: +SKIP
>>> result.grids[0].shape, result.classes[0]                    # doctest: +SKIP
((7, 7), 3)
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from ..errors import DataError, RunError
from ..imageops import decode_pixels, resize_image
from .artifact import INFO_FILE, KERAS_FILE, SAVEDMODEL_DIR, ArtifactInfo
from .embed import list_images

COLORMAP = "jet"        # blue (no evidence) to red (most): the Grad-CAM paper's and most tools' choice
OVERLAY_ALPHA = 0.45    # share of the heatmap's colour in an overlay, the image stays readable beneath


@dataclass
class Explanation:
    """Grad-CAM of a batch: ``grids`` [N, h, w] in 0..1 (1 = the image's strongest evidence; all
    zero when no position supports the class), ``classes`` [N] the class index explained,
    ``probabilities`` [N, K] the model's answer for the same images."""
    grids: np.ndarray
    classes: np.ndarray
    probabilities: np.ndarray


class Explainer:
    """Grad-CAM for a run's float32 classifier (``model.keras``: uint8 images -> resize ->
    ``features`` sub-model -> head layers -> softmax classifier)."""

    def __init__(self, classifier: keras.Model, info: ArtifactInfo):
        import tensorflow as tf
        subs = [i for i, layer in enumerate(classifier.layers) if isinstance(layer, keras.Model)]
        if len(subs) != 1:
            raise RunError(f"{classifier.name}: expected one feature sub-model in the classifier, found "
                           f"{len(subs)}; it is not a tuneflow artifact (re-export the run).")
        self.info = info
        self.features = classifier.layers[subs[0]]
        self.head = list(classifier.layers[subs[0] + 1:])
        last = self.head[-1] if self.head else None
        if not isinstance(last, keras.layers.Dense):
            raise RunError(f"{classifier.name}: the last layer is {type(last).__name__}, not the Dense "
                           "classifier a tuneflow artifact ends with; re-export the run.")
        size = int(info.input_size)
        self._run = tf.function(self._gradcam, input_signature=[
            tf.TensorSpec([None, size, size, 3], tf.float32), tf.TensorSpec([None], tf.int32)])

    @classmethod
    def from_run(cls, run_dir) -> "Explainer":
        """The explainer of a run folder's exported model (``RUN/model.keras``)."""
        run_dir = Path(run_dir)
        path, info_path = run_dir / KERAS_FILE, run_dir / SAVEDMODEL_DIR / INFO_FILE
        if not path.is_file() or not info_path.is_file():
            raise RunError(f"{run_dir} holds no exported model ({path.name} or {SAVEDMODEL_DIR}/{INFO_FILE} "
                           "is missing); explain a finished run made by `tuneflow finetune`.")
        info = ArtifactInfo.from_dict(json.loads(info_path.read_text()))
        # the heads' own layers (MaskTolerant*Normalization) register with Keras on import
        from ..training import heads  # noqa: F401
        try:
            classifier = keras.models.load_model(path, compile=False)
        except Exception as exc:  # noqa: BLE001 - any load failure means a damaged file
            raise RunError(f"cannot load {path} ({type(exc).__name__}: {str(exc)[:200]}); re-run or "
                           "re-export the run.") from None
        return cls(classifier, info)

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    def prepare(self, images) -> np.ndarray:
        """Decoded RGB uint8 images of any sizes -> float32 [N, S, S, 3], the model's own resize."""
        s, mode = int(self.info.input_size), self.info.resize
        return np.stack([resize_image(np.asarray(im), s, mode) for im in images]).astype(np.float32)

    def _gradcam(self, x, class_ids):
        import tensorflow as tf
        with tf.GradientTape() as tape:
            fmap = self.features(x, training=False)
            tape.watch(fmap)
            h = fmap
            for layer in self.head[:-1]:
                h = layer(h, training=False)
            last = self.head[-1]
            logits = tf.matmul(h, last.kernel)
            if last.bias is not None:
                logits = logits + last.bias
            score = tf.gather(logits, class_ids, batch_dims=1)
        grads = tape.gradient(score, fmap)                       # [N, h, w, C]
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # per channel: pooled gradient
        cam = tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1))  # [N, h, w]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.where(peak > 0, cam / tf.maximum(peak, 1e-30), tf.zeros_like(cam))
        return cam, tf.nn.softmax(logits, axis=-1)

    def explain(self, batch: np.ndarray, classes=None) -> Explanation:
        """Grad-CAM of a prepared batch (float32 [N, S, S, 3]) for ``classes`` (class indices or
        names, one per image; default: each image's predicted class)."""
        import tensorflow as tf
        batch = np.asarray(batch, np.float32)
        if classes is None:
            _, probs = self._run(tf.constant(batch), tf.zeros([len(batch)], tf.int32))
            ids = np.asarray(probs).argmax(1).astype(np.int32)
        else:
            ids = np.array([self.class_index(c) for c in classes], np.int32)
            if len(ids) != len(batch):
                raise DataError(f"{len(ids)} classes for {len(batch)} images; give one class per image.")
        cam, probs = self._run(tf.constant(batch), tf.constant(ids))
        return Explanation(np.asarray(cam, np.float32), ids, np.asarray(probs, np.float32))

    def class_index(self, c) -> int:
        names = self.classes
        if isinstance(c, (int, np.integer)) and 0 <= int(c) < len(names):
            return int(c)
        if isinstance(c, str) and c in names:
            return names.index(c)
        raise DataError(f"class {c!r} is not one of this model's classes ({', '.join(names)}).")


def upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """A heatmap grid (h, w) in 0..1 -> (size, size) float32, bilinear (each cell a patch of the image)."""
    im = Image.fromarray(np.asarray(grid, np.float32), mode="F").resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(im, np.float32), 0.0, 1.0)


def heatmap_rgba(grid: np.ndarray, size: int) -> np.ndarray:
    """The heatmap as an RGBA uint8 picture (size x size): colour by :data:`COLORMAP`, opacity by
    strength, to lay over the image the model saw."""
    from matplotlib import colormaps
    v = upsample(grid, size)
    rgba = colormaps[COLORMAP](v)
    rgba[..., 3] = 0.15 + 0.7 * v
    return (rgba * 255 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, grid: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The model's view of an image (S x S uint8 RGB) blended with its heatmap -> uint8 RGB."""
    from matplotlib import colormaps
    image = np.asarray(image, np.float32)
    colour = colormaps[COLORMAP](upsample(grid, image.shape[0]))[..., :3] * 255
    return np.clip((1 - alpha) * image + alpha * colour, 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(pixels: np.ndarray) -> str:
    return base64.b64encode(png_bytes(pixels)).decode("ascii")


def overlays(explainer: Explainer, images, classes) -> list[np.ndarray]:
    """Decoded images and the class (name) to explain for each -> the model's view of each with
    its heatmap (S x S uint8 RGB): the tiles of the run's ``top_losses.png``."""
    batch = explainer.prepare(images)
    e = explainer.explain(batch, classes)
    return [overlay(b, g) for b, g in zip(batch, e.grids)]


def explanation_figure(image: np.ndarray, grid: np.ndarray, top: list, title: str = ""):
    """A figure of one explained image: the model's view, the view with its heatmap, and the top
    classes as bars (``top`` = [[name, probability], ...], best first)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.2), dpi=90, layout="constrained")
    a, b, c = fig.subplots(1, 3, width_ratios=[1, 1, 1.1])
    a.imshow(np.asarray(image, np.uint8))
    a.set_title("image (as the model sees it)", fontsize=9)
    b.imshow(overlay(image, grid))
    b.set_title(f"evidence for '{top[0][0]}'" if top else "evidence", fontsize=9)
    for ax in (a, b):
        ax.axis("off")
    names = [str(n) for n, _ in top][::-1]
    probs = [float(p) for _, p in top][::-1]
    c.barh(range(len(names)), probs, color="#3b6fb6")
    c.set_yticks(range(len(names)), names, fontsize=8)
    c.set_xlim(0, 1)
    for i, p in enumerate(probs):
        c.text(min(p + 0.02, 0.8), i, f"{p:.3f}", va="center", fontsize=8)
    c.set_title("top classes", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def explain_files(run, images, out, top: int = 3) -> list[Path]:
    """``tuneflow explain``: one overlay PNG per image file in ``out`` (``<stem>.explain.png``:
    the image, its heatmap for the predicted class, the top classes) -> the files written."""
    paths = list_images(images)
    if not paths:
        raise DataError(f"no image files in {' '.join(map(str, images))}; give image files or folders.")
    explainer = Explainer.from_run(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, seen = [], set()
    for p in paths:
        pixels = decode_pixels(p)
        batch = explainer.prepare([pixels])
        e = explainer.explain(batch)
        probs = e.probabilities[0]
        order = np.argsort(-probs, kind="stable")[:max(1, min(top, len(probs)))]
        ranked = [[explainer.classes[i], float(probs[i])] for i in order]
        name = p.stem if p.stem not in seen else f"{p.stem}-{len(written)}"
        seen.add(name)
        fig = explanation_figure(batch[0], e.grids[0], ranked, title=p.name)
        target = out / f"{name}.explain.png"
        tmp = target.with_name(target.name + ".tmp.png")
        fig.savefig(tmp)
        tmp.replace(target)
        written.append(target)
    return written


def cli_explain(args) -> int:
    """``tuneflow explain RUN IMAGES... --out DIR``."""
    files = explain_files(args.run, args.images, args.out, top=args.top)
    for f in files:
        print(f)
    print(f"tuneflow: explained {len(files)} image{'s' if len(files) != 1 else ''} -> {args.out}")
    return 0
