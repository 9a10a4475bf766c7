"""A safe reader of PyTorch weight files (.pth, .pt, .bin) that never runs code from them.

`torch.save` writes a pickle, and unpickling may call any function the file names: a weight
file from the internet can run code on load. This module reads both PyTorch file formats
with the rule of `torch.load(weights_only=True)` and without torch:

- the zip archive of torch >= 1.6: `<name>/data.pkl` (the pickle) and one raw little-endian
  record per storage, `<name>/data/<key>`;
- the legacy single stream of older torch (`_use_new_zipfile_serialization=False`): pickles
  of a magic number, the protocol version and system info, then the object pickle, then the
  list of storage keys, then each storage as an int64 element count and its raw bytes.

Before a single opcode runs, the pickle is scanned (pickletools.genops, which only parses):
any opcode outside the plain-data set, or any global other than the few that rebuild
tensors, storages and ordered dicts, is refused with one UnsafeFileError naming it. The
unpickler then resolves globals only to minidiff's own rebuild functions (find_class), so
even a stream that slipped past the scan cannot reach another callable. Tensors come back as
host (numpy) arrays, C-contiguous copies of the storage views the file describes.
May import: backend (besides pickle, pickletools, zipfile).
"""
import collections
import io
import os
import pickle
import pickletools
import zipfile

from . import backend

host = backend.host

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C   # torch's legacy-format stamp
PROTOCOL_VERSION = 1001

# torch storage class -> numpy dtype. bfloat16 has no numpy dtype: it is widened to float32,
# exactly (a bfloat16 is the top half of a float32).
STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}
REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter")
ALLOWED_GLOBALS = ({("collections", "OrderedDict")}
                   | {("torch._utils", name) for name in REBUILDERS}
                   | {("torch", name) for name in STORAGE_DTYPES})
# Opcodes that only build plain data (or call one of the allowed globals: REDUCE, BUILD).
# Refused, among others: INST, OBJ, NEWOBJ, NEWOBJ_EX (build arbitrary classes), EXT1/2/4
# (the copyreg extension registry) and the out-of-band buffer opcodes.
SAFE_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP MEMOIZE PUT BINPUT LONG_BINPUT GET BINGET LONG_BINGET
    NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT
    STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8
    BINBYTES SHORT_BINBYTES BINBYTES8 EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3
    EMPTY_LIST LIST APPEND APPENDS EMPTY_DICT DICT SETITEM SETITEMS
    GLOBAL STACK_GLOBAL REDUCE BUILD PERSID BINPERSID
""".split())


class UnsafeFileError(ValueError):
    """The file is not a plain PyTorch weight file (it names code to run, or is damaged)."""


class _StorageType:
    def __init__(self, name):
        self.name = name


class _Storage:
    """One storage: its dtype, element count and (once read) its flat host array."""

    def __init__(self, name, key, numel):
        self.name, self.key, self.numel, self.array = name, str(key), int(numel), None


class _TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *ignored):
    """torch._utils._rebuild_tensor(_v2): a strided view of a storage (requires_grad, hooks ignored)."""
    if not isinstance(storage, _Storage):
        raise UnsafeFileError("a tensor is rebuilt from something that is not a storage")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter: an nn.Parameter is its tensor."""
    return data


def _ordered_dict(*args):
    if args:
        raise UnsafeFileError("collections.OrderedDict is called with arguments")
    return collections.OrderedDict()


def _scan(data, path):
    """Refuse any unsafe opcode or global before anything is unpickled."""
    try:
        for opcode, arg, pos in pickletools.genops(data):
            if opcode.name not in SAFE_OPCODES:
                raise UnsafeFileError(f"{path}: refused pickle opcode {opcode.name} at byte {pos}: minidiff reads "
                                      f"only tensors, storages and dicts from a PyTorch file (the file may run code)")
            if opcode.name == "GLOBAL":
                module, name = arg.split(" ", 1)
                _check_global(module, name, path)
    except UnsafeFileError:
        raise
    except Exception as e:
        raise UnsafeFileError(f"{path}: not a readable pickle ({e}); the file is damaged or not a PyTorch file") from None


def _check_global(module, name, path):
    if (module, name) not in ALLOWED_GLOBALS:
        raise UnsafeFileError(f"{path}: refused pickle global {module}.{name}: minidiff reads only tensors, "
                              f"storages and dicts from a PyTorch file, and this one names code to run")


class _Unpickler(pickle.Unpickler):
    def __init__(self, data, path, storage_for):
        super().__init__(io.BytesIO(data))
        self.path, self.storage_for = path, storage_for

    def find_class(self, module, name):
        _check_global(module, name, self.path)   # STACK_GLOBAL names are only known here
        if module == "collections":
            return _ordered_dict
        if module == "torch":
            return _StorageType(name)
        return _rebuild_parameter if name == "_rebuild_parameter" else _rebuild_tensor

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeFileError(f"{self.path}: unexpected persistent id {pid!r:.80}")
        return self.storage_for(pid)


def _unpickle(data, path, storage_for=None):
    _scan(data, path)
    try:
        return _Unpickler(data, path, storage_for or _no_storages).load()
    except UnsafeFileError as e:
        if str(e).startswith(f"{path}: "):
            raise
        raise UnsafeFileError(f"{path}: {e}") from None   # the rebuild functions do not know the path
    except Exception as e:
        raise UnsafeFileError(f"{path}: the pickle does not unpack ({type(e).__name__}: {e}); the file is damaged") from None


def _no_storages(pid):
    raise UnsafeFileError("a storage appears outside the object pickle")


def _flat_array(name, raw, numel, path, key, little_endian=True):
    dtype = STORAGE_DTYPES[name]
    dt = host.dtype("u2" if dtype == "bfloat16" else dtype).newbyteorder("<" if little_endian else ">")
    if len(raw) != numel * dt.itemsize:   # checked for bfloat16 too
        raise UnsafeFileError(f"{path}: storage {key} holds {len(raw)} bytes, {numel * dt.itemsize} expected; "
                              f"the file is truncated or damaged")
    if dtype == "bfloat16":
        bits = host.frombuffer(raw, dtype=dt, count=numel)
        return (bits.astype(host.uint32) << 16).view(host.float32)
    return host.frombuffer(raw, dtype=dt, count=numel).astype(dtype)


def _materialize(obj, path):
    """Replace every tensor reference, however deep in dicts, lists and tuples, by a host array."""
    if isinstance(obj, _TensorRef):
        arr, itemsize = obj.storage.array, obj.storage.array.itemsize
        if any(s < 0 for s in obj.size) or any(s < 0 for s in obj.stride) or obj.offset < 0:
            raise UnsafeFileError(f"{path}: a tensor has a negative size, stride or offset")
        last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride)) if all(obj.size) else obj.offset - 1
        if all(obj.size) and last >= len(arr):   # an empty tensor reads nothing, whatever its offset
            raise UnsafeFileError(f"{path}: a tensor reaches element {last} of a storage of {len(arr)}; "
                                  f"the file is damaged")
        view = host.lib.stride_tricks.as_strided(arr[obj.offset:], shape=obj.size,
                                                 strides=[s * itemsize for s in obj.stride])
        return view.copy(order="C")   # not ascontiguousarray: that makes a 0-d tensor 1-d
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialize(v, path)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialize(v, path) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, path) for v in obj)
    return obj


def _storage_table(path, reader):
    """A persistent_load that makes one _Storage per key (shared by every tensor that views it)."""
    storages = {}

    def storage_for(pid):
        type_, key, numel = pid[1], pid[2], pid[4]
        if type_.name not in STORAGE_DTYPES:
            raise UnsafeFileError(f"{path}: unsupported storage type torch.{type_.name}")
        if len(pid) > 5 and pid[5] is not None:
            raise UnsafeFileError(f"{path}: storage views (files of torch < 1.0) are not supported; re-save the "
                                  f"file with a current torch")
        if not isinstance(numel, int) or numel < 0:
            raise UnsafeFileError(f"{path}: storage {key} has an impossible size {numel!r:.40}")
        if str(key) not in storages:
            storages[str(key)] = _Storage(type_.name, key, numel)
            if reader is not None:
                storages[str(key)].array = reader(storages[str(key)])
        return storages[str(key)]

    return storages, storage_for


def _load_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnsafeFileError(f"{path}: a zip file but not a PyTorch archive (no single <name>/data.pkl)")
        prefix = pickles[0][:-len("data.pkl")]
        little = True
        if prefix + "byteorder" in names:
            little = archive.read(prefix + "byteorder").strip() != b"big"

        def read(storage):
            record = f"{prefix}data/{storage.key}"
            if record not in names:
                raise UnsafeFileError(f"{path}: storage record {record} is missing; the file is damaged")
            return _flat_array(storage.name, archive.read(record), storage.numel, path, storage.key, little)

        _, storage_for = _storage_table(path, read)
        result = _unpickle(archive.read(pickles[0]), path, storage_for)
    return _materialize(result, path)


def _load_legacy(path, f):
    def next_pickle(storage_for=None):
        # One pickle of the stream: pickletools.genops stops at its STOP, so its length is known
        # before a single opcode is executed.
        start = f.tell()
        end = None
        try:
            for opcode, _, pos in pickletools.genops(f):
                if opcode.name == "STOP":
                    end = f.tell()
                    break
        except Exception as e:
            raise UnsafeFileError(f"{path}: not a PyTorch file ({e})") from None
        if end is None:
            raise UnsafeFileError(f"{path}: the file ends inside a pickle; it is truncated")
        f.seek(start)
        return _unpickle(f.read(end - start), path, storage_for)

    if next_pickle() != MAGIC_NUMBER:
        raise UnsafeFileError(f"{path}: not a PyTorch weight file (no torch.save magic number)")
    if next_pickle() != PROTOCOL_VERSION:
        raise UnsafeFileError(f"{path}: unsupported PyTorch file protocol")
    info = next_pickle()
    little = not isinstance(info, dict) or info.get("little_endian", True)
    storages, storage_for = _storage_table(path, None)
    result = next_pickle(storage_for)
    keys = next_pickle()
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise UnsafeFileError(f"{path}: the storage list does not match the tensors; the file is damaged")
    for key in keys:
        storage = storages[str(key)]
        header = f.read(8)
        if len(header) != 8:
            raise UnsafeFileError(f"{path}: the file ends before storage {key}; it is truncated")
        numel = int.from_bytes(header, "little" if little else "big", signed=True)
        if numel != storage.numel:
            raise UnsafeFileError(f"{path}: storage {key} declares {numel} elements, the pickle {storage.numel}")
        itemsize = 2 if storage.name == "BFloat16Storage" else host.dtype(STORAGE_DTYPES[storage.name]).itemsize
        storage.array = _flat_array(storage.name, f.read(numel * itemsize), numel, path, key, little)
    return _materialize(result, path)


def load(path):
    """The object a PyTorch weight file holds (normally a dict name -> array), read without torch
    and without running any code from the file. Every failure is one UnsafeFileError (a ValueError)
    naming the file; a missing file is FileNotFoundError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        try:
            return _load_zip(path)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise UnsafeFileError(f"{path}: a damaged zip archive ({e})") from None
    with open(path, "rb") as f:
        return _load_legacy(path, f)


def load_state_dict(path):
    """load(path) checked to be a flat {name: array} state dict (one UnsafeFileError otherwise)."""
    obj = load(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, host.ndarray) for k, v in obj.items()):
        raise UnsafeFileError(f"{path}: holds a {type(obj).__name__}, not a state dict of named tensors")
    return dict(obj)
