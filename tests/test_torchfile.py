"""minidiff.torchfile: a safe reader of PyTorch weight files (zip format and legacy stream).

Round trips use torch (the compat extra; skipped without it, a failure under CI=true); the
booby traps and damaged files that can be built by hand are built without torch, so the
refusals are checked on every machine.
"""
import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import compat_import
from minidiff import torchfile
from minidiff.torchfile import UnsafeFileError

FORMATS = ["zip", "legacy"]


@pytest.fixture
def torch():
    return compat_import("torch")


def _save(torch, obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def _expected(t):
    """What the reader must give for tensor t: a numpy array (bfloat16 widened to float32)."""
    import torch as _torch
    t = t.detach()
    return t.float().numpy() if t.dtype == _torch.bfloat16 else t.numpy()


def _assert_same(got, t):
    exp = _expected(t)
    assert isinstance(got, np.ndarray)
    assert got.dtype == exp.dtype
    assert got.shape == exp.shape
    assert np.array_equal(got, exp, equal_nan=got.dtype.kind == "f")
    # bit-exact for floats (NaN payloads, signed zeros)
    assert got.tobytes() == np.ascontiguousarray(exp).tobytes()
    assert got.flags.c_contiguous and got.flags.writeable and got.flags.owndata


def _random_tensor(torch, gen, dtype, shape):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * 100
        return t.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


DTYPE_NAMES = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]


# ---------------------------------------------------------------- round trips (torch)

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_round_trips_bit_exactly(torch, tmp_path, fmt):
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name in DTYPE_NAMES:
        dtype = getattr(torch, name)
        sd[name] = _random_tensor(torch, gen, dtype, (3, 5))
        sd[name + "_scalar"] = _random_tensor(torch, gen, dtype, ())
        sd[name + "_empty"] = _random_tensor(torch, gen, dtype, (0, 4))
    sd["float32_special"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    got = torchfile.load(_save(torch, sd, tmp_path / "w.pt", fmt))
    assert isinstance(got, dict) and list(got) == list(sd)
    for k, t in sd.items():
        _assert_same(got[k], t)
    assert got["bfloat16"].dtype == np.float32
    assert got["float32_scalar"].shape == () and got["int8_empty"].shape == (0, 4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_contiguous_and_shared_storage(torch, tmp_path, fmt):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = {
        "transposed": base.t(),
        "stepped": base[1::2, ::3],
        "row": base[4],                 # a view with an offset
        "col": base[:, 7],              # offset and stride
        "flat_tail": base.view(-1)[37:],
        "base": base,
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),   # stride 0
        "half_t": torch.randn(4, 3).half().t(),
    }
    got = torchfile.load(_save(torch, sd, tmp_path / "w.pt", fmt))
    for k, t in sd.items():
        _assert_same(got[k], t)
    # views of one storage are independent copies
    got["row"][0] = -1
    assert got["base"][4, 0] == 40 and got["flat_tail"][3] == 40


@pytest.mark.parametrize("fmt", FORMATS)
def test_nested_containers(torch, tmp_path, fmt):
    a, b, c = torch.randn(2, 3), torch.arange(5), torch.ones(2, dtype=torch.bool)
    obj = {"model": {"layer": {"w": a}}, "list": [b, 3, "x", None], "tuple": (c, 1.5, (a[0],)),
           "step": 7, "name": "run", "flag": True}
    got = torchfile.load(_save(torch, obj, tmp_path / "w.pt", fmt))
    _assert_same(got["model"]["layer"]["w"], a)
    assert isinstance(got["list"], list) and got["list"][1:] == [3, "x", None]
    _assert_same(got["list"][0], b)
    assert isinstance(got["tuple"], tuple) and got["tuple"][1] == 1.5 and isinstance(got["tuple"][2], tuple)
    _assert_same(got["tuple"][0], c)
    _assert_same(got["tuple"][2][0], a[0])
    assert (got["step"], got["name"], got["flag"]) == (7, "run", True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict(torch, tmp_path, fmt):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    model.train()
    model[1](torch.randn(2, 4, 5, 5))   # moves running stats and num_batches_tracked
    sd = model.state_dict()
    assert hasattr(sd, "_metadata")
    path = _save(torch, sd, tmp_path / "w.pt", fmt)
    got = torchfile.load(path)
    assert isinstance(got, collections.OrderedDict) and list(got) == list(sd)
    for k, t in sd.items():
        _assert_same(got[k], t)
    assert got["1.num_batches_tracked"].dtype == np.int64 and got["1.num_batches_tracked"] == 1
    flat = torchfile.load_state_dict(path)
    assert type(flat) is dict and list(flat) == list(sd)


@pytest.mark.parametrize("fmt", FORMATS)
def test_parameter_saved_directly(torch, tmp_path, fmt):
    p = torch.nn.Parameter(torch.randn(3, 4))
    got = torchfile.load(_save(torch, p, tmp_path / "p.pt", fmt))
    _assert_same(got, p)
    got = torchfile.load(_save(torch, {"p": p, "q": torch.nn.Parameter(torch.zeros(2), requires_grad=False)},
                               tmp_path / "d.pt", fmt))
    _assert_same(got["p"], p)
    assert np.array_equal(got["q"], np.zeros(2, np.float32))


_TORCH_DTYPES = st.sampled_from(DTYPE_NAMES)


@st.composite
def _strided_tensors(draw):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    steps = tuple(draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim)))
    perm = draw(st.permutations(range(ndim)))
    offset = draw(st.integers(0, 3))
    return draw(_TORCH_DTYPES), shape, steps, perm, offset, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None)
@given(_strided_tensors())
def test_random_strided_tensors_round_trip_zip(tmp_path_factory, spec):
    torch = compat_import("torch")
    name, shape, steps, perm, offset, seed = spec
    gen = torch.Generator().manual_seed(seed)
    big_shape = tuple(n * s for n, s in zip(shape, steps))
    big = _random_tensor(torch, gen, getattr(torch, name), (offset + 1,) + big_shape)
    t = big[offset]
    if shape:
        t = t[tuple(slice(None, None, s) for s in steps)].permute(*perm)
    path = tmp_path_factory.mktemp("hyp") / "t.pt"
    got = torchfile.load(_save(torch, {"t": t, "big": big}, path, "zip"))
    _assert_same(got["t"], t)
    _assert_same(got["big"], big)


# ---------------------------------------------------------------- hand-made files (no torch)

class G:
    """A global written as GLOBAL 'module\\nname' by _Pickler (needs no importable target)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *a):  # pickle's save_reduce wants a callable
        raise AssertionError("never called")


class Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Storage:
    def __init__(self, name, key, numel):
        self.name, self.key, self.numel = name, key, numel


class _Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_g(self, obj):
        self.write(pickle.GLOBAL + obj.module.encode() + b"\n" + obj.name.encode() + b"\n")

    dispatch[G] = _save_g

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", G("torch", obj.name), obj.key, "cpu", obj.numel)
        return None


def _dumps(obj):
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def tensor(storage, offset, size, stride):
    return Reduce(G("torch._utils", "_rebuild_tensor_v2"),
                  (storage, offset, tuple(size), tuple(stride), False, Reduce(G("collections", "OrderedDict"), ())))


def write_zip(path, data_pkl, records=None, prefix="archive"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        for key, raw in (records or {}).items():
            z.writestr(f"{prefix}/data/{key}", raw)
        z.writestr(f"{prefix}/version", "3\n")
    return path


def write_legacy(path, obj_pkl, records=None, keys=None):
    records = records or {}
    out = [pickle.dumps(torchfile.MAGIC_NUMBER, protocol=2), pickle.dumps(torchfile.PROTOCOL_VERSION, protocol=2),
           pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2), obj_pkl,
           pickle.dumps(list(records) if keys is None else keys, protocol=2)]
    for key, (numel, raw) in records.items():
        out.append(struct.pack("<q", numel) + raw)
    with open(path, "wb") as f:
        f.write(b"".join(out))
    return path


def write(fmt, path, obj_pkl, arrays=None):
    """A file of format fmt: the pickle obj_pkl and one storage record per numpy array."""
    arrays = arrays or {}
    if fmt == "zip":
        return write_zip(path, obj_pkl, {k: a.astype(a.dtype.newbyteorder("<")).tobytes() for k, a in arrays.items()})
    return write_legacy(path, obj_pkl, {k: (a.size, a.tobytes()) for k, a in arrays.items()})


@pytest.mark.parametrize("fmt", FORMATS)
def test_hand_made_file_reads(tmp_path, fmt):
    """The hand-made writer is right (so the refusals below are refusals of the trap alone)."""
    s = Storage("FloatStorage", "0", 12)
    obj = {"w": tensor(s, 2, (2, 3), (1, 2)), "n": 5}
    arr = np.arange(12, dtype=np.float32)
    got = torchfile.load(write(fmt, tmp_path / "ok.pt", _dumps(obj), {"0": arr}))
    assert np.array_equal(got["w"], [[2, 4, 6], [3, 5, 7]])
    assert got["n"] == 5


# ---------------------------------------------------------------- booby traps

MARKER_GLOBALS = [("posix", "system"), ("builtins", "exec"), ("builtins", "open"), ("builtins", "eval"),
                  ("subprocess", "Popen"), ("torch", "load"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
                  ("collections", "Counter"), ("numpy", "frombuffer")]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("module,name", MARKER_GLOBALS)
def test_refuses_globals_next_to_real_tensors(tmp_path, fmt, module, name):
    marker = tmp_path / "pwned"
    s = Storage("FloatStorage", "0", 4)
    trap = Reduce(G(module, name), (f"touch {marker}",))
    obj = {"w": tensor(s, 0, (4,), (1,)), "trap": trap}
    path = write(fmt, tmp_path / "trap.pt", _dumps(obj), {"0": np.ones(4, np.float32)})
    with pytest.raises(UnsafeFileError, match=rf"{module}\.{name}") as e:
        torchfile.load(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


class _Touch:
    """Unpickling this would create its marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class _TouchExec:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


class _TouchOpen:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("trap,refused", [(_Touch, os.system.__module__ + ".system"), (_TouchExec, r"(__builtin__|builtins)\.exec"),
                                          (_TouchOpen, r"(__builtin__|builtins|io)\.open")])
def test_torch_saved_booby_trap(torch, tmp_path, fmt, trap, refused):
    marker = tmp_path / "pwned"
    sd = {"a": torch.randn(3), "trap": trap(marker), "b": torch.arange(4)}
    path = _save(torch, sd, tmp_path / "trap.pt", fmt)
    assert not marker.exists()
    with pytest.raises(UnsafeFileError, match=refused) as e:
        torchfile.load(path)
    assert str(path) in str(e.value)
    with pytest.raises(UnsafeFileError):
        torchfile.load_state_dict(path)
    assert not marker.exists()


class Innocent:
    """A plain class: its instance pickles (protocol 4) with STACK_GLOBAL and NEWOBJ."""

    def __init__(self):
        self.x = 1


# Hand-assembled protocol-0/1 pickles: INST names its class inline; OBJ takes it from the stack.
INST_PICKLE = b"(S'echo hi'\nios\nsystem\n."
OBJ_PICKLE = b"(cos\nsystem\nS'echo hi'\no."
OBJ_SAFE_GLOBAL = b"(ccollections\nOrderedDict\no."   # OBJ refused even with an allowed global


def _stack_global_reduce(marker):
    return pickle.dumps(_Touch(marker), protocol=4)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["INST", "OBJ", "OBJ_SAFE", "NEWOBJ", "STACK_GLOBAL", "STACK_GLOBAL_REDUCE",
                                  "NEWOBJ_EX", "EXT1"])
def test_refuses_opcodes(tmp_path, fmt, case):
    marker = tmp_path / "pwned"
    data, expect = {
        "INST": (INST_PICKLE, "INST"),
        "OBJ": (OBJ_PICKLE, "OBJ"),
        "OBJ_SAFE": (OBJ_SAFE_GLOBAL, "OBJ"),
        "NEWOBJ": (pickle.dumps(Innocent(), protocol=2), "NEWOBJ"),
        "STACK_GLOBAL": (pickle.dumps(os.system, protocol=4), os.system.__module__ + r"\.system"),
        "STACK_GLOBAL_REDUCE": (_stack_global_reduce(marker), os.system.__module__ + r"\.system"),
        "NEWOBJ_EX": (b"\x80\x04\x8c\x0bcollections\x8c\x0bOrderedDict\x93)}\x92.", "NEWOBJ_EX"),
        "EXT1": (b"\x80\x02\x82\x01.", "EXT1"),
    }[case]
    assert pickle.dumps(Innocent(), protocol=4).count(b"\x93") and pickle.dumps(Innocent(), protocol=4).count(b"\x81")
    path = write(fmt, tmp_path / "op.pt", data)
    with pytest.raises(UnsafeFileError, match=expect) as e:
        torchfile.load(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_protocol4_instance_is_refused(tmp_path, fmt):
    data = pickle.dumps({"x": Innocent()}, protocol=4)
    with pytest.raises(UnsafeFileError, match=r"NEWOBJ|test_torchfile\.Innocent"):
        torchfile.load(write(fmt, tmp_path / "p4.pt", data))


@pytest.mark.parametrize("fmt", FORMATS)
def test_trap_in_storage_type_or_persistent_id(tmp_path, fmt):
    s = Storage("UntypedStorage", "0", 4)
    path = write(fmt, tmp_path / "s.pt", _dumps({"w": tensor(s, 0, (4,), (1,))}), {"0": np.ones(4, np.float32)})
    with pytest.raises(UnsafeFileError, match="UntypedStorage"):
        torchfile.load(path)
    # a persistent id that is not a storage record
    path = write(fmt, tmp_path / "p.pt", b"\x80\x02X\x03\x00\x00\x00abcQ.")
    with pytest.raises(UnsafeFileError, match=str(path)):
        torchfile.load(path)


def test_trap_in_legacy_header_pickles(tmp_path):
    """The magic number, protocol and sys-info pickles of the legacy stream are scanned too."""
    marker = tmp_path / "pwned"
    for i in range(3):
        parts = [pickle.dumps(torchfile.MAGIC_NUMBER, protocol=2), pickle.dumps(1001, protocol=2),
                 pickle.dumps({"little_endian": True}, protocol=2), pickle.dumps({}, protocol=2),
                 pickle.dumps([], protocol=2)]
        parts[i] = pickle.dumps(_Touch(marker), protocol=2)
        path = tmp_path / f"h{i}.pt"
        path.write_bytes(b"".join(parts))
        with pytest.raises(UnsafeFileError, match=r"\.system") as e:
            torchfile.load(path)
        assert str(path) in str(e.value)
    assert not marker.exists()


# ---------------------------------------------------------------- damaged files

def _load_fails(path, *match):
    """load(path) raises exactly one UnsafeFileError naming the path (never another type)."""
    try:
        torchfile.load(path)
    except UnsafeFileError as e:
        assert str(path) in str(e), str(e)
        for m in match:
            assert m in str(e), str(e)
        return str(e)
    except Exception as e:  # pragma: no cover - the failure being reported
        pytest.fail(f"{type(e).__name__} instead of UnsafeFileError: {e}")
    pytest.fail("a damaged file was read without error")


def _good_file(fmt, path, dtype="float32"):
    s = Storage({"float32": "FloatStorage", "bfloat16": "BFloat16Storage", "int64": "LongStorage"}[dtype], "0", 64)
    obj = {"w": tensor(s, 0, (8, 8), (8, 1)), "b": tensor(s, 3, (5,), (1,))}
    raw = np.arange(64, dtype=np.uint16 if dtype == "bfloat16" else dtype)
    return write(fmt, path, _dumps(obj), {"0": raw})


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64"])
def test_truncated_files(tmp_path, fmt, dtype):
    good = _good_file(fmt, tmp_path / "good.pt", dtype)
    whole = good.read_bytes()
    assert torchfile.load(good)["w"].shape == (8, 8)
    cuts = sorted({0, 1, 2, 7, 30, len(whole) // 3, len(whole) // 2, len(whole) - 100, len(whole) - 22,
                   len(whole) - 9, len(whole) - 1})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(whole[:cut])
        _load_fails(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_torch_files(torch, tmp_path, fmt):
    sd = {"w": torch.randn(16, 16), "h": torch.randn(20).bfloat16(), "i": torch.arange(30)}
    whole = _save(torch, sd, tmp_path / "good.pt", fmt).read_bytes()
    for frac in (0.05, 0.3, 0.6, 0.9, 0.99):
        path = tmp_path / f"cut{frac}.pt"
        path.write_bytes(whole[:int(len(whole) * frac)])
        _load_fails(path)
    path = tmp_path / "cut_last.pt"
    path.write_bytes(whole[:-1])
    _load_fails(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "nopkl.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data/0", b"\0" * 16)
        z.writestr("archive/version", "3\n")
    _load_fails(path, "data.pkl")
    path = tmp_path / "nested.pt"   # data.pkl not at <name>/data.pkl
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/b/data.pkl", pickle.dumps({}))
    _load_fails(path, "data.pkl")
    path = tmp_path / "two.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/data.pkl", pickle.dumps({}))
        z.writestr("b/data.pkl", pickle.dumps({}))
    _load_fails(path)


def test_zip_missing_storage_record(tmp_path):
    path = write_zip(tmp_path / "m.pt", _dumps({"w": tensor(Storage("FloatStorage", "0", 4), 0, (4,), (1,))}))
    _load_fails(path, "archive/data/0")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("storage,itemsize", [("FloatStorage", 4), ("BFloat16Storage", 2), ("BoolStorage", 1),
                                              ("DoubleStorage", 8)])
@pytest.mark.parametrize("delta", [-1, 1, -3])
def test_storage_record_of_wrong_length(tmp_path, fmt, storage, itemsize, delta):
    numel = 6
    pkl = _dumps({"w": tensor(Storage(storage, "0", numel), 0, (numel,), (1,))})
    raw = b"\x01" * (numel * itemsize + delta * itemsize)
    if fmt == "zip":
        path = write_zip(tmp_path / "len.pt", pkl, {"0": raw})
    else:   # the header agrees with the pickle, the bytes run short (or the record has extra bytes)
        path = write_legacy(tmp_path / "len.pt", pkl, {"0": (numel, raw)})
        if delta > 0:   # trailing bytes after the last storage are harmless in a stream; a
            torchfile.load(path)   # wrong header count is the legacy form of a wrong length
            path = write_legacy(tmp_path / "len2.pt", pkl, {"0": (numel + delta, raw)})
    _load_fails(path)


def test_legacy_wrong_storage_list(tmp_path):
    pkl = _dumps({"w": tensor(Storage("FloatStorage", "0", 2), 0, (2,), (1,))})
    path = write_legacy(tmp_path / "k.pt", pkl, {"0": (2, b"\0" * 8)}, keys=["1"])
    _load_fails(path, "storage list")
    path = write_legacy(tmp_path / "k2.pt", pkl, {"0": (2, b"\0" * 8)}, keys={"0": 1})
    _load_fails(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("offset,size,stride", [(0, (5,), (1,)), (1, (4,), (1,)), (0, (2, 3), (3, 1)),
                                                (0, (2, 2), (1, 4)), (4, (), ()), (0, (3, 2), (2, 0)),
                                                (-1, (2,), (1,)), (0, (-1,), (1,)), (0, (2,), (-1,))])
def test_tensor_reaching_past_its_storage(tmp_path, fmt, offset, size, stride):
    pkl = _dumps({"w": tensor(Storage("FloatStorage", "0", 4), offset, size, stride)})
    _load_fails(write(fmt, tmp_path / "reach.pt", pkl, {"0": np.arange(4, dtype=np.float32)}))


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensor_exactly_filling_its_storage_is_fine(tmp_path, fmt):
    pkl = _dumps({"w": tensor(Storage("FloatStorage", "0", 4), 1, (3,), (1,)),
                  "e": tensor(Storage("FloatStorage", "0", 4), 4, (0,), (1,)),
                  "s": tensor(Storage("FloatStorage", "0", 4), 3, (), ()),
                  "z": tensor(Storage("FloatStorage", "0", 4), 0, (3, 2), (1, 0)),
                  "far": tensor(Storage("FloatStorage", "0", 4), 9, (2, 0), (1, 1))})
    got = torchfile.load(write(fmt, tmp_path / "fill.pt", pkl, {"0": np.arange(4, dtype=np.float32)}))
    assert np.array_equal(got["w"], [1, 2, 3]) and got["e"].shape == (0,) and got["s"] == 3
    assert got["far"].shape == (2, 0) and got["far"].dtype == np.float32
    assert np.array_equal(got["z"], [[0, 0], [1, 1], [2, 2]])


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensor_from_a_non_storage(tmp_path, fmt):
    pkl = _dumps({"w": Reduce(G("torch._utils", "_rebuild_tensor_v2"), ("notastorage", 0, (1,), (1,), False, None))})
    _load_fails(write(fmt, tmp_path / "ns.pt", pkl))


@pytest.mark.parametrize("fmt", FORMATS)
def test_ordered_dict_with_arguments(tmp_path, fmt):
    pkl = _dumps({"w": Reduce(G("collections", "OrderedDict"), ([("a", 1)],))})
    _load_fails(write(fmt, tmp_path / "od.pt", pkl))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pickletools on random STRING args
def test_random_bytes_and_empty_file(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(40):
        path = tmp_path / f"r{i}.pt"
        path.write_bytes(rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8).tobytes())
        _load_fails(path)
    # random bytes behind a valid zip signature and behind a legacy magic number
    path = tmp_path / "pk.pt"
    path.write_bytes(b"PK\x03\x04" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    _load_fails(path)
    path = tmp_path / "magic.pt"
    path.write_bytes(pickle.dumps(torchfile.MAGIC_NUMBER, protocol=2) + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    _load_fails(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _load_fails(empty)


def test_not_a_torch_pickle(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    _load_fails(path, "magic")
    path = tmp_path / "proto.pkl"
    path.write_bytes(pickle.dumps(torchfile.MAGIC_NUMBER, protocol=2) + pickle.dumps(999, protocol=2))
    _load_fails(path, "protocol")


def test_damaged_zip_member(tmp_path):
    good = _good_file("zip", tmp_path / "good.pt")
    whole = bytearray(good.read_bytes())
    i = whole.index(np.arange(64, dtype=np.float32).tobytes()[40:60])
    whole[i] ^= 0xFF   # CRC mismatch in the storage record
    path = tmp_path / "crc.pt"
    path.write_bytes(bytes(whole))
    _load_fails(path)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        torchfile.load(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        torchfile.load_state_dict(str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError):   # a directory is not a weight file
        torchfile.load(tmp_path)


# ---------------------------------------------------------------- load_state_dict

@pytest.mark.parametrize("fmt", FORMATS)
def test_load_state_dict_refuses_non_state_dicts(tmp_path, fmt):
    s = Storage("FloatStorage", "0", 2)
    arr = {"0": np.ones(2, np.float32)}
    for i, obj in enumerate([[tensor(s, 0, (2,), (1,))], {"w": tensor(s, 0, (2,), (1,)), "epoch": 3},
                             {"w": {"nested": tensor(s, 0, (2,), (1,))}}, {1: tensor(s, 0, (2,), (1,))},
                             {"state_dict": {"w": tensor(s, 0, (2,), (1,)), "lr": 0.1}}, 5]):
        path = write(fmt, tmp_path / f"n{i}.pt", _dumps(obj), None if obj == 5 else arr)
        torchfile.load(path)   # a readable file ...
        with pytest.raises(UnsafeFileError, match="not a state dict") as e:
            torchfile.load_state_dict(path)   # ... but not a state dict
        assert str(path) in str(e.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_state_dict_accepts_wrapped(tmp_path, fmt):
    s = Storage("LongStorage", "0", 3)
    obj = {"state_dict": {"a": tensor(s, 0, (3,), (1,)), "b": tensor(s, 1, (2,), (1,))}, "epoch": 4}
    got = torchfile.load_state_dict(write(fmt, tmp_path / "w.pt", _dumps(obj), {"0": np.array([5, 6, 7])}))
    assert type(got) is dict and list(got) == ["a", "b"]
    assert np.array_equal(got["a"], [5, 6, 7]) and got["a"].dtype == np.int64
    assert np.array_equal(got["b"], [6, 7])
    flat = torchfile.load_state_dict(write(fmt, tmp_path / "f.pt", _dumps({"a": tensor(s, 0, (3,), (1,))}),
                                           {"0": np.array([5, 6, 7])}))
    assert list(flat) == ["a"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_state_dict_torch(torch, tmp_path, fmt):
    sd = {"w": torch.randn(2, 2)}
    _assert_same(torchfile.load_state_dict(_save(torch, {"state_dict": sd, "epoch": 1}, tmp_path / "a.pt", fmt))["w"],
                 sd["w"])
    with pytest.raises(UnsafeFileError, match="list"):
        torchfile.load_state_dict(_save(torch, [sd["w"]], tmp_path / "b.pt", fmt))
    with pytest.raises(UnsafeFileError, match="not a state dict"):
        torchfile.load_state_dict(_save(torch, {"w": sd["w"], "opt": {"lr": 0.1}}, tmp_path / "c.pt", fmt))
