"""Freezing (tuneflow.backbones.freeze): frozen BatchNorm statistics stay put while the unfrozen top trains."""
import keras
import numpy as np

from conftest import fast_overrides as _fast
from tuneflow import build_backbone, finetune, save_backbone


def test_batchnorm_statistics_stay_frozen_while_fine_tuning(tmp_path, tiny_folder):
    # pretrained-style weights from a file, so that freeze_bn applies (from scratch BN must learn)
    src = build_backbone("efficientnet_lite0", weights=None, input_size=32)
    for layer in src.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.random.default_rng(0).normal(size=layer.moving_mean.shape))
    save_backbone(src, tmp_path / "w")
    res = finetune("large_similar", tiny_folder, tmp_path / "r", verbose=0, export=False,
                   overrides={**_fast("large_similar"), "weights": str(tmp_path / "w"), "finetune__lr": 0.05})
    # the last checkpoint is the end of fine-tuning (the final model may be the head stage's best)
    from tuneflow.runs.checkpoints import restore_model
    after = res.model  # the Keras model as trained, its backbone's layers at the top level
    restore_model(after, res.run_dir / "checkpoints" / "last")
    changed_conv = False
    after_layers = {layer.name: layer for layer in after.layers}
    for a in src.layers:
        b = after_layers.get(a.name)
        if b is None:
            continue
        if isinstance(a, keras.layers.BatchNormalization):
            for va, vb in zip(a.weights, b.weights):
                np.testing.assert_array_equal(np.asarray(va), np.asarray(vb), err_msg=a.name)
        elif a.name.startswith("top_conv"):
            changed_conv = not np.array_equal(np.asarray(a.kernel), np.asarray(b.kernel))
    assert changed_conv, "the unfrozen top block should have trained"
