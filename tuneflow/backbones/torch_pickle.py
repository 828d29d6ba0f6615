"""Read a legacy (pre-1.6, non-zip) PyTorch ``state_dict`` file without torch.

The file is a sequence of pickles: a magic number, a protocol version, system
info, the state dict itself (tensors refer to storages through persistent ids),
the list of storage keys, and then each storage's raw bytes (an int64 element
count followed by the data).  Unpickling runs only a whitelist of four names:
an arbitrary ``.pth`` file is code, and we refuse to execute it.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from ..errors import TuneflowError

_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(TuneflowError, pickle.UnpicklingError):
    """The file names a global that a plain tensor state dict never needs."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _StorageRef:
    def __init__(self, storage_type: _StorageType, key: str, numel: int):
        self.dtype = storage_type.dtype
        self.key = key
        self.numel = numel


class _TensorRef:
    """A tensor view on a storage that is read later in the file."""

    def __init__(self, storage: _StorageRef, offset: int, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
_ALLOWED.update({("torch", n): _StorageType(n) for n in _STORAGE_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in sorted(_ALLOWED) if m != "torch")
            raise UnsafePickleError(
                f"{self.source} asks to load '{module}.{name}', which a tensor state dict "
                f"never needs; refusing to run it. Only {allowed} and torch.*Storage are "
                "admitted. Re-save the weights as a plain state_dict (torch.save(model."
                "state_dict(), path)) or convert them with a trusted tool."
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"{self.source}: unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"{self.source}: storage of unknown type {storage_type!r}")
        ref = self.storages.setdefault(key, _StorageRef(storage_type, key, numel))
        return ref


def load_legacy_state_dict(path: str | Path) -> "collections.OrderedDict[str, np.ndarray]":
    """Return ``{name: ndarray}`` from a legacy PyTorch ``.pth`` file.

    Strides are honoured, so tensors saved as non-contiguous views come out right.

    >>> sd = load_legacy_state_dict("model.pth")  # doctest: +SKIP
    >>> sd["_conv_stem.weight"].shape              # doctest: +SKIP
    (32, 3, 3, 3)
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"PK":
        raise ValueError(
            f"{path} is a zip-format PyTorch file (torch>=1.6); this reader handles the "
            "legacy format only. Re-save it with torch.save(..., _use_new_zipfile_serialization=False)."
        )
    f = io.BytesIO(data)
    source = str(path)
    try:
        magic = _RestrictedUnpickler(f, source).load()
        if magic != _MAGIC:
            raise ValueError(f"{path} is not a legacy PyTorch file (magic number {magic!r}).")
        _RestrictedUnpickler(f, source).load()  # protocol version
        _RestrictedUnpickler(f, source).load()  # sys info: endianness, type sizes
        unpickler = _RestrictedUnpickler(f, source)
        state = unpickler.load()
        keys = _RestrictedUnpickler(f, source).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, struct.error) as exc:
        raise ValueError(f"{path} is truncated or not a PyTorch state dict: {exc}") from exc
    buffers: dict[str, np.ndarray] = {}
    for key in keys:
        ref = unpickler.storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * ref.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"{path} is truncated: storage {key} needs {nbytes} bytes, got {len(raw)}.")
        buffers[key] = np.frombuffer(raw, dtype=ref.dtype)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict.")
    out: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()
    for name, t in state.items():
        if not isinstance(t, _TensorRef):
            continue
        buf = buffers[t.storage.key]
        item = buf.itemsize
        view = np.lib.stride_tricks.as_strided(
            buf[t.offset:], shape=t.size, strides=[s * item for s in t.stride], writeable=False
        )
        out[name] = np.array(view, copy=True, order="C")
    return out
