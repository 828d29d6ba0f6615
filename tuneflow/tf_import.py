"""TensorFlow imported once, without the CUDA-probe lines it prints on machines with no NVIDIA GPU.

TensorFlow's pip wheel probes CUDA on import and on its first device query, and writes straight to
file descriptor 2 from C++: ``failed call to cuInit`` (an ERROR line, so ``TF_CPP_MIN_LOG_LEVEL=2``
keeps it), ``Could not find cuda drivers`` and other INFO lines printed before absl logging is set
up (so no log level filters them). ``CUDA_VISIBLE_DEVICES=""`` does not stop them either (measured
with TensorFlow 2.21: the cuInit line stays). So on a machine without ``/dev/nvidia*`` the import
and the device probe run with descriptor 2 captured, and every captured line is written back
except that noise: the CUDA lines, and the INFO/WARNING lines ``TF_CPP_MIN_LOG_LEVEL`` asks to hide.
"""
from __future__ import annotations

import glob
import os
import re
import sys
import tempfile

_PREFIX = re.compile(r"^([IWE])\d{4} ")  # absl's "I0000 00:00:..." line prefix
_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def has_nvidia_device() -> bool:
    """True when the machine shows an NVIDIA GPU (``/dev/nvidia0``, ``/dev/nvidia3``, ...)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def is_noise(line: str, level: int) -> bool:
    """A line TensorFlow prints at import on a machine without a GPU that tells the user nothing."""
    if line.startswith(_BANNER):
        return True
    m = _PREFIX.match(line)
    if not m:
        return False
    if re.search(r"cuInit|cuda|CUDA", line):  # about a GPU this machine does not have
        return True
    return level >= {"I": 1, "W": 2, "E": 3}[m[1]]


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (and run its CUDA probe) dropping the noise lines; does nothing when a GPU
    is present, TensorFlow is already imported or descriptor 2 cannot be redirected."""
    if has_nvidia_device() or "tensorflow" in sys.modules:
        return
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices("GPU")  # the cuInit probe prints here, not at import
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            kept = [ln for ln in text.splitlines(keepends=True) if not is_noise(ln, level)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
