"""The global state a run must leave as it found it (Keras dtype policy, random states, matplotlib's backend)."""
from __future__ import annotations

import contextlib
import random
import sys

import keras
import numpy as np


@contextlib.contextmanager
def preserved_global_state():
    """Nothing global survives a run: Keras dtype policy, Python/NumPy/TensorFlow random state,
    matplotlib's backend are put back as they were."""
    import tensorflow as tf
    from tensorflow.python.eager import context
    policy = keras.mixed_precision.global_policy()
    py_state, np_state = random.getstate(), np.random.get_state()
    tf_seed = context.global_seed()
    try:
        import matplotlib
        backend = matplotlib.get_backend() if "matplotlib.pyplot" in sys.modules else None
    except ImportError:
        matplotlib, backend = None, None
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)
        random.setstate(py_state)
        np.random.set_state(np_state)
        context.set_global_seed(tf_seed)
        if tf_seed is None:
            tf.random.set_global_generator(tf.random.Generator.from_non_deterministic_state())
        if matplotlib is not None and backend is not None and matplotlib.get_backend() != backend:
            with contextlib.suppress(Exception):
                matplotlib.use(backend)
