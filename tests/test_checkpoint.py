"""Checkpoints: a safetensors round trip, atomic writes, and clear errors for bad files."""
import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from minidiff import backend, checkpoint
from minidiff.checkpoint import CheckpointError


def example_state():
    return {
        "model": {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
                  "conv.bias": np.zeros(2, dtype=np.float32)},
        "optimizer": {"step": np.asarray(7, dtype=np.int64), "exp_avg.0": np.ones(3, dtype=np.float32)},
        "step": 7,
        "config": {"ch_mult": [1, 2], "lr": 1e-3, "data": "digits"},
        "rng": backend.Generator(123).get_state(),  # 128-bit integers: JSON keeps them exact
        "batches": [{"epoch": 2}, np.float32(0.5)],
    }


def test_round_trip_keeps_arrays_dtypes_shapes_and_json(tmp_path):
    state = example_state()
    path = tmp_path / "ck.safetensors"
    checkpoint.save(path, state)
    back = checkpoint.load(path)
    for key, value in state["model"].items():
        assert back["model"][key].dtype == value.dtype
        np.testing.assert_array_equal(back["model"][key], value)
    assert back["optimizer"]["step"].shape == () and int(back["optimizer"]["step"]) == 7   # 0-d stays 0-d
    assert back["step"] == 7 and back["config"] == state["config"]
    assert back["rng"] == state["rng"]
    assert back["batches"] == [{"epoch": 2}, 0.5]
    generator = backend.Generator(0)
    generator.set_state(back["rng"])
    np.testing.assert_array_equal(backend.to_numpy(generator.normal((3,))),
                                  backend.to_numpy(backend.Generator(123).normal((3,))))


def test_run_folder_means_its_checkpoint_file(tmp_path):
    checkpoint.save(tmp_path, {"step": 1})
    assert (tmp_path / checkpoint.FILENAME).is_file()
    assert checkpoint.load(tmp_path)["step"] == 1


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    """No pickle anywhere: the header is JSON, readable by any safetensors reader."""
    path = tmp_path / "ck.safetensors"
    checkpoint.save(path, example_state())
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert header["__metadata__"]["format"] == checkpoint.FORMAT
    assert "model/conv.weight" in header


def test_a_crash_during_the_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    checkpoint.save(path, {"step": 1, "w": np.ones(300_000, dtype=np.float32)})
    before = path.read_bytes()

    def crash_half_way(f, data, chunk=1 << 20):
        f.write(memoryview(data)[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "_write_all", crash_half_way)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(path, {"step": 2, "w": np.zeros(300_000, dtype=np.float32)})
    assert path.read_bytes() == before
    assert checkpoint.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.safetensors"]   # no temporary file left behind


def test_an_interrupt_before_the_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    checkpoint.save(path, {"step": 1})

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"step": 2})
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.safetensors"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nothing.safetensors"):
        checkpoint.load(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path)       # a folder without a checkpoint in it


def test_truncated_file_is_corrupt(tmp_path):
    path = tmp_path / "ck.safetensors"
    checkpoint.save(path, example_state())
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match=f"{path}.*corrupt"):
        checkpoint.load(path)


@pytest.mark.parametrize("content", [b"", b"hello, world", b"\xff" * 64, struct.pack("<Q", 10 ** 9) + b"{}"])
def test_other_files_are_not_checkpoints(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{path}: not a minidiff checkpoint"):
        checkpoint.load(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    path.write_bytes(save_safetensors({"w": np.ones(2, dtype=np.float32)}, metadata={"format": "pt"}))
    with pytest.raises(CheckpointError, match="without minidiff metadata"):
        checkpoint.load(path)


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    target = tmp_path / "picture.png"
    with checkpoint.atomic_path(target) as tmp:
        assert tmp.endswith(".png")  # writers that choose a format by extension still work
        open(tmp, "wb").write(b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert [p.name for p in tmp_path.iterdir()] == ["picture.png"]
