"""One-file training checkpoints in the safetensors format, written atomically.

A checkpoint is a nested dict (model, EMA and optimizer state dicts, step, config,
RNG states). Its arrays go into the safetensors tensor table; everything else is
JSON in the file's metadata header, with each array replaced by {"__array__": key, "shape": ...}.
Loading parses bytes and JSON only, so it never executes code (no pickle).

Reading trusts nothing in the file, and checks before it allocates: the header's length is
bounded (MAX_HEADER_BYTES); every tensor entry's dtype, shape and offsets must agree, and the
tensors must tile the data exactly to the end of the file (so a truncated or padded file is
refused by its size); the data must fit in this process's memory (memory_budget); only then
are the tensors read, one at a time, straight into numpy arrays (not through the safetensors
binding, whose Rust panics derive from BaseException). The metadata must be tables of the
right kinds, and a training or converted-model checkpoint must be coherent (check_state): a
whole step count, the model's tensors of exactly the shapes its config implies (model_shapes,
computed without building anything), EMA and Adam moments alike, finite weights. Every
failure is one CheckpointError naming the file; read_header serves minidiff.pretrained too.

`save` refuses weights holding NaN or infinity (NonFiniteError), so a checkpoint on disk is
always a good one. Temporary files are named after the writer's host and process id, so the
next save (or load) of that file removes the ones a killed writer left behind.
May import: backend (besides safetensors and the standard library).
"""
import contextlib
import json
import math
import os
import re
import socket
import struct
import sys
import tempfile
import time

from safetensors.numpy import save as _save_tensors

from . import backend

host = backend.host

FORMAT = "minidiff-checkpoint"  # the "format" entry of the metadata header
VERSION = 1
FILENAME = "checkpoint.safetensors"  # the file inside a run folder
TRAIN_FORMAT = "minidiff-train"  # the "format" of a training run's state (train.Trainer.state_dict)
MODEL_FORMAT = "minidiff-model"  # the "format" of a converted model (pretrained.save_converted)

# Limits on what a file may ask for. A real header is kilobytes (CIFAR-10's training checkpoint:
# ~200 KB); the paper's models use T = 1000 steps and images up to 256 pixels; its largest U-Net
# (LSUN 256) has 114M parameters. The caps leave room for far larger ones and stop absurd ones.
MAX_HEADER_BYTES = 16 << 20
MAX_TIMESTEPS = 100_000
MAX_IMAGE_SIZE = 1024
MAX_PARAMETERS = 1 << 30  # 4 GiB of float32 weights, ~9x the paper's largest model
MAX_WIDTH = 1 << 16  # channels of any one layer
MAX_LEVELS = 11  # resolutions of a U-Net: 1024 down to 1
MAX_RES_BLOCKS = 64  # residual blocks per resolution (the paper: 2)
MAX_CLASSES = 1 << 20
LEARNED_VAR_TYPES = ("learned", "learned_range")   # diffusion.LEARNED_VAR_TYPES (this module imports backend only)
BYTES_PER_PARAMETER = 8  # loading holds the model's float32 weights and one float32 copy read from the file

# safetensors dtype codes numpy can hold (always little-endian)
DTYPES = {"BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "U32": "<u4",
          "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8"}


class CheckpointError(ValueError):
    """A checkpoint is missing, not a minidiff checkpoint, or corrupt; the message names the file."""


class NonFiniteError(CheckpointError):
    """Weights hold NaN or infinite values: such a checkpoint is never written, nor sampled from."""


class _Bad(ValueError):
    """What is wrong with a file, in a few words; the callers add the file and what it means."""


def resolve(path):
    """A run folder DIR means DIR/checkpoint.safetensors; a file path is used as it is."""
    path = os.fspath(path)
    return os.path.join(path, FILENAME) if os.path.isdir(path) else path


# ---------------------------------------------------------------- writing


def save(path, state):
    """Write `state` (nested dicts of arrays, numbers, strings, lists) to `path` atomically.

    Raises NonFiniteError, writing nothing, when a tensor of state["model"] or state["ema"]
    holds NaN or infinity: the checkpoint already on disk stays the last good one.
    """
    path = resolve(path)
    tensors = {}
    tree = _split(state, "", tensors)
    for part in ("model", "ema"):
        bad = first_non_finite({k: v for k, v in tensors.items() if k.startswith(part + "/")})
        if bad is not None:
            raise NonFiniteError(f"{path}: not saved: {part} tensor {bad.split('/', 1)[1]} holds NaN or infinite "
                                 f"values (the weights diverged); the checkpoint already there is kept")
    metadata = {"format": FORMAT, "version": str(VERSION), "state": json.dumps(tree)}
    _write_atomic(path, _save_tensors(tensors, metadata=metadata))


def first_non_finite(arrays, chunk=1 << 20):
    """The name of the first floating-point array of the dict `arrays` holding NaN or infinity, else None.

    Checked a million elements at a time, so the check needs no memory beyond a megabyte.
    """
    for name, a in arrays.items():
        a = backend.to_numpy(a)
        if a.dtype.kind not in "fc":
            continue
        flat = a.reshape(-1)
        for start in range(0, flat.size, chunk):
            if not host.isfinite(flat[start:start + chunk]).all():
                return name
    return None


def check_finite(path, arrays, what):
    """Raise NonFiniteError naming the first tensor of `arrays` (a state dict) that holds NaN or infinity."""
    bad = first_non_finite(arrays)
    if bad is not None:
        raise NonFiniteError(f"{path}: {what} tensor {bad} holds NaN or infinite values; a model with such "
                             f"weights only produces garbage (retrain, or use an earlier checkpoint)")


def _split(node, prefix, tensors):
    """Move every array leaf of `node` into `tensors` (as host numpy), leaving a placeholder."""
    if isinstance(node, dict):
        return {str(k): _split(v, f"{prefix}{k}/", tensors) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_split(v, f"{prefix}{i}/", tensors) for i, v in enumerate(node)]
    if backend.is_array(node):
        key = prefix.rstrip("/")
        tensors[key] = host.ascontiguousarray(backend.to_numpy(node))  # safetensors needs host memory
        return {"__array__": key, "shape": list(node.shape)}  # the shape restores 0-d arrays
    if isinstance(node, host.generic):  # a numpy scalar such as float32(0.9)
        return node.item()
    return node


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it over `path`.

    os.replace is atomic on POSIX and Windows, so a crash or Ctrl-C at any point leaves
    either the old file or the new one, never half of one, and never the temporary file.
    The temporary name keeps `path`'s extension, so writers that pick a format from it work.
    It holds this host's name and process id (.NAME-HOST-PID-XXXXXXXX.EXT): a process killed
    mid-write (kill -9, power loss) leaves it behind, and the next atomic_path or load of
    `path` removes it once no process of that id runs (remove_stale_temporaries).
    """
    folder, name = os.path.split(os.path.abspath(path))
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_temporary_prefix(name, os.getpid()),
                               suffix=os.path.splitext(name)[1])
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except OSError as err:   # a full disk while writing: the error names the file the user asked for
        if err.errno is not None and err.filename in (None, tmp):
            err.filename, err.filename2 = path, None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _host_tag():
    """This machine's name as it appears in temporary file names (letters, digits, '.', '_' and '-')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"


def _temporary_prefix(name, pid):
    return f".{name}-{_host_tag()}-{pid}-"


LOCK_FILE = ".lock"     # DIR/.lock: the run folder's advisory lock, naming the process that trains in it
LOCK_GRACE_S = 10.0    # an unreadable lock younger than this may be one being written: not stale yet


class RunFolderLocked(CheckpointError):
    """Another process trains in this run folder: two runs would overwrite each other's checkpoints."""


class RunFolderLock:
    """An advisory lock on a run folder: DIR/.lock, created exclusively (O_CREAT | O_EXCL), holding
    the holder's host, pid, start time and command line. Released on exit; a lock left by a process
    that no longer runs on this host (kill -9, power loss) is recognised as stale and replaced. A lock
    from another host cannot be checked: the error says to delete it if that run is gone."""

    def __init__(self, folder):
        self.path = os.path.join(folder, LOCK_FILE)
        self.held = False

    def acquire(self):
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    who = (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')}: "
                           f"{holder.get('command')})") if holder else "another process"
                    raise RunFolderLocked(f"{os.path.dirname(self.path)} is in use by {who}: two runs in one folder "
                                          f"would overwrite each other. Wait for it to finish or stop it; if that "
                                          f"process is gone, delete {self.path}") from None
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise RunFolderLocked(f"{self.path}: could not take the run folder's lock (it keeps changing hands)")

    def _holder(self):
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def _stale(self, holder):
        if holder is None:   # torn or garbled: stale once it is older than a write can take
            with contextlib.suppress(OSError):
                return time.time() - os.path.getmtime(self.path) > LOCK_GRACE_S
            return True
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and _process_gone(pid)

    def release(self):
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _process_gone(pid):
    """Whether no process `pid` runs on this machine (POSIX; elsewhere nothing counts as gone)."""
    if os.name != "posix" or pid <= 0:
        return False  # on Windows os.kill(pid, 0) would terminate the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it runs, as another user
        return False
    return False


def remove_stale_temporaries(path):
    """Remove the temporary files of `path` that writers on this host left when they died; returns their names.

    Only files named by atomic_path for this very `path` count, and only those whose process
    id no longer runs here: another writer's file in progress is never touched. Best effort:
    a folder that cannot be listed or written is left as it is.
    """
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    pattern = re.compile(re.escape(f".{name}-{_host_tag()}-") + r"([0-9]{1,10})-[A-Za-z0-9_]+"
                         + re.escape(os.path.splitext(name)[1]) + r"\Z")
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry)
        if match and int(match.group(1)) != os.getpid() and _process_gone(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, entry))
                removed.append(entry)
    return removed


def _write_atomic(path, data):
    """Write the bytes `data` to `path` through atomic_path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            _write_all(f, data)


def _write_all(f, data, chunk=1 << 20):
    """Write `data` in 1 MiB chunks (a separate function so tests can simulate a crash mid-write)."""
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        f.write(view[start:start + chunk])


# ---------------------------------------------------------------- reading any safetensors file


def memory_budget():
    """Bytes of memory this process can count on, or None where unknown.

    The least of the machine's physical memory, a cgroup (container) memory limit, and the
    address-space limit (RLIMIT_AS, `ulimit -v`) less what the process has mapped already.
    """
    limits = []
    with contextlib.suppress(AttributeError, ValueError, OSError):
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max") as f:
            text = f.read().strip()
        if text.isdigit():
            limits.append(int(text))
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, AttributeError, OSError, ValueError):
        soft = None
    if soft is not None and soft != resource.RLIM_INFINITY and soft > 0:
        mapped = 0
        with contextlib.suppress(OSError, ValueError, IndexError, AttributeError):
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limits.append(max(0, soft - mapped))
    return min(limits) if limits else None


def parameter_limit():
    """(the most parameters a model may have here, why): MAX_PARAMETERS, or fewer where memory is short."""
    budget = memory_budget()
    if budget is not None and budget // BYTES_PER_PARAMETER < MAX_PARAMETERS:
        return budget // BYTES_PER_PARAMETER, (f"{BYTES_PER_PARAMETER} bytes each in the {_gib(budget)} of memory "
                                               f"this process can use")
    return MAX_PARAMETERS, "minidiff's cap, checkpoint.MAX_PARAMETERS"


def _gib(n):
    return f"{n / 2 ** 30:.1f} GiB"


def read_header(path, f, error=CheckpointError, advice=""):
    """(metadata, entries, data_start) of the safetensors file open as `f`, reading no tensor data.

    metadata is the header's "__metadata__" (None when absent, unchecked); entries maps each
    tensor's name to (numpy dtype, shape tuple, begin, end) in file order, offsets relative to
    data_start. Raises `error` "PATH: not a readable safetensors file (WHY)ADVICE" when the header
    is too long, not JSON, or its entries do not tile the data to the end of the file.
    """
    try:
        size = os.fstat(f.fileno()).st_size
        header, data_start = _header_json(f, size)
        metadata = header.pop("__metadata__", None)
        entries = _entries(header, size - data_start)
    except _Bad as err:
        raise error(f"{path}: not a readable safetensors file ({err}){advice}") from None
    return metadata, entries, data_start


def _header_json(f, size):
    """The header's JSON object and where the data starts; _Bad for a header too long or not an object."""
    head = f.read(8)
    if len(head) < 8:
        raise _Bad(f"{size} bytes, fewer than the 8 that give the header's length")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES:
        raise _Bad(f"it declares a header of {length:,} bytes; real ones are kilobytes, and minidiff reads at most "
                   f"{MAX_HEADER_BYTES:,}")
    if 8 + length > size:
        raise _Bad(f"a header of {length:,} bytes in a {size:,}-byte file")
    header = _json(f.read(length), "the header")
    if not isinstance(header, dict):
        raise _Bad(f"the header is {_kind(header)}, not a JSON object")
    return header, 8 + length


def _json(text, what):
    """json.loads, with every way it fails (bad syntax, bad UTF-8, nesting too deep, huge numbers) as _Bad."""
    try:
        return json.loads(text)
    except RecursionError:
        raise _Bad(f"{what} is JSON nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, int() of over 4300 digits
        raise _Bad(f"{what} is not valid JSON: {str(err).splitlines()[0][:200]}") from None


def _entries(header, data_size):
    """{name: (dtype, shape, begin, end)} of the header's tensor entries, checked to tile data_size bytes."""
    entries = {}
    for name, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and _is_shape(entry.get("shape"))
                and _is_shape(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2):
            raise _Bad(f"tensor {_short(name)} has a malformed entry (needs dtype, shape and two data_offsets)")
        code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if code not in DTYPES:
            raise _Bad(f"tensor {_short(name)} has dtype {_short(code)}; minidiff reads {', '.join(DTYPES)}")
        dtype = host.dtype(DTYPES[code])
        nbytes = math.prod(shape) * dtype.itemsize
        if end < begin or end - begin != nbytes:
            raise _Bad(f"tensor {_short(name)} of shape {list(shape)} and dtype {code} needs {nbytes:,} bytes, "
                       f"but its data_offsets {[begin, end]} span {end - begin:,}")
        entries[name] = (dtype, shape, begin, end)
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position:
            raise _Bad(f"tensor {_short(name)}'s data starts at byte {begin:,} of the data, not at {position:,} "
                       f"where the previous tensor's ends")
        position = end
    if position != data_size:
        raise _Bad(f"the header accounts for {position:,} bytes of tensor data but the file holds {data_size:,} after "
                   f"its header ({'truncated' if position > data_size else 'padded or damaged'})")
    return dict(sorted(entries.items(), key=lambda item: item[1][2:]))


def read_tensor(f, entry, data_start):
    """The tensor of header entry (dtype, shape, begin, end) of the open file `f`, as a new numpy array."""
    dtype, shape, begin, end = entry
    array = host.empty(shape, dtype=dtype)
    if end > begin:
        f.seek(data_start + begin)
        if f.readinto(memoryview(array.reshape(-1).view(host.uint8))) != end - begin:
            raise OSError("the file became shorter while it was read")
    return array


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_shape(v):
    return isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v)


def _kind(v):
    """'a list', 'the string "x"', ...: a JSON value described for an error message."""
    if isinstance(v, str):
        return f"the string {_short(v)}"
    names = {dict: "a table", list: "a list", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null"}
    return names.get(type(v), f"a {type(v).__name__}")


def _short(v, limit=80):
    """repr-like JSON of `v`, cut to `limit` characters (a hostile value can be megabytes)."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError, RecursionError):
        text = repr(type(v))
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------- reading a checkpoint


def load(path):
    """Read a checkpoint written by `save`: the same nested dict, arrays as host numpy arrays.

    `path` is a file or a run folder. Raises CheckpointError naming the file when it is
    missing, is not a minidiff checkpoint, is corrupt (truncated, padded, bad header or
    metadata), would not fit in memory, or (check_state) is a training or converted-model
    checkpoint that is not coherent or whose weights are not finite. Also removes the
    temporary files that writers of this checkpoint left when they were killed.
    """
    path = resolve(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    remove_stale_temporaries(path)
    try:
        with open(path, "rb") as f:
            tree, entries, data_start = _open(path, f)
            data_size = sum(end - begin for _, _, begin, end in entries.values())
            budget = memory_budget()
            if budget is not None and data_size > budget:
                raise CheckpointError(f"{path}: holds {_gib(data_size)} of tensors, more than the {_gib(budget)} of "
                                      f"memory this process can use")
            tensors = {name: read_tensor(f, entry, data_start) for name, entry in entries.items()}
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err.strerror or err})") from None
    try:
        state = _join(tree, tensors)
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt minidiff checkpoint (its state is nested too deeply)") from None
    check_state(path, state)
    return state


def peek(path):
    """The nested dict of a checkpoint without its arrays (placeholders stay), reading only the header.

    Tells a training checkpoint from a converted model before reading hundreds of megabytes.
    """
    path = resolve(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            return _open(path, f)[0]
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err.strerror or err})") from None


def _open(path, f):
    """(state tree with placeholders, tensor entries, data start) of an open checkpoint; CheckpointError."""
    try:
        header, data_start = _header_json(f, os.fstat(f.fileno()).st_size)
    except _Bad as err:
        raise CheckpointError(f"{path}: not a minidiff checkpoint (not a readable safetensors file: {err})") from None
    metadata = header.pop("__metadata__", None)
    if metadata is None or isinstance(metadata, dict) and metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a minidiff checkpoint (a safetensors file without minidiff metadata)")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: not a minidiff checkpoint (its __metadata__ is {_kind(metadata)}, not a "
                              f"table of strings)")
    version = metadata.get("version", "0")
    if not re.fullmatch(r"[0-9]{1,9}", version):
        raise CheckpointError(f"{path}: corrupt minidiff checkpoint (version {_short(version)} is not a whole number)")
    if int(version) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {int(version)} is newer than this minidiff reads "
                              f"({VERSION}); upgrade minidiff")
    try:
        if "state" not in metadata:
            raise _Bad("its metadata has no state")
        tree = _json(metadata["state"], "its state")
        if not isinstance(tree, dict):
            raise _Bad(f"its state is {_kind(tree)}, not a table")
        entries = _entries(header, os.fstat(f.fileno()).st_size - data_start)
        _check_placeholders(tree, entries)
    except _Bad as err:
        raise CheckpointError(f"{path}: corrupt minidiff checkpoint ({err})") from None
    return tree, entries, data_start


def _check_placeholders(tree, entries):
    """Every array placeholder of `tree` names a tensor of `entries` whose size its shape has, and every
    tensor has a placeholder; walked with a stack, so no nesting depth is too deep for it."""
    used, stack = set(), [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        elif isinstance(node, dict) and "__array__" not in node:
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, dict):
            key, shape = node["__array__"], node.get("shape")
            if not isinstance(key, str) or key not in entries:
                raise _Bad(f"its state refers to a tensor {_short(key)} the file does not hold")
            if not _is_shape(shape) or math.prod(shape) != math.prod(entries[key][1]):
                raise _Bad(f"tensor {_short(key)} of shape {list(entries[key][1])} cannot take the shape "
                           f"{_short(shape)}")
            used.add(key)
    unused = [name for name in entries if name not in used]
    if unused:
        raise _Bad(f"tensor {_short(unused[0])} has no place in its state")


def _join(node, tensors):
    """Inverse of `_split`: put the arrays back where their placeholders are (checked by _check_placeholders)."""
    if isinstance(node, dict):
        if "__array__" in node:
            return tensors[node["__array__"]].reshape(node["shape"])
        return {k: _join(v, tensors) for k, v in node.items()}
    if isinstance(node, list):
        return [_join(v, tensors) for v in node]
    return node


# ---------------------------------------------------------------- coherent training and model states


def check_state(path, state):
    """Check a loaded state by its "format": a training run (check_training_state) or a converted
    model (check_model_state); other states (no format) are only nested data. Returns `state`."""
    fmt = state.get("format")
    if fmt == TRAIN_FORMAT:
        check_training_state(path, state)
    elif fmt == MODEL_FORMAT:
        check_model_state(path, state)
    return state


def check_training_state(path, state):
    """Raise CheckpointError unless `state` is a coherent training checkpoint; returns it.

    Coherent: a whole non-negative step; config, data_info and model_config tables; the model's
    tensors exactly those (names, order, shapes) of the model its config builds (train_model_config,
    the same as train.build_model) and of its model_config, all finite; EMA shadows of the same
    shapes, finite; Adam's two moments per parameter of the same shapes and its scalars; random
    states numpy accepts; T and the batch within the limits. All of it is checked from the
    loaded arrays and plain numbers, before any model is built, so that a config that disagrees
    with the tensors cannot make train or sample allocate what the file does not hold.
    """
    def bad(what):
        raise CheckpointError(f"{path}: corrupt training checkpoint ({what})")

    step = state.get("step")
    if not _is_int(step) or step < 0:
        bad(f"step is {_kind(step) if not _is_int(step) else step}, not a whole number of steps")
    for key in ("config", "data_info", "model_config", "model", "ema", "optimizer", "rng"):
        if not isinstance(state.get(key), dict):
            bad(f"{key} is {_kind(state.get(key))}, not a table")
    config, info, model = state["config"], state["data_info"], state["model"]
    _check_arrays(bad, model, "model", floating=True)
    try:
        implied = model_shapes(train_model_config(config, info))
    except ValueError as err:
        bad(f"its config: {err}")
    _check_shapes(bad, implied, model, "its training config")
    try:
        described = model_shapes(state["model_config"])
    except ValueError as err:
        bad(f"model_config: {err}")
    _check_shapes(bad, described, model, "its model_config")
    check_finite(path, model, "model")

    ema = state["ema"]
    expected = {"decay": (), "num_updates": (), **{f"shadow.{k}": v.shape for k, v in model.items()}}
    _check_keys(bad, ema, expected, "ema")
    _check_arrays(bad, ema, "ema", floating=False)
    check_finite(path, {k[len("shadow."):]: v for k, v in ema.items() if k.startswith("shadow.")}, "EMA")
    optimizer = state["optimizer"]
    expected = {k: () for k in ("step", "lr", "beta1", "beta2", "eps", "weight_decay", "warmup_steps", "grad_clip")}
    for i, value in enumerate(model.values()):   # Adam's moments follow the parameters' order
        expected.update({f"exp_avg.{i}": value.shape, f"exp_avg_sq.{i}": value.shape})
    _check_keys(bad, optimizer, expected, "optimizer")
    _check_arrays(bad, optimizer, "optimizer", floating=False)

    for name in ("num_timesteps", "batch_size"):
        if not _is_int(config.get(name)) or config[name] < 1:
            bad(f"config {name} is {_short(config.get(name))}, not a positive whole number")
    if config["num_timesteps"] > MAX_TIMESTEPS:
        bad(f"config num_timesteps={config['num_timesteps']} exceeds minidiff's limit of {MAX_TIMESTEPS:,}")
    pixels = 2 if info.get("channels") is None else info["channels"] * info["image_size"] ** 2
    budget = memory_budget()
    if budget is not None and config["batch_size"] * pixels * 4 > budget:
        bad(f"config batch_size={config['batch_size']}: one batch would need "
            f"{_gib(config['batch_size'] * pixels * 4)}, more than the {_gib(budget)} this process can use")
    _check_rng(bad, state["rng"])
    return state


def check_model_state(path, state):
    """Raise CheckpointError unless `state` is a coherent converted model (pretrained.save_converted); returns it."""
    def bad(what):
        raise CheckpointError(f"{path}: corrupt converted model ({what})")

    for key in ("model_config", "model", "diffusion", "info"):
        if not isinstance(state.get(key), dict):
            bad(f"{key} is {_kind(state.get(key))}, not a table")
    model, d, info = state["model"], state["diffusion"], state["info"]
    _check_arrays(bad, model, "model", floating=True)
    try:
        described = model_shapes(state["model_config"])
    except ValueError as err:
        bad(f"model_config: {err}")
    _check_shapes(bad, described, model, "its model_config")
    betas = d.get("betas")
    if not backend.is_array(betas) or betas.dtype.kind != "f" or betas.ndim != 1 or \
            not 2 <= len(betas) <= MAX_TIMESTEPS:
        bad(f"diffusion betas must be 2 to {MAX_TIMESTEPS:,} numbers")
    if not isinstance(d.get("model_mean_type"), str) or not isinstance(d.get("model_var_type"), str):
        bad("diffusion needs model_mean_type and model_var_type names")
    mc = state["model_config"]
    if info.get("image_size") != mc.get("image_size") or info.get("channels") != mc.get("in_channels") or \
            not isinstance(info.get("clip_denoised"), bool):
        bad("info must give the model's image_size and channels and clip_denoised true or false")
    ddim = info.get("ddim", {})   # a DDIM scheduler's settings (absent in files converted before they were read)
    if not isinstance(ddim, dict) or ddim.get("spacing", "leading") not in ("leading", "trailing", "linspace") or \
            not isinstance(ddim.get("set_alpha_to_one", True), bool) or \
            not isinstance(ddim.get("steps_offset", 0), int) or not 0 <= ddim.get("steps_offset", 0) < len(betas):
        bad("info's ddim settings must give spacing leading, trailing or linspace, set_alpha_to_one true or false "
            "and steps_offset an integer step")
    check_finite(path, model, "model")
    return state


def _check_arrays(bad, arrays, what, floating):
    for name, value in arrays.items():
        if not backend.is_array(value) or value.dtype.kind not in ("f" if floating else "fiub"):
            bad(f"{what} entry {_short(name)} is {_kind(value) if not backend.is_array(value) else value.dtype}, "
                f"not {'a floating-point' if floating else 'a numeric'} array")


def _check_keys(bad, arrays, expected, what):
    """The arrays must be exactly `expected` {name: shape} (0-d scalars may also be stored with shape (1,))."""
    missing = [k for k in expected if k not in arrays]
    extra = [k for k in arrays if k not in expected]
    if missing or extra:
        bad(f"{what} " + "; ".join(p for p in (f"lacks {', '.join(missing[:3])}" if missing else "",
                                               f"has unexpected {_short(extra[:3])}" if extra else "") if p))
    for k, shape in expected.items():
        value = arrays[k]
        if not backend.is_array(value) or (value.shape != shape and not (shape == () and value.shape == (1,))):
            bad(f"{what} entry {k} has shape {list(getattr(value, 'shape', []))}, not {list(shape)}")


def _check_shapes(bad, expected, tensors, source):
    """The tensors must be exactly the parameters `expected` ({name: shape}, in order) that `source` implies."""
    if list(expected) == list(tensors) and all(tuple(tensors[k].shape) == s for k, s in expected.items()):
        return
    for k, shape in expected.items():
        if k not in tensors:
            bad(f"{source} implies a parameter {k} of shape {list(shape)} that the checkpoint lacks")
        if tuple(tensors[k].shape) != shape:
            bad(f"{source} implies {k} of shape {list(shape)}, but the checkpoint's has {list(tensors[k].shape)}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        bad(f"the checkpoint holds {_short(extra[0])}, which the model {source} describes has not")
    bad(f"the model's tensors are not in the order of the model {source} describes")


def _check_rng(bad, rng):
    """rng["train"] and rng["default"] must be states backend.Generator.set_state accepts; rng["batches"] whole numbers."""
    for key in ("train", "default"):
        try:
            backend.Generator(0).set_state(rng[key])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            bad(f"rng {key} is not a random generator state ({type(err).__name__})")
    batches = rng.get("batches")
    if not isinstance(batches, dict) or not all(_is_int(v) and v >= 0 for v in batches.values()):
        bad("rng batches must be a table of whole numbers")


def train_model_config(config, info):
    """The model config that train.build_model(config, channels, image_size, num_classes) builds, from a
    training checkpoint's config and data_info tables: an MLPDenoiser's for 2-D points (channels None),
    else the U-Net's constructor arguments. Mirrors build_model (tested against it)."""
    learned = config.get("var_type") in LEARNED_VAR_TYPES   # a second set of output channels for the variance
    try:
        if info.get("channels") is None:
            return {"kind": "mlp", "dim": 2, "hidden": config["mlp_hidden"], "layers": config["mlp_layers"],
                    "time_dim": 32, **({"out_dim": 4} if learned else {})}
        kwargs = dict(image_size=info["image_size"], in_channels=info["channels"], ch=config["ch"],
                      ch_mult=config["ch_mult"], num_res_blocks=config["num_res_blocks"],
                      attn_resolutions=config["attn_resolutions"], dropout=config["dropout"])
    except KeyError as err:
        raise ValueError(f"it has no {err.args[0]}") from None
    if config.get("conditional", False):
        if info.get("num_classes") is None:
            raise ValueError("it is conditional, but its data_info has no num_classes")
        kwargs["num_classes"] = info["num_classes"]
    if learned:
        kwargs["out_channels"] = 2 * info["channels"]
    return kwargs


def model_shapes(config):
    """{parameter name: shape} in named_parameters order of the model `config` describes, built from nothing.

    `config` is a UNet's constructor arguments (UNet.config; pretrained.unet_kwargs) or an
    MLPDenoiser's config ({"kind": "mlp", ...}). Every size must be a whole number within the
    caps (MAX_IMAGE_SIZE, MAX_WIDTH, MAX_LEVELS, MAX_RES_BLOCKS, MAX_CLASSES), else ValueError
    naming it, so the walk is short and its arithmetic exact; the parameter count is then
    sum(math.prod(s)). Mirrors unet.UNet and unet.MLPDenoiser (tested against them).
    """
    if not isinstance(config, dict):
        raise ValueError(f"is {_kind(config)}, not a table")
    shapes = {}

    def count(key, limit):
        value = config.get(key)
        if not _is_int(value) or not 1 <= value <= limit:
            raise ValueError(f"{key}={_short(value)} must be a whole number from 1 to {limit:,}")
        return value

    def linear(name, i, o):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (o, i), (o,)

    if config.get("kind") == "mlp":
        dim, hidden = count("dim", MAX_WIDTH), count("hidden", MAX_WIDTH)
        layers, time_dim = count("layers", MAX_RES_BLOCKS), count("time_dim", MAX_WIDTH)
        out_dim = dim if config.get("out_dim") is None else count("out_dim", MAX_WIDTH)
        linear("temb", time_dim, hidden)
        linear("inp", dim, hidden)
        for kind in ("temb_proj", "hidden"):
            for i in range(layers):
                linear(f"{kind}.{i}", hidden, hidden)
        linear("out", hidden, out_dim)
        return shapes

    image_size, ch = count("image_size", MAX_IMAGE_SIZE), count("ch", MAX_WIDTH)
    in_channels = count("in_channels", MAX_WIDTH)
    out_channels = in_channels if config.get("out_channels") is None else count("out_channels", MAX_WIDTH)
    num_res_blocks = count("num_res_blocks", MAX_RES_BLOCKS)
    ch_mult, attn = config.get("ch_mult"), config.get("attn_resolutions", ())
    if not isinstance(ch_mult, (list, tuple)) or not 1 <= len(ch_mult) <= MAX_LEVELS or \
            not all(_is_int(m) and 1 <= m and ch * m <= MAX_WIDTH for m in ch_mult):
        raise ValueError(f"ch_mult={_short(ch_mult)} must be 1 to {MAX_LEVELS} whole numbers, each at most "
                         f"{MAX_WIDTH:,} / ch")
    if not isinstance(attn, (list, tuple)) or not all(_is_int(r) for r in attn):
        raise ValueError(f"attn_resolutions={_short(attn)} must be a list of whole numbers")
    num_classes = config.get("num_classes")
    temb = 4 * ch

    def conv(name, i, o, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, i, o):
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", i, o, 3)
        linear(f"{name}.temb_proj", temb, o)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.nin_shortcut", i, o, 1)

    def attention(name, c):
        norm(f"{name}.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            linear(f"{name}.{proj}", c, c)

    linear("temb.dense0", ch, temb)
    linear("temb.dense1", temb, temb)
    conv("conv_in", in_channels, ch, 3)
    skip, cur, res, levels = [ch], ch, image_size, len(ch_mult)
    for i, mult in enumerate(ch_mult):   # a Level lists its blocks, then its attentions, then its downsample
        attns = []
        for j in range(num_res_blocks):
            resnet(f"down.{i}.block.{j}", cur, ch * mult)
            cur = ch * mult
            if res in attn:
                attns.append((f"down.{i}.attn.{j}", cur))
            skip.append(cur)
        for name, c in attns:
            attention(name, c)
        if i != levels - 1:
            conv(f"down.{i}.downsample.conv", cur, cur, 3)
            res //= 2
            skip.append(cur)
    resnet("mid.block_1", cur, cur)
    attention("mid.attn_1", cur)
    resnet("mid.block_2", cur, cur)
    up = {}
    for i in reversed(range(levels)):   # built from the lowest resolution, listed as up.0, up.1, ...
        level, attns = {}, []
        for j in range(num_res_blocks + 1):
            before = len(shapes)
            resnet(f"up.{i}.block.{j}", cur + skip.pop(), ch * ch_mult[i])
            level.update({k: shapes.pop(k) for k in list(shapes)[before:]})
            cur = ch * ch_mult[i]
            if res in attn:
                attns.append((f"up.{i}.attn.{j}", cur))
        before = len(shapes)
        for name, c in attns:
            attention(name, c)
        if i != 0:
            conv(f"up.{i}.upsample.conv", cur, cur, 3)
            res *= 2
        level.update({k: shapes.pop(k) for k in list(shapes)[before:]})
        up[i] = level
    for i in range(levels):
        shapes.update(up[i])
    norm("norm_out", cur)
    conv("conv_out", cur, out_channels, 3)
    if num_classes is not None:
        shapes["label_emb.weight"] = (count("num_classes", MAX_CLASSES) + 1, temb)
    return shapes
