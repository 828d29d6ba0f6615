"""TensorBoard histograms every N epochs: weights, gradients and chosen layers' activations on one fixed batch."""
from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ..errors import RecipeError
from .optim import current_lr

log = logging.getLogger("tuneflow")

BATCH = 32  # examples in the fixed batch: one forward and one backward pass per logged epoch


def fixed_batch(x, y, n: int = BATCH):
    """Up to ``n`` examples spread evenly over the split (class folders are stored in order, so the
    first ``n`` would often be one class), read once at stage start and used every logged epoch."""
    idx = np.unique(np.linspace(0, len(y) - 1, min(n, len(y))).round().astype(np.int64))
    xb = np.asarray(x[idx])
    return (xb.astype(np.float32) if xb.dtype != np.float32 else xb), np.asarray(y[idx])


def penultimate(head: keras.Model) -> str | None:
    """The head's last layer before the classifier that is not dropout (an identity when not
    training): the representation the classifier reads. None when the classifier reads the input."""
    for layer in reversed(head.layers[:-1]):
        if not isinstance(layer, (keras.layers.Dropout, keras.layers.SpatialDropout2D)):
            return layer.name
    return None


class Histograms(keras.callbacks.Callback):
    """Every ``every`` epochs, into ``log_dir``: ``weights/<variable>``, ``gradients/<variable>``
    (the compiled loss, regularisation included, on the fixed batch with dropout off and BatchNorm
    in inference mode, so nothing of the model's state or random streams changes) and
    ``activations/<layer>`` histograms, with the ``learning_rate`` scalar.

    ``front`` is the functional trainer when it runs backbone layers (the whole classifier on
    pixels, or its trainable top on cached prefix activations): the requested backbone layers it
    holds are probed on the ``backbone``'s graph from its input, or from the output of its layer
    ``start`` (where a trainable top begins), and ``features`` is the backbone's output at the tap.
    ``front=None`` when the trainer is the head on cached features (``features`` is then its
    input). ``known`` names every layer of the whole model: a requested layer this trainer does
    not run is skipped with a log line, one the model lacks is a RecipeError. ``scalars`` also
    writes the epoch's logs (loss, accuracy, val_loss, val_accuracy), for stages without Keras's
    TensorBoard callback.
    """

    def __init__(self, log_dir: Path, every: int, x, y, front: keras.Model | None, head: keras.Model,
                 layers: tuple[str, ...] = (), features=None, known=frozenset(), gradients: bool = True,
                 scalars: bool = False, backbone: keras.Model | None = None, start: str | None = None):
        super().__init__()
        self.backbone, self.start = backbone, start
        self.log_dir, self.every = Path(log_dir), every
        self.x, self.y = tf.constant(x), tf.constant(y)
        self.gradients, self.scalars = gradients, scalars
        self.head = head
        pen = penultimate(head)
        self.layers = tuple(layers) or ("features",) + ((pen,) if pen else ())
        self.writer = None
        # Built here, so that a wrong layer name is refused before training starts.
        self._probe = self._build_probe(front, features, set(known))

    def on_train_begin(self, logs=None):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = tf.summary.create_file_writer(str(self.log_dir))
        # The summary step as a variable: a Python int would be frozen into the traced function.
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._write = tf.function(self._histograms)

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _build_probe(self, front, features, known):
        """x -> {layer name: activation}: the backbone's layers through one functional model on the
        trainer's own graph, then the head's (a Sequential) layer by layer from the features."""
        head_names = {layer.name for layer in self.head.layers}
        front_names = {layer.name for layer in front.layers} - {self.head.name} if front is not None else set()
        runs = head_names | front_names | {"features"}
        unknown = [n for n in self.layers if n not in runs and n not in known]
        if unknown:
            raise RecipeError(f"tensorboard_layers={list(self.layers)!r}: no layer named {unknown} in the "
                              f"backbone or the head; head layers: {', '.join(sorted(head_names))} (backbone "
                              "layer names: model.summary() or tuneflow.build_backbone(...).layers).")
        skipped = [n for n in self.layers if n not in runs]
        if skipped:
            log.info("tensorboard: layers %s are not logged in this stage: it trains on cached activations "
                     "taken above them", skipped)
        wanted = [n for n in self.layers if n in front_names and n not in head_names]
        probe_model = None
        if front is not None:
            # On the backbone's own graph, from the tensor the trainer starts at: a model cut at an
            # intermediate tensor holds cloned nodes, so its layers' ``output`` is not in its graph.
            start = front.input if self.start is None else self.backbone.get_layer(self.start).output
            probe_model = keras.Model(start, [self.backbone.get_layer(n).output for n in wanted] + [features],
                                      name="tensorboard_probe")

        def probe(x):
            acts = {}
            if probe_model is not None:
                out = probe_model(x, training=False)
                *bb, h = out if isinstance(out, (list, tuple)) else [out]  # one output comes back bare
                acts.update(zip(wanted, bb))
            else:
                h = tf.convert_to_tensor(x)
            acts["features"] = h
            for layer in self.head.layers:
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                h = layer(h, training=False)
                if layer.name in self.layers:
                    acts[layer.name] = h
            return {n: acts[n] for n in self.layers if n in acts}
        return probe

    def on_epoch_end(self, epoch, logs=None):
        if self.writer is None:
            return
        self._step.assign(epoch)
        with self.writer.as_default(step=self._step):
            if self.scalars:
                for k, v in (logs or {}).items():
                    if k != "lr":
                        tf.summary.scalar(f"epoch_{k}", float(v))
            if epoch % self.every == 0:
                tf.summary.scalar("learning_rate", current_lr(self.model.optimizer))
                self._write(self.x, self.y)
        self.writer.flush()

    def _histograms(self, x, y):
        """Traced once per stage (a histogram op run eagerly costs ~10x more than in a graph)."""
        variables = self.model.trainable_variables
        for v in variables:
            tf.summary.histogram(f"weights/{v.path}", _f32(v))
        if self.gradients:
            with tf.GradientTape() as tape:
                pred = self.model(x, training=False)
                loss = self.model.compute_loss(x=x, y=y, y_pred=pred, training=False)
            for v, g in zip(variables, tape.gradient(loss, variables)):
                if g is not None:
                    tf.summary.histogram(f"gradients/{v.path}", _f32(g))
        for name, a in self._probe(x).items():
            tf.summary.histogram(f"activations/{name}", _f32(a))


def _f32(t):
    """Histograms of bfloat16/float16 values (mixed precision) are taken in float32."""
    return tf.cast(tf.convert_to_tensor(t), tf.float32)


def histograms_for_stage(plan, log_dir: Path, model: keras.Model, asm, train_x, train_y,
                         one_hot: int = 0, start: str | None = None) -> Histograms:
    """The callback for one stage. ``model`` is what the stage trains: the whole classifier (``train_x``
    pixels), its trainable top from the output of backbone layer ``start`` (``train_x`` the cached
    activations of the frozen prefix) or the head on cached features (``train_x`` those features);
    ``one_hot`` is the class count when the loss takes one-hot labels (label smoothing)."""
    r = plan.recipe
    x, y = fixed_batch(train_x, train_y)
    if one_hot:
        y = np.eye(one_hot, dtype=np.float32)[y]
    gradients = plan.replicas == 1
    if not gradients:
        log.info("tensorboard: gradient histograms skipped under %d replicas (weights and activations "
                 "are logged)", plan.replicas)
    on_features = asm.head not in model.layers  # the head (or its layers after pooling) on cached features
    # + the standardising layer of an SGD linear head's twin on the cache (training.standardise):
    # it exists in that stage only, so a later stage skips it instead of calling it unknown
    known = ({layer.name for layer in asm.backbone.layers} | {layer.name for layer in asm.head.layers}
             | {"head_standardise"})
    return Histograms(log_dir, r.tensorboard_histograms, x, y, None if on_features else model,
                      model if on_features else asm.head, layers=r.tensorboard_layers,
                      features=None if on_features else asm.feature_model.output, known=known,
                      gradients=gradients, scalars=on_features, backbone=asm.backbone, start=start)
