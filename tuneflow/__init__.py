"""tuneflow: fine-tuning recipes for ImageNet-pretrained CNN backbones (Keras 3 / TensorFlow)."""
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ chatter off the console

from .backbones import BACKBONES, build_backbone, save_backbone  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BACKBONES", "build_backbone", "save_backbone", "__version__"]


def finetune(recipe, data, out=None, **kwargs):
    """Train a recipe on data; see :func:`tuneflow.training.finetune.finetune`."""
    from .training.finetune import finetune as _finetune
    return _finetune(recipe, data, out, **kwargs)


__all__ += ["finetune"]
