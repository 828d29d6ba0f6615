"""The training input pipeline (tuneflow.data.pipeline): class weights reach the loss."""
import keras
import numpy as np


def test_class_weights_reach_the_loss():
    from tuneflow.data import Split
    from tuneflow.data.pipeline import class_weights, train_dataset
    rng = np.random.default_rng(0)
    y = np.array([0] * 18 + [1] * 2)
    x = rng.integers(0, 3, (20, 4, 4, 3)).astype(np.uint8)  # small inputs: no saturated softmax
    w = class_weights(y, 2, "balanced")
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    probs = model.predict(x.astype(np.float32), verbose=0)
    per = -np.log(probs[np.arange(20), y])
    ds = train_dataset(Split(x, y), 20, weights=w)
    weighted = model.fit(ds, epochs=1, verbose=0).history["loss"][0]
    plain = model.fit(train_dataset(Split(x, y), 20), epochs=1, verbose=0).history["loss"][0]
    np.testing.assert_allclose(weighted, np.sum(w[y] * per) / 20, rtol=1e-4)
    np.testing.assert_allclose(plain, per.mean(), rtol=1e-4)
    assert abs(weighted - plain) > 1e-3
