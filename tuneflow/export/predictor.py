"""Use a trained run: ``tuneflow.load(run_dir)`` gives a :class:`Predictor` (classes, predict, embed).

Every client of a run goes through this one object: the report's evaluation, ``tuneflow predict``,
``tuneflow embed``, the HTTP service. Images are decoded with PIL (EXIF orientation honoured; see
:func:`tuneflow.imageops.decode_pixels`), resized by the model's own resize
(:func:`tuneflow.imageops.resize_image`, bit-identical to the one inside the model), batched, and
run by the artifact's ``classify_resized`` / ``embed_resized`` functions: the SavedModel in
``RUN/model`` (for ``checkpoint="best"``, what the run exported), or the same functions built in
memory from a checkpoint (``"last"`` or a checkpoint path).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import DataError, RunError
from ..features.extractor import infer_batch
from ..imageops import decode_pixels, resize_image
from ..version import __version__
from .artifact import INFO_FILE, SAVEDMODEL_DIR, ArtifactInfo
from .restore import functions_from_checkpoint

LAYERS = ("pooled", "penultimate")


class Predictor:
    """Classify and embed images with a run's model.

    >>> p = tuneflow.load("runs/small_similar-...")          # doctest: +SKIP
    >>> p.classes                                            # doctest: +SKIP
    ['ants', 'bees']
    >>> p.predict(["ant.jpg"], top=2)                        # doctest: +SKIP
    [{'class': 'ants', 'probability': 0.97, 'top': [['ants', 0.97], ['bees', 0.03]]}]
    >>> p.embed(["ant.jpg", "bee.jpg"]).shape               # doctest: +SKIP
    (2, 1280)
    """

    def __init__(self, functions, info: ArtifactInfo, source: str = ""):
        self._fns = functions
        self.info_obj = info
        self.source = source

    @property
    def classes(self) -> list[str]:
        return list(self.info_obj.classes)

    @property
    def input_size(self) -> int:
        return int(self.info_obj.input_size)

    @property
    def resize(self) -> str:
        """The model's resize mode (``crop`` or ``squash``, :data:`tuneflow.imageops.RESIZE_MODES`)."""
        return str(self.info_obj.resize)

    @property
    def embedding_dim(self) -> int:
        return int(self.info_obj.embedding_dim)

    @property
    def info(self) -> dict:
        i = self.info_obj
        return {"backbone": i.backbone, "recipe": i.recipe, "classes": self.classes,
                "embedding_dim": i.embedding_dim, "penultimate_dim": i.penultimate_dim,
                "input_size": i.input_size, "resize": i.resize, "tap": i.tap, "checkpoint": i.checkpoint,
                "tuneflow_version": __version__, "source": self.source}

    # -- the steps, for clients that batch across requests ---------------------------------
    def decode(self, item, max_pixels: int | None = None) -> np.ndarray:
        """A path, encoded bytes or an image array -> RGB uint8 (H, W, 3), a JPEG at the DCT scale
        nearest above the model's input (:func:`tuneflow.imageops.decode_pixels`); DataError if unreadable."""
        return decode_pixels(item, max_pixels=max_pixels, size=self.input_size)

    def prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded images of any sizes -> float32 (N, S, S, 3), by the model's own resize."""
        s = self.input_size
        out = np.empty((len(images), s, s, 3), np.float32)
        for i, im in enumerate(images):
            out[i] = resize_image(im, s, self.info_obj.resize)
        return out

    def classify_prepared(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) for a prepared batch."""
        if len(batch) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.asarray(self._fns["classify_resized"](images=_tensor(batch))["probabilities"], np.float32)

    def embed_prepared(self, batch: np.ndarray, layer: str = "pooled", normalize: bool = True) -> np.ndarray:
        """Embeddings (N, D) for a prepared batch: pooled backbone features or the classifier's input."""
        if layer not in LAYERS:
            raise DataError(f"layer={layer!r}: choose one of {', '.join(LAYERS)}.")
        if len(batch) == 0:
            dim = self.embedding_dim if layer == "pooled" else self.info_obj.penultimate_dim
            return np.zeros((0, dim), np.float32)
        out = self._fns["embed_resized"](images=_tensor(batch))
        if layer == "pooled" and normalize:
            return np.asarray(out["embedding"], np.float32)
        v = np.asarray(out[layer], np.float32)
        if normalize:
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
        return v

    # -- convenience: lists of paths, bytes or arrays --------------------------------------
    def predict_proba(self, items: Iterable, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        return np.concatenate(list(self._batched(items, batch_size, progress, self.classify_prepared))
                              or [np.zeros((0, len(self.classes)), np.float32)])

    def predict(self, items: Iterable, top: int = 1, batch_size: int | None = None, progress: bool = False) -> list[dict]:
        """``[{"class": NAME, "probability": P, "top": [[NAME, P], ...]}, ...]`` in input order."""
        probs = self.predict_proba(items, batch_size, progress)
        return [self.describe(p, top) for p in probs]

    def describe(self, p: np.ndarray, top: int = 1) -> dict:
        order = np.argsort(-p, kind="stable")[:max(1, top)]
        return {"class": self.classes[order[0]], "probability": float(p[order[0]]),
                "top": [[self.classes[i], float(p[i])] for i in order]}

    def embed(self, items: Iterable, layer: str = "pooled", normalize: bool = True, batch_size: int | None = None,
              progress: bool = False) -> np.ndarray:
        dim = self.embedding_dim if layer == "pooled" else self.info_obj.penultimate_dim
        parts = list(self._batched(items, batch_size, progress,
                                   lambda b: self.embed_prepared(b, layer, normalize)))
        return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)

    @property
    def batch_size(self) -> int:
        """Images a batch when the caller gives none: 64 at 224 px, fewer for larger inputs or
        when memory is short (:func:`tuneflow.features.extractor.infer_batch`)."""
        return infer_batch(self.input_size)

    def _batched(self, items, batch_size, progress, fn):
        items = list(items)
        batch_size = batch_size or self.batch_size
        from tqdm.auto import tqdm
        bar = tqdm(total=len(items), unit="img", disable=not progress, leave=False)
        for i in range(0, len(items), batch_size):
            chunk = [self.decode(x) for x in items[i:i + batch_size]]
            yield fn(self.prepare(chunk))
            bar.update(len(chunk))
        bar.close()


def _tensor(batch):
    import tensorflow as tf
    return tf.constant(np.asarray(batch, np.float32))


def _read_info(model_dir: Path) -> ArtifactInfo:
    path = model_dir / INFO_FILE
    try:
        return ArtifactInfo.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise RunError(f"{model_dir} is not a tuneflow model folder: {INFO_FILE} is missing. Pass a run "
                       "folder (with model/) or the model/ folder a run exported.") from None
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(f"{path} is unreadable ({exc}); re-export the run (tuneflow export) or "
                       "re-run it.") from None


def load(run_dir: str | Path, checkpoint: str = "best") -> Predictor:
    """The model of a run, ready to classify and embed images.

    Args:
      run_dir: a run folder (``runs/NAME``), or the ``model/`` SavedModel folder of one.
      checkpoint: ``"best"`` (the exported artifact: what the report measured), ``"last"`` (the
        newest checkpoint) or a checkpoint path (``RUN/checkpoints/last/ckpt-7``).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunError(f"{run_dir} does not exist; pass a run folder made by `tuneflow finetune`.")
    model_dir = run_dir if (run_dir / INFO_FILE).exists() else run_dir / SAVEDMODEL_DIR
    if checkpoint == "best":
        if not (model_dir / "saved_model.pb").exists():
            raise RunError(f"{run_dir} holds no exported model ({model_dir}/saved_model.pb is missing): "
                           "the run did not finish, or it predates tuneflow 0.2. Use checkpoint='last' "
                           "to load its newest checkpoint, or re-run it.")
        info = _read_info(model_dir)
        import tensorflow as tf
        try:
            loaded = tf.saved_model.load(str(model_dir))
        except Exception as exc:  # noqa: BLE001 - any load failure means a damaged artifact
            raise RunError(f"The SavedModel in {model_dir} cannot be loaded ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); it is damaged: re-run or re-export the run.") from None
        fns = {name: loaded.signatures[name] for name in ("classify_resized", "embed_resized")
               if name in loaded.signatures}
        if len(fns) < 2:
            raise RunError(f"The SavedModel in {model_dir} lacks tuneflow's signatures "
                           f"(found {sorted(loaded.signatures)}); re-export the run.")
        predictor = Predictor(fns, info, str(model_dir))
        predictor._loaded = loaded  # keeps the restored variables alive
        return predictor
    fns, info = functions_from_checkpoint(run_dir, checkpoint)
    return Predictor(fns, info, f"{run_dir} ({checkpoint})")
