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


# ---------------------------------------------------------------- hostile files (headers written by hand)

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
OLD_RUN = os.path.join(DATA_DIR, "unconditional_before_issue14.safetensors")  # a real training checkpoint


def write_raw(path, header, data=b"", length=None):
    """A safetensors file from its parts: 8 bytes of header length, the header (JSON or raw bytes), the data."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def minidiff_header(state="{}", tensors=None, **metadata):
    return {"__metadata__": {"format": checkpoint.FORMAT, "version": "1", "state": state, **metadata},
            **(tensors or {})}


def write_unchecked(path, state):
    """What save writes, without its refusal of non-finite weights (for files a tool elsewhere could make)."""
    tensors = {}
    tree = checkpoint._split(state, "", tensors)
    metadata = {"format": checkpoint.FORMAT, "version": "1", "state": json.dumps(tree)}
    path.write_bytes(save_safetensors(tensors, metadata=metadata))
    return path


def one_line(err):
    message = str(err.value)
    assert "\n" not in message, message
    return message


W = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
W_STATE = json.dumps({"w": {"__array__": "w", "shape": [2]}})
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("header, data, expected", [
    ({"__metadata__": "minidiff-checkpoint"}, b"", "its __metadata__ is the string"),
    ({"__metadata__": ["format"]}, b"", "its __metadata__ is a list, not a table of strings"),
    ({"__metadata__": {"format": "pt"}}, b"", "without minidiff metadata"),
    (minidiff_header(version="x"), b"", 'version "x" is not a whole number'),
    (minidiff_header(version="9" * 5000), b"", "is not a whole number"),
    (minidiff_header(version="2"), b"", "version 2 is newer"),
    (minidiff_header(state="[]"), b"", "its state is a list, not a table"),
    (minidiff_header(state='"state"'), b"", "its state is the string"),
    (minidiff_header(state="{"), b"", "its state is not valid JSON"),
    (minidiff_header(state=DEEP), b"", "its state is JSON nested too deeply"),
    (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", "the header is JSON nested too deeply"),
    (b"[1, 2]", b"", "the header is a list, not a JSON object"),
    (b"\xff\xfe{}", b"", "not valid JSON"),
    ({"__metadata__": {"format": checkpoint.FORMAT, "state": {}}}, b"", "not a table of strings"),
    (minidiff_header(), None, "its metadata has no state"),
    (minidiff_header(W_STATE), b"", "refers to a tensor \"w\" the file does not hold"),
    (minidiff_header(W_STATE, W), bytes(8) + b"x", "padded"),
    (minidiff_header(W_STATE, W), bytes(4), "truncated"),
    (minidiff_header(json.dumps({"w": {"__array__": "w", "shape": [3]}}), W), bytes(8), "cannot take the shape [3]"),
    (minidiff_header(json.dumps({"w": {"__array__": "w", "shape": [-1]}}), W), bytes(8), "cannot take the shape"),
    (minidiff_header("{}", W), bytes(8), 'tensor "w" has no place in its state'),
    (minidiff_header(W_STATE, {"w": {**W["w"], "dtype": "X9"}}), bytes(8), 'dtype "X9"'),
    (minidiff_header(W_STATE, {"w": {**W["w"], "shape": [-2]}}), bytes(8), "malformed entry"),
    (minidiff_header(W_STATE, {"w": {**W["w"], "data_offsets": [0, 12]}}), bytes(12), "span 12"),
    (minidiff_header(W_STATE, {"w": W["w"], "v": {**W["w"], "data_offsets": [4, 12]}}), bytes(12),
     "not at 8 where the previous tensor's ends"),
])
def test_hostile_but_well_formed_files_are_one_checkpoint_error(tmp_path, header, data, expected):
    if data is None:   # a metadata without "state"
        header["__metadata__"].pop("state")
        data = b""
    path = write_raw(tmp_path / "ck.safetensors", header, data)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert expected in one_line(err) and str(path) in str(err.value)
    with pytest.raises(CheckpointError):
        checkpoint.peek(path)   # what `sample` looks at first


def test_a_huge_declared_header_is_refused_before_it_is_read(tmp_path):
    path = write_raw(tmp_path / "ck.safetensors", b"{}", length=1 << 40)
    with pytest.raises(CheckpointError, match=r"declares a header of 1,099,511,627,776 bytes"):
        checkpoint.load(path)
    header = {"w": {"dtype": "F32", "shape": [25 * 2 ** 30], "data_offsets": [0, 100 * 2 ** 30]}}
    path = write_raw(tmp_path / "big.safetensors", minidiff_header(W_STATE, header))   # 100 GB declared, 0 held
    with pytest.raises(CheckpointError, match=r"accounts for 107,374,182,400 bytes.*truncated"):
        checkpoint.load(path)


def sparse(path, size):
    """Extend `path` to `size` bytes without writing them (a sparse file), or skip where the disk cannot."""
    try:
        os.truncate(path, size)
    except OSError as err:
        pytest.skip(f"no sparse file of {size} bytes here ({err})")
    return path


def one_tensor_header(n):
    """A checkpoint header whose state is one float32 tensor "w" of n elements."""
    return minidiff_header(json.dumps({"w": {"__array__": "w", "shape": [n]}}),
                           {"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})


def run_limited(code, limit=1536 << 20):
    """Run `code` in a fresh Python whose address space is limited to `limit` bytes (RLIMIT_AS); its stdout."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    """) + textwrap.dedent(code)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


LIMITED_LOADS = """
from minidiff import checkpoint
for path in PATHS:
    try:
        checkpoint.load(path)
        print("loaded")
    except checkpoint.CheckpointError as err:
        print("CheckpointError", err)
    except MemoryError:
        print("MemoryError")
"""


def test_files_declaring_more_than_memory_holds_are_refused_under_an_address_space_limit(tmp_path):
    """Under a 1.5 GB RLIMIT_AS: a checkpoint padded to 512 GB, one whose tensors tile a 512 GB file,
    and one whose 2 GB tensor fits the file but not the memory are each one clear error, not a
    MemoryError, and nothing is read (the files are sparse: they hold no data)."""
    padded = tmp_path / "padded.safetensors"
    checkpoint.save(padded, {"step": 1, "w": np.ones(4, np.float32)})
    sparse(padded, 512 << 30)
    huge = write_raw(tmp_path / "huge.safetensors", one_tensor_header(128 << 30))
    sparse(huge, huge.stat().st_size + (512 << 30))
    two_gb = write_raw(tmp_path / "2gb.safetensors", one_tensor_header(512 << 20))
    sparse(two_gb, two_gb.stat().st_size + (2 << 30))
    paths = [str(p) for p in (padded, huge, two_gb)]
    lines = run_limited(f"PATHS = {paths!r}\n" + LIMITED_LOADS).splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("CheckpointError") and "padded" in lines[0], lines[0]
    assert lines[1].startswith("CheckpointError") and "512.0 GiB of tensors" in lines[1], lines[1]
    assert lines[2].startswith("CheckpointError") and "2.0 GiB of tensors, more than the" in lines[2], lines[2]


# ---------------------------------------------------------------- training checkpoints must be coherent


def old_run():
    return checkpoint.load(OLD_RUN)


def mutated(tmp_path, change, name="checkpoint.safetensors"):
    """The bundled training checkpoint with `change(state)` applied, written to tmp_path/run/NAME."""
    state = old_run()
    change(state)
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    return write_unchecked(folder / name, state)


def set_in(*keys_and_value):
    *keys, value = keys_and_value

    def change(state):
        node = state
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return change


FIRST = "temb.dense0.weight"


@pytest.mark.parametrize("change, expected", [
    (set_in("step", 2.5), "step is a number, not a whole number of steps"),
    (set_in("step", "x"), 'step is the string "x"'),
    (set_in("step", -1), "step is -1"),
    (set_in("step", True), "step is a boolean"),
    (set_in("config", []), "config is a list, not a table"),
    (set_in("model", "weights"), "model is the string"),
    (set_in("config", "ch", 8), "its training config implies temb.dense0.weight of shape [32, 8], but the "
                                "checkpoint's has [16, 4]"),
    (set_in("config", "ch", 10 ** 9), "ch=1000000000 must be a whole number from 1 to 65,536"),
    (set_in("config", "num_res_blocks", 10 ** 6), "num_res_blocks=1000000 must be a whole number"),
    (set_in("config", "ch_mult", [1, 2]), "its training config implies a parameter"),
    (set_in("config", "conditional", True), "it is conditional, but its data_info has no num_classes"),
    (lambda s: (s["config"].update(conditional=True), s["data_info"].update(num_classes=10)),
     "implies a parameter label_emb.weight of shape [11, 16] that the checkpoint lacks"),
    (set_in("data_info", "image_size", 2 ** 30), "image_size=1073741824 must be a whole number from 1 to 1,024"),
    (set_in("model_config", "ch", 8), "its model_config implies temb.dense0.weight of shape [32, 8]"),
    (set_in("model", FIRST, np.zeros((16, 5), np.float32)), "implies temb.dense0.weight of shape [16, 4], but"),
    (set_in("model", FIRST, np.zeros((16, 4), np.int64)), "model entry \"temb.dense0.weight\" is int64"),
    (lambda s: s["ema"].pop(f"shadow.{FIRST}"), "ema lacks shadow.temb.dense0.weight"),
    (set_in("ema", f"shadow.{FIRST}", np.zeros(3, np.float32)), "ema entry shadow.temb.dense0.weight has shape [3]"),
    (lambda s: s["optimizer"].pop("exp_avg_sq.3"), "optimizer lacks exp_avg_sq.3"),
    (set_in("optimizer", "extra", np.zeros(1)), 'optimizer has unexpected ["extra"]'),
    (set_in("config", "num_timesteps", 10 ** 9), "num_timesteps=1000000000 exceeds minidiff's limit of 100,000"),
    (set_in("config", "num_timesteps", "10"), 'num_timesteps is "10"'),
    (set_in("config", "batch_size", 10 ** 12), "config batch_size=1000000000000: one batch would need"),
    (set_in("rng", "train", {"bit_generator": "PCG64", "state": "x"}), "rng train is not a random generator state"),
    (set_in("rng", "batches", {"epoch": -1}), "rng batches must be a table of whole numbers"),
])
def test_incoherent_training_checkpoints_are_one_checkpoint_error(tmp_path, change, expected):
    path = mutated(tmp_path, change)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert expected in one_line(err) and "corrupt training checkpoint" in str(err.value)


def test_model_shapes_are_those_of_the_models_built(tmp_path):
    """checkpoint.model_shapes computes, without building, exactly UNet's and MLPDenoiser's parameters."""
    from minidiff.unet import MLPDenoiser, UNet
    for config in [dict(image_size=8, in_channels=1, ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()),
                   dict(image_size=32, in_channels=3, ch=8, ch_mult=(1, 2, 2), num_res_blocks=2,
                        attn_resolutions=(16,), num_classes=10),
                   dict(image_size=16, in_channels=2, ch=8, ch_mult=(1, 2, 1, 3), num_res_blocks=1,
                        attn_resolutions=(16, 2), out_channels=5, attn_head_dim=4)]:
        model = UNet(**config)
        assert list(checkpoint.model_shapes(model.config).items()) == [
            (n, p.shape) for n, p in model.named_parameters()]
    mlp = MLPDenoiser(2, 16, 3)
    assert list(checkpoint.model_shapes(mlp.config).items()) == [(n, p.shape) for n, p in mlp.named_parameters()]
    with pytest.raises(ValueError, match="num_res_blocks=1000000 must be a whole number from 1 to 64"):
        checkpoint.model_shapes(dict(config, num_res_blocks=10 ** 6))


@pytest.mark.parametrize("overrides, info", [
    ({}, {"channels": 1, "image_size": 8}),
    ({"conditional": True, "ch_mult": (1, 2), "attn_resolutions": (4,)}, {"channels": 3, "image_size": 8,
                                                                          "num_classes": 4}),
    ({"data": "swissroll"}, {"channels": None, "image_size": None}),
    ({"var_type": "learned_range", "loss_type": "hybrid"}, {"channels": 3, "image_size": 8}),   # 2C outputs
    ({"data": "swissroll", "var_type": "learned", "loss_type": "kl"}, {"channels": None, "image_size": None}),
])
def test_train_model_config_mirrors_train_build_model(overrides, info):
    from minidiff import train
    config = train.TrainConfig(ch=8, **overrides)
    model = train.build_model(config, info["channels"], info["image_size"], info.get("num_classes"))
    implied = checkpoint.model_shapes(checkpoint.train_model_config(train.config_to_dict(config), info))
    assert list(implied.items()) == [(n, p.shape) for n, p in model.named_parameters()]


def test_the_bundled_training_checkpoint_is_coherent():
    state = old_run()
    assert checkpoint.check_training_state(OLD_RUN, state) is state


# ---------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("part, key", [("model", FIRST), ("ema", f"shadow.{FIRST}")])
def test_save_refuses_non_finite_weights_and_keeps_the_last_good_checkpoint(tmp_path, part, key):
    path = tmp_path / "checkpoint.safetensors"
    checkpoint.save(path, old_run())
    before = path.read_bytes()
    for bad in (np.nan, np.inf):
        state = old_run()
        state[part][key][0, 0] = bad
        with pytest.raises(checkpoint.NonFiniteError, match=f"not saved: {part} tensor {key} holds NaN or infinite"):
            checkpoint.save(path, state)
        assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.safetensors"]
    state = old_run()
    state["optimizer"]["grad_clip"] = np.asarray(np.nan)   # NaN means "no clipping" there: not a weight
    checkpoint.save(path, state)


def test_loading_non_finite_weights_is_refused(tmp_path):
    path = mutated(tmp_path, lambda s: s["ema"][f"shadow.{FIRST}"].__setitem__((0, 0), np.nan))
    with pytest.raises(checkpoint.NonFiniteError, match=f"EMA tensor {FIRST} holds NaN or infinite values"):
        checkpoint.load(path)
    path = mutated(tmp_path, lambda s: s["model"]["conv_out.bias"].__setitem__(0, -np.inf))
    with pytest.raises(checkpoint.NonFiniteError, match="model tensor conv_out.bias holds NaN"):
        checkpoint.load(path)


def test_first_non_finite_checks_in_bounded_pieces():
    a = np.zeros(3 * 1000 + 7, np.float32)
    assert checkpoint.first_non_finite({"a": a, "i": np.arange(3)}, chunk=1000) is None
    a[-1] = np.nan
    assert checkpoint.first_non_finite({"i": np.arange(3), "a": a}, chunk=1000) == "a"


# ---------------------------------------------------------------- the command line


def run_cli(*argv):
    from minidiff.cli import main
    return main([str(a) for a in argv])


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


HOSTILE = {
    "metadata is a string": ({"__metadata__": "minidiff"}, "its __metadata__ is the string"),
    "version x": (minidiff_header(version="x"), 'version "x" is not a whole number'),
    "state []": (minidiff_header(state="[]"), "its state is a list"),
    "nested state": (minidiff_header(state=DEEP), "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_cli_sample_and_resume_refuse_hostile_metadata_with_one_line(tmp_path, capsys, case):
    header, expected = HOSTILE[case]
    run = tmp_path / "run"
    run.mkdir()
    path = write_raw(run / "checkpoint.safetensors", header)
    assert run_cli("sample", "--checkpoint", path, "--num", 1, "--out", tmp_path / "s.png") == 2
    assert expected in one_error_line(capsys)
    assert run_cli("train", "--out", run, "--resume", "--steps", 5) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("change, expected", [
    (set_in("step", "x"), 'step is the string "x"'),
    (set_in("config", "ch", 8), "its training config implies temb.dense0.weight"),
    (set_in("model", "conv_out.bias", np.full(1, np.nan, np.float32)), "conv_out.bias holds NaN"),
])
def test_cli_sample_and_resume_refuse_incoherent_training_checkpoints(tmp_path, capsys, change, expected):
    path = mutated(tmp_path, change)
    assert run_cli("sample", "--checkpoint", path, "--num", 1, "--out", tmp_path / "s.png") == 2
    assert expected in one_error_line(capsys)
    assert run_cli("sample", "--checkpoint", path, "--num", 1, "--no-ema", "--out", tmp_path / "s.png") == 2
    assert expected in one_error_line(capsys)
    assert run_cli("train", "--out", path.parent, "--resume", "--steps", 5) == 2
    assert expected in one_error_line(capsys)


# ---------------------------------------------------------------- temporaries left by killed writers


def dead_pid():
    """The id of a process that has ended (and been reaped)."""
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def temporary_of(path, pid, host=None):
    name = os.path.basename(path)
    host = checkpoint._host_tag() if host is None else host
    tmp = path.parent / f".{name}-{host}-{pid}-abc_1234{os.path.splitext(name)[1]}"
    tmp.write_bytes(b"half a checkpoint")
    return tmp


@pytest.mark.skipif(os.name != "posix", reason="process ids are checked on POSIX only")
def test_the_next_save_or_load_removes_temporaries_of_killed_writers(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    stale = temporary_of(path, dead_pid())
    alive = temporary_of(path, os.getppid())                   # a writer still running
    elsewhere = temporary_of(path, dead_pid(), host="other-machine")   # can't tell from here: kept
    other_file = temporary_of(tmp_path / "other.safetensors", dead_pid())  # another checkpoint's: not ours
    checkpoint.save(path, {"step": 1})
    assert not stale.exists() and alive.exists() and elsewhere.exists() and other_file.exists()
    stale = temporary_of(path, dead_pid())
    assert checkpoint.load(tmp_path)["step"] == 1
    assert not stale.exists() and alive.exists()


@pytest.mark.skipif(os.name != "posix", reason="kill -9 and process ids are POSIX")
def test_a_writer_killed_mid_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    import signal
    import subprocess
    import sys
    path = tmp_path / "checkpoint.safetensors"
    checkpoint.save(path, {"step": 1})
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from minidiff import checkpoint
with checkpoint.atomic_path({str(path)!r}) as tmp:
    open(tmp, "wb").write(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    left = [name for name in os.listdir(tmp_path) if name != "checkpoint.safetensors"]
    assert len(left) == 1 and f"-{writer.pid}-" in left[0]
    assert checkpoint.load(path)["step"] == 1   # the old checkpoint is whole
    checkpoint.save(path, {"step": 2})
    assert os.listdir(tmp_path) == ["checkpoint.safetensors"] and checkpoint.load(path)["step"] == 2


# ---------------------------------------------------------------- the run folder's lock


def _dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_a_run_folder_lock_names_its_holder_and_refuses_a_second(tmp_path):
    with checkpoint.RunFolderLock(str(tmp_path)):
        with pytest.raises(checkpoint.RunFolderLocked, match=rf"in use by process {os.getpid()} on "):
            checkpoint.RunFolderLock(str(tmp_path)).acquire()
    assert not (tmp_path / ".lock").exists()


def test_a_run_folder_lock_is_released_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with checkpoint.RunFolderLock(str(tmp_path)):
            raise RuntimeError("training failed")
    checkpoint.RunFolderLock(str(tmp_path)).acquire().release()


def test_a_stale_lock_is_replaced_and_a_foreign_one_is_not(tmp_path):
    import socket
    import time
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": "then"}))
    with checkpoint.RunFolderLock(str(tmp_path)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"host": "another-machine", "pid": 1, "since": "then", "command": "minidiff train"}))
    with pytest.raises(checkpoint.RunFolderLocked, match="another-machine.*delete"):
        checkpoint.RunFolderLock(str(tmp_path)).acquire()
    lock.write_text('{"host": "torn')                   # a holder killed while writing it
    with pytest.raises(checkpoint.RunFolderLocked):   # young: perhaps still being written
        checkpoint.RunFolderLock(str(tmp_path)).acquire()
    old = time.time() - 2 * checkpoint.LOCK_GRACE_S
    os.utime(lock, (old, old))
    checkpoint.RunFolderLock(str(tmp_path)).acquire().release()


def test_two_trainings_on_one_folder_the_second_is_refused(tmp_path):
    from minidiff import config as config_, train as training
    cfg = config_.make_config(ch=8, ch_mult=(1,), attn_resolutions=(), batch_size=4, num_timesteps=10, steps=3,
                              num_samples=4, sample_every=0)
    first = training.train(cfg, str(tmp_path))
    next(first)
    with pytest.raises(checkpoint.RunFolderLocked):
        next(training.train(cfg, str(tmp_path)))
    first.close()
    assert not (tmp_path / ".lock").exists()
