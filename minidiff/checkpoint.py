"""One-file training checkpoints in the safetensors format, written atomically.

A checkpoint is a nested dict (model, EMA and optimizer state dicts, step, config,
RNG states). Its arrays go into the safetensors tensor table; everything else is
JSON in the file's metadata header, with each array replaced by {"__array__": key, "shape": ...}.
Loading parses bytes and JSON only, so it never executes code (no pickle).
May import: backend (besides safetensors and the standard library).
"""
import contextlib
import json
import os
import struct
import tempfile

from safetensors import SafetensorError
from safetensors.numpy import load as _load_tensors
from safetensors.numpy import save as _save_tensors

from . import backend

FORMAT = "minidiff-checkpoint"  # the "format" entry of the metadata header
VERSION = 1
FILENAME = "checkpoint.safetensors"  # the file inside a run folder


class CheckpointError(ValueError):
    """A checkpoint is missing, not a minidiff checkpoint, or corrupt; the message names the file."""


def resolve(path):
    """A run folder DIR means DIR/checkpoint.safetensors; a file path is used as it is."""
    path = os.fspath(path)
    return os.path.join(path, FILENAME) if os.path.isdir(path) else path


def save(path, state):
    """Write `state` (nested dicts of arrays, numbers, strings, lists) to `path` atomically."""
    tensors = {}
    tree = _split(state, "", tensors)
    metadata = {"format": FORMAT, "version": str(VERSION), "state": json.dumps(tree)}
    _write_atomic(resolve(path), _save_tensors(tensors, metadata=metadata))


def load(path):
    """Read a checkpoint written by `save`: the same nested dict, arrays as host numpy arrays.

    `path` is a file or a run folder. Raises CheckpointError naming the file when it is
    missing, is not a minidiff checkpoint, or is corrupt (truncated, bad header).
    """
    path = resolve(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    metadata = _read_metadata(path, data)
    try:
        tensors = _load_tensors(data)
        tree = json.loads(metadata["state"])
        return _join(tree, tensors)
    except (SafetensorError, ValueError, KeyError, TypeError) as err:  # bad tensors, bad JSON, a missing key
        raise CheckpointError(f"{path}: corrupt minidiff checkpoint ({err})") from None


def _read_metadata(path, data):
    """The metadata header of a safetensors file: 8 bytes of little-endian length, then JSON."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        if length > len(data) - 8:
            raise ValueError(f"header of {length} bytes in a {len(data)}-byte file")
        metadata = json.loads(data[8:8 + length])["__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError):   # short file, bad JSON, no metadata
        raise CheckpointError(f"{path}: not a minidiff checkpoint (not a readable safetensors file)") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a minidiff checkpoint (a safetensors file without minidiff metadata)")
    if int(metadata.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {metadata['version']} is newer than this "
                              f"minidiff reads ({VERSION}); upgrade minidiff")
    return metadata


def _split(node, prefix, tensors):
    """Move every array leaf of `node` into `tensors` (as host numpy), leaving a placeholder."""
    if isinstance(node, dict):
        return {str(k): _split(v, f"{prefix}{k}/", tensors) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_split(v, f"{prefix}{i}/", tensors) for i, v in enumerate(node)]
    if backend.is_array(node):
        key = prefix.rstrip("/")
        tensors[key] = backend.host.ascontiguousarray(backend.to_numpy(node))  # safetensors needs host memory
        return {"__array__": key, "shape": list(node.shape)}  # the shape restores 0-d arrays
    if isinstance(node, backend.host.generic):  # a numpy scalar such as float32(0.9)
        return node.item()
    return node


def _join(node, tensors):
    """Inverse of `_split`: put the arrays back where their placeholders are."""
    if isinstance(node, dict):
        if "__array__" in node:
            return tensors[node["__array__"]].reshape(node["shape"])
        return {k: _join(v, tensors) for k, v in node.items()}
    if isinstance(node, list):
        return [_join(v, tensors) for v in node]
    return node


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it over `path`.

    os.replace is atomic on POSIX and Windows, so a crash or Ctrl-C at any point leaves
    either the old file or the new one, never half of one, and never the temporary file.
    The temporary name keeps `path`'s extension, so writers that pick a format from it work.
    """
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}-", suffix=os.path.splitext(name)[1])
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


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


def peek(path):
    """The nested dict of a checkpoint without its arrays (placeholders stay), reading only the header.

    Tells a training checkpoint from a converted model before reading hundreds of megabytes.
    """
    path = resolve(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        head += f.read(min(length, 100 << 20))  # a real header is kilobytes; a garbage length stays bounded
    metadata = _read_metadata(path, head)
    try:
        return json.loads(metadata["state"])
    except Exception as err:
        raise CheckpointError(f"{path}: corrupt minidiff checkpoint ({err})") from None
