"""The portable artifact of a run: float32 ``model.keras``, the ``model/`` SavedModel with its signatures, ``labels.json``.

What a run leaves is what its report measured (the report's validation metrics come from
running this artifact, see :mod:`tuneflow.export.evaluate`) and it stands on its own:

- ``model.keras``: the classifier, float32 whatever the training precision, taking uint8 RGB
  images of any size (``[None, None, None, 3]``): the model's own resize/crop
  (:func:`tuneflow.imageops.model_input`) and preprocessing are its first operations. Stock Keras
  layers and operations only: ``keras.models.load_model`` loads it without tuneflow.
- ``model/``: a TensorFlow SavedModel written with Keras's export API (``ExportArchive``), float32,
  with the signatures

  ================== ======================================= ==========================================
  signature          input                                   outputs
  ================== ======================================= ==========================================
  serving_default    ``images``: tf.string [None] (JPEG/PNG)  probabilities [None, K], class_ids [None],
                                                              class_names [None]
  classify_pixels    ``images``: uint8 [None, None, None, 3]  as serving_default
  embed              ``images``: tf.string [None]             embedding [None, D] (L2-normalised pooled
                                                              features), pooled, penultimate
  embed_pixels       ``images``: uint8 [None, None, None, 3]  as embed
  classify_resized   ``images``: float32 [None, S, S, 3]      as serving_default (images already
  embed_resized      ``images``: float32 [None, S, S, 3]      resized by the model's resize: batches of
                                                              mixed-size images, see Predictor)
  ================== ======================================= ==========================================

  and ``model/tuneflow.json`` (classes, input size, resize mode, backbone, recipe, embedding dims).
- ``labels.json``: ``{"0": "ants", "1": "bees"}``.

Bytes are decoded in the graph (:mod:`.graph_decode`: JPEG with the accurate IDCT at PIL's draft
scale and its EXIF orientation, PNG 8/16-bit with alpha onto white, GIF's first frame, BMP) to the
very pixels tuneflow's own clients (:class:`~tuneflow.export.predictor.Predictor`, the CLI, the
HTTP service) get from PIL (:func:`tuneflow.imageops.decode_pixels`) before they call the
``*_resized`` signatures; what the graph cannot decode so is named by
:func:`.graph_decode.graph_mismatch` and refused by the service.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from ..atomic import replace_dir
from ..imageops import model_input
from ..runs import names
from .graph_decode import decode_bytes

SAVEDMODEL_DIR = names.SAVEDMODEL
KERAS_FILE = names.KERAS
LABELS_FILE = names.LABELS
INFO_FILE = "tuneflow.json"


@dataclass
class ArtifactInfo:
    """What a client needs to know about an artifact (``model/tuneflow.json``)."""
    classes: list[str]
    input_size: int
    resize: str
    backbone: str
    recipe: str
    tap: str | None
    embedding_dim: int  # pooled backbone features
    penultimate_dim: int  # the classifier's input
    checkpoint: str = "best"
    tuneflow_version: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "ArtifactInfo":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class ArtifactModels:
    """The float32 Keras graphs of an artifact, built from a float32 twin of the trained model.

    ``feature_model``: pixels (S x S, 0..255) -> the tap's feature map; ``head``: the run's head
    (a Sequential whose first layer pools, unless it is a conv head; its last layer classifies).
    """

    def __init__(self, feature_model: keras.Model, head: keras.Model, info: ArtifactInfo):
        self.info = info
        size = info.input_size
        pixels = keras.Input((size, size, 3), dtype="float32", name="images")
        outputs = self._head_outputs(feature_model(pixels), head)
        self.core = keras.Model(pixels, outputs, name="artifact_core")
        images = keras.Input((None, None, 3), dtype="uint8", name="images")
        self.classifier = keras.Model(
            images, self._head_outputs(feature_model(model_input(images, size, info.resize)), head)["probabilities"],
            name=f"tuneflow_{info.recipe}")

    @staticmethod
    def _head_outputs(features, head) -> dict:
        layers = head.layers
        pool = layers[0] if isinstance(layers[0], keras.layers.GlobalAveragePooling2D) else None
        pooled = pool(features) if pool is not None else keras.layers.GlobalAveragePooling2D(
            name="embedding_pool")(features)
        x = pooled if pool is not None else features
        for layer in layers[1 if pool is not None else 0:-1]:
            x = layer(x)
        penultimate = x
        return {"probabilities": layers[-1](x), "pooled": pooled, "penultimate": penultimate}


def export_functions(models: ArtifactModels):
    """The artifact's endpoint functions (``tf.function``s), on one traced core network."""
    import tensorflow as tf

    info = models.info
    size = info.input_size
    core = models.core
    names = tf.constant(info.classes)

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    def run_core(images):
        return core(images, training=False)

    resize_layer = models.classifier.get_layer("resize")

    def to_input(images):  # uint8 batch of one size -> float32 S x S, whole grey levels
        return tf.round(tf.cast(resize_layer(images), tf.float32))

    def decode_one(data):  # the pixels tuneflow's own decoder gives: see .graph_decode
        return to_input(decode_bytes(data, size)[None])[0]

    def decode(images):
        return tf.map_fn(decode_one, images, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))

    def classify(x):
        out = run_core(x)
        probs = out["probabilities"]
        ids = tf.argmax(probs, axis=1, output_type=tf.int32)
        return {"probabilities": probs, "class_ids": ids, "class_names": tf.gather(names, ids)}

    def embed(x):
        out = run_core(x)
        pooled = out["pooled"]
        # x / |x| with a floor of 1e-30 (tf.math.l2_normalize floors |x| at 1e-6, which leaves
        # features of a weak model far from unit length); an all-zero vector stays zero.
        norm = tf.sqrt(tf.reduce_sum(tf.square(pooled), axis=1, keepdims=True))
        return {"embedding": pooled / tf.maximum(norm, 1e-30), "pooled": pooled,
                "penultimate": out["penultimate"]}

    s_bytes = [tf.TensorSpec([None], tf.string, name="images")]
    s_pixels = [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]
    s_resized = [tf.TensorSpec([None, size, size, 3], tf.float32, name="images")]
    return {
        "serving_default": (lambda images: classify(decode(images)), s_bytes),
        "classify_pixels": (lambda images: classify(to_input(images)), s_pixels),
        "embed": (lambda images: embed(decode(images)), s_bytes),
        "embed_pixels": (lambda images: embed(to_input(images)), s_pixels),
        "classify_resized": (lambda images: classify(images), s_resized),
        "embed_resized": (lambda images: embed(images), s_resized),
    }


def in_memory_functions(models: ArtifactModels) -> dict:
    """The endpoint functions as callables (for a checkpoint that was not exported)."""
    import tensorflow as tf
    return {name: tf.function(fn, input_signature=sig) for name, (fn, sig) in export_functions(models).items()}


def _atomic_dir(target: Path, write) -> None:
    """Write a folder next to ``target`` and rename it into place: never half a folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _atomic_file(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_artifact(models: ArtifactModels, run_dir: str | Path) -> Path:
    """Write ``model.keras``, ``model/`` (SavedModel + tuneflow.json) and ``labels.json`` into ``run_dir``."""
    import tensorflow as tf
    from keras.export import ExportArchive

    run_dir = Path(run_dir)
    info = models.info

    def savedmodel(folder):
        # Nothing is track()ed: write_out collects every variable the endpoints use, and tracking
        # the Keras models made tf.saved_model.save trace their calls again (10.4 vs 13.2 s for a
        # 32 px Lite0 artifact, two runs each; the variables and the outputs are the same)
        archive = ExportArchive()
        for name, (fn, sig) in export_functions(models).items():
            archive.add_endpoint(name, tf.function(fn), input_signature=sig)
        archive.write_out(str(folder), verbose=False)
        (Path(folder) / INFO_FILE).write_text(info.to_json())

    _atomic_dir(run_dir / SAVEDMODEL_DIR, savedmodel)
    _atomic_file(run_dir / KERAS_FILE, lambda p: models.classifier.save(p))
    labels = json.dumps({str(i): c for i, c in enumerate(info.classes)}, indent=2)
    _atomic_file(run_dir / LABELS_FILE, lambda p: Path(p).write_text(labels))
    return run_dir / SAVEDMODEL_DIR


def float32_twin(build, trained: keras.Model):
    """Build the same architecture under the float32 policy (``build()`` returns an object whose
    ``.model`` is the whole classifier) and copy the trained weights into it."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        twin = build()
    finally:
        keras.mixed_precision.set_global_policy(previous)
    weights = trained.get_weights()
    twin.model.set_weights([np.asarray(w, np.float32) if np.asarray(w).dtype.kind == "f" else w
                            for w in weights])
    return twin
