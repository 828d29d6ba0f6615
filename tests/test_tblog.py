"""TensorBoard histograms of real runs, read back from the event files: weights, gradients, activations."""
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from conftest import make_image_folder, random_lite0_weights
from tuneflow import finetune
from tuneflow.errors import RecipeError
from tuneflow.recipes import small_similar

# A cached head stage trained by SGD (not L-BFGS: that one has no epochs), then the top block end to end.
TINY = {"input_size": 32, "backbone": "efficientnet_lite0", "weights": random_lite0_weights(), "batch_size": 4, "precision": "float32",
        "head_solver": "sgd", "head__epochs": 2, "head__patience": 0, "finetune__epochs": 2,
        "finetune__patience": 0, "finetune__train": "top:1",
        "prefix_cache": "off"}  # the whole model on pixels; the cached prefix has its own test


def read(folder):
    """{tag: [(step, values)]} of the histograms (TF2 writes them as tensor summaries) and scalars."""
    ea = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.TENSORS: 0})
    ea.Reload()
    return {tag: [(e.step, tf.make_ndarray(e.tensor_proto)) for e in ea.Tensors(tag)] for tag in ea.Tags()["tensors"]}


def check_histograms(tags, prefix):
    found = {t: v for t, v in tags.items() if t.startswith(prefix)}
    assert found, f"no {prefix} histograms in {sorted(tags)}"
    for tag, events in found.items():
        for _, h in events:  # rows of (left edge, right edge, count)
            assert h.ndim == 2 and h.shape[1] == 3, tag
            assert np.all(np.isfinite(h)), tag
            assert h[:, 2].sum() > 0, tag
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("tb") / "d", per_class=8, size=40)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    return finetune("large_similar", data, tmp_path_factory.mktemp("tbrun") / "run", overrides=TINY, verbose=0, export=False).run_dir


def test_end_to_end_stage_has_weight_gradient_and_activation_histograms(run):
    tags = read(run / "tensorboard" / "finetune" / "histograms")
    weights = check_histograms(tags, "weights/")
    grads = check_histograms(tags, "gradients/")
    acts = check_histograms(tags, "activations/")
    # Every trainable variable has a gradient (the unfrozen block and the head).
    assert {t.split("/", 1)[1] for t in grads} == {t.split("/", 1)[1] for t in weights}
    assert any("head_classifier" in t for t in grads)
    assert any(t.startswith("gradients/") and "head" not in t for t in grads), "no backbone gradient"
    assert set(acts) == {"activations/features", "activations/head_pool"}
    assert sorted(s for s, _ in tags["weights/" + next(iter(weights)).split("/", 1)[1]]) == [0, 1]  # every epoch
    # The classifier's gradient on the fixed batch is not all zero (the loss is really differentiated).
    cls = next(t for t in grads if "head_classifier" in t and t.endswith("kernel"))
    h = grads[cls][0][1]
    assert np.abs(h[:, :2]).max() > 0


def test_cached_head_stage_logs_histograms_and_its_scalars(run):
    tags = read(run / "tensorboard" / "head" / "histograms")
    grads = check_histograms(tags, "gradients/")
    assert all("head" in t for t in grads)  # only the head trains on cached features
    # linear on SGD: the standardised features the classifier's twin trains on (then dropout, classifier)
    assert set(check_histograms(tags, "activations/")) == {"activations/features", "activations/head_standardise"}
    for scalar in ("learning_rate", "epoch_loss", "epoch_val_accuracy"):
        assert scalar in tags, sorted(tags)
        assert all(np.isfinite(v) for _, v in tags[scalar])


def test_histograms_zero_writes_none(data, tmp_path):
    out = finetune("large_similar", data, tmp_path / "run", overrides={**TINY, "tensorboard_histograms": 0},
                   verbose=0, export=False).run_dir
    assert not list((out / "tensorboard").rglob("histograms"))
    # Keras's own scalars for the end-to-end stage are still written.
    assert list((out / "tensorboard" / "finetune").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_every_n_epochs_chosen_layers_and_one_hot_labels(data, tmp_path):
    # Label smoothing: the compiled loss takes one-hot labels, and so does the fixed batch's.
    ov = {**TINY, "finetune__epochs": 3, "tensorboard_histograms": 2, "label_smoothing": 0.1,
          "tensorboard_layers": "features,block7a_project_bn,head_classifier"}
    out = finetune("large_similar", data, tmp_path / "run", overrides=ov, verbose=0, export=False).run_dir
    tags = read(out / "tensorboard" / "finetune" / "histograms")
    check_histograms(tags, "gradients/")
    acts = check_histograms(tags, "activations/")
    assert set(acts) == {"activations/features", "activations/block7a_project_bn", "activations/head_classifier"}
    # Epochs 0 and 2 (0-based, as Keras's own TensorBoard steps), not epoch 1.
    assert sorted(s for s, _ in acts["activations/features"]) == [0, 2]
    # The classifier's activations are probabilities.
    h = acts["activations/head_classifier"][0][1]
    assert h[:, 0].min() >= 0 and h[:, 1].max() <= 1


@pytest.mark.slow
def test_bf16_mixed_precision(data, tmp_path):
    out = finetune("large_similar", data, tmp_path / "run",
                   overrides={**TINY, "precision": "mixed_bfloat16"}, verbose=0, export=False).run_dir
    tags = read(out / "tensorboard" / "finetune" / "histograms")
    check_histograms(tags, "weights/")
    check_histograms(tags, "gradients/")
    check_histograms(tags, "activations/")


def test_unknown_layer_is_refused_before_training(data, tmp_path):
    with pytest.raises(RecipeError, match="no_such_layer"):
        finetune("large_similar", data, tmp_path / "run",
                 overrides={**TINY, "tensorboard_layers": "no_such_layer"}, verbose=0)


@pytest.mark.parametrize("bad", [-1, 1.5, "often"])
def test_histogram_interval_is_validated(bad):
    with pytest.raises(RecipeError, match="tensorboard_histograms"):
        small_similar.override(f"tensorboard_histograms={bad}")


def test_stage_on_cached_prefix_activations(data, tmp_path):
    """The trainer is then the model's trainable top: its backbone layers are probed on its own graph."""
    # top:1 trains Lite0's last block (top_conv, top_bn); block1a lies in the cached frozen prefix.
    ov = {**TINY, "prefix_cache": "on", "tensorboard_layers": "features,top_bn,block1a_project_bn,head_pool"}
    out = finetune("large_similar", data, tmp_path / "run", overrides=ov, verbose=0, export=False).run_dir
    tags = read(out / "tensorboard" / "finetune" / "histograms")
    grads = check_histograms(tags, "gradients/")
    assert any("top_conv" in t for t in grads)
    # block1a is not run by the trainer (its activations are cached below the cut): not logged.
    assert set(check_histograms(tags, "activations/")) == {"activations/features", "activations/top_bn",
                                                           "activations/head_pool"}


MULTI_WORKER = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from tuneflow import finetune
data, out, dump, weights = sys.argv[1:5]
finetune("large_similar", data, out, verbose=0, export=False,
         overrides=dict(input_size=32, backbone="efficientnet_lite0", weights=weights, batch_size=4, precision="float32", strategy="multiworker",
                        head__epochs=1, finetune__epochs=1, head__patience=0, finetune__patience=0, head_solver="sgd"))
"""


@pytest.mark.slow
def test_two_replicas_skip_gradients_with_one_line(tmp_path):
    from test_distribute import _free_ports, _worker_command, _workers
    _, out, cmd = _worker_command(tmp_path, MULTI_WORKER)
    codes, logs = _workers(cmd, _free_ports(2), tmp_path)
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert "gradient histograms skipped under 2 replicas" in logs[0]
    for stage in ("head", "finetune"):
        tags = read(out / "tensorboard" / stage / "histograms")
        check_histograms(tags, "weights/")
        check_histograms(tags, "activations/")
        assert not [t for t in tags if t.startswith("gradients/")]
