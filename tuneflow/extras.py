"""Optional dependencies, grouped as the package's extras (``pip install 'tuneflow[serve]'``).

The core install trains, predicts and exports a SavedModel. A command that needs more asks here,
and a missing package is one line naming the extra to install, not an ImportError traceback.
"""
from __future__ import annotations

import importlib
import importlib.util

from .errors import MissingExtraError

# extra -> the modules it provides (import names; setup.cfg's [options.extras_require] lists the packages)
EXTRAS = {
    "serve": ("fastapi", "starlette", "uvicorn", "multipart", "orjson", "prometheus_client", "faiss", "pyarrow"),
    "search": ("optuna",),
    "export": ("tf2onnx", "onnx", "onnxruntime"),
    "tfds": ("tensorflow_datasets",),
}


def _extra_of(module: str) -> str:
    top = module.split(".")[0]
    return next((e for e, mods in EXTRAS.items() if top in mods), "")


def _message(modules: list[str], extra: str, what: str) -> str:
    return (f"{what} needs {', '.join(modules)}, which {'is' if len(modules) == 1 else 'are'} not installed: "
            f"pip install 'tuneflow[{extra}]' (or `make install`, which installs every extra).")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed package counts as missing
        return False


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``extra`` is importable; ``what`` is
    the command or feature that needs it (``"tuneflow serve"``)."""
    missing = [m for m in EXTRAS[extra] if not _installed(m)]
    if missing:
        raise MissingExtraError(_message(missing, extra, what))


def optional(module: str, what: str):
    """``import module`` for an optional dependency; a missing one is a :class:`MissingExtraError`
    naming its extra. ``what``: the command or feature that needs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        extra = _extra_of(module)
        if not extra or (exc.name and exc.name.split(".")[0] != module.split(".")[0]):
            raise
        raise MissingExtraError(_message([module.split(".")[0]], extra, what)) from None
