"""Where tuneflow keeps what it computes once per machine: ``$TUNEFLOW_HOME`` (default
``$KERAS_HOME/tuneflow``, i.e. ``~/.keras/tuneflow``) with ``weights/`` (converted ImageNet
weights), ``features/`` (the frozen-feature cache) and ``openvino/`` (checked conversions)."""
from __future__ import annotations

import os
from pathlib import Path


def tuneflow_home() -> Path:
    return Path(os.environ.get("TUNEFLOW_HOME") or os.path.join(
        os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "tuneflow"))
