"""tuneflow: fine-tuning recipes for ImageNet-pretrained CNN backbones (Keras 3 / TensorFlow)."""
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ chatter off the console

from .tf_import import import_tensorflow_quietly as _import_tf  # noqa: E402

_import_tf()  # first, so no CUDA-probe lines reach the console on machines without an NVIDIA GPU

from .backbones import BACKBONES, build_backbone, save_backbone  # noqa: E402

from .errors import DataError, RecipeError, RunError, TuneflowError  # noqa: E402

from .version import __version__  # noqa: E402
__all__ = ["BACKBONES", "DataError", "RecipeError", "RunError", "TuneflowError", "build_backbone",
           "save_backbone", "__version__"]


def finetune(recipe, data, out=None, **kwargs):
    """Train a recipe on data; see :func:`tuneflow.fit.finetune.finetune`."""
    # lazy: `import tuneflow` stays light (no TensorFlow), and the package face sits below fit
    from .fit.finetune import finetune as _finetune
    return _finetune(recipe, data, out, **kwargs)


def load(run_dir, checkpoint: str = "best"):
    """A run's model, ready to use: ``.classes``, ``.predict(paths or arrays)``, ``.embed(...)``;
    see :func:`tuneflow.export.predictor.load`."""
    # lazy: `import tuneflow` stays light (no TensorFlow), and the package face sits below export
    from .export.predictor import load as _load
    return _load(run_dir, checkpoint)


__all__ += ["finetune", "load"]
