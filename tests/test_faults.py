"""Fault injection: the CLI as a flaky machine and a hostile user meet it, in real subprocesses.

Each test runs `python -m minidiff` the way a user would and then breaks something for real: the
disk fills (a file-size limit, `ulimit -f`, so no root or tmpfs is needed), memory is capped
(`ulimit -v`), the job is sent SIGTERM or SIGHUP, a file in the run folder is in the way, or a
small file declares an enormous array. The promise checked every time: one line on stderr and
exit 2 (for signals: a saved checkpoint and exit 128 + signal), and nothing written before is lost.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from minidiff import checkpoint
from processes import signal_and_wait

TINY = ["--ch", "8", "--ch-mult", "1", "--attn-resolutions", "--batch-size", "4", "--num-timesteps", "10",
        "--num-samples", "4", "--warmup", "2", "--no-progress", "--sample-every", "0"]
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MINIDIFF_NUM_THREADS": "1"}


def minidiff(*argv, limits=(), timeout=120):
    """`python -m minidiff ARGV` under resource `limits` ((RLIMIT_x, bytes), ...): the CompletedProcess."""
    def apply_limits():
        for which, value in limits:
            resource.setrlimit(which, (value, value))
    return subprocess.run([sys.executable, "-m", "minidiff", *map(str, argv)], env=ENV, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=apply_limits if limits else None)


def one_line(done):
    """The single error line of a failed command (exit 2): the last on stderr, after at most progress bars."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    *before, last = lines
    assert last.startswith("minidiff") and all("it/s" in line or "s/it" in line for line in before), done.stderr
    return last


def metrics_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def run_of_3_steps(tmp_path):
    """A finished 3-step run: its folder and the bytes of its checkpoint."""
    run = tmp_path / "run"
    done = minidiff("train", "--out", run, "--steps", 3, *TINY)
    assert done.returncode == 0, done.stderr
    return run, (run / checkpoint.FILENAME).read_bytes()


def no_temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"]


# ---------------------------------------------------------------- the disk


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(run_of_3_steps):
    """The checkpoint of step 6 cannot be written whole (ulimit -f below its size): one line naming the
    file and the cause, exit 2, and the step-3 checkpoint and its metrics rows as they were."""
    run, before = run_of_3_steps
    done = minidiff("train", "--out", run, "--resume", "--steps", 6, "--no-progress",
                    limits=[(resource.RLIMIT_FSIZE, len(before) // 2)])
    line = one_line(done)
    assert "File too large" in line and "intact" in line and "ulimit -f" in line, line
    assert (run / checkpoint.FILENAME).read_bytes() == before
    assert checkpoint.load(run)["step"] == 3
    assert metrics_steps(run)[:3] == [1, 2, 3]
    assert no_temporaries(run) == []
    done = minidiff("train", "--out", run, "--resume", "--steps", 6, "--no-progress")   # space again: it goes on
    assert done.returncode == 0, done.stderr
    assert checkpoint.load(run)["step"] == 6 and metrics_steps(run) == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_while_writing_samples_keeps_the_earlier_file(run_of_3_steps, tmp_path):
    run, _ = run_of_3_steps
    out = tmp_path / "samples.npz"
    out.write_bytes(b"earlier results")
    done = minidiff("sample", "--checkpoint", run, "--num", 64, "--steps", 2, "--out", out,
                    limits=[(resource.RLIMIT_FSIZE, 1024)])
    line = one_line(done)
    assert "File too large" in line and str(out) in line, line
    assert out.read_bytes() == b"earlier results"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".samples")] == []


def test_a_folder_where_the_metrics_file_goes_is_one_line(run_of_3_steps):
    run, before = run_of_3_steps
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    done = minidiff("train", "--out", run, "--resume", "--steps", 5, "--no-progress")
    line = one_line(done)
    assert "metrics.jsonl" in line and "folder" in line, line
    assert (run / checkpoint.FILENAME).read_bytes() == before


@pytest.mark.parametrize("command", [
    ["sample", "--num", 4, "--steps", 2],
    ["forward", "--steps", 3],
    ["interpolate", "--pairs", 1, "--lambdas", 2, "--t", 3],
])
def test_out_naming_an_existing_folder_is_one_line(run_of_3_steps, tmp_path, command):
    run, _ = run_of_3_steps
    folder = tmp_path / "pictures.png"
    folder.mkdir()
    checkpoint_args = [] if command[0] == "forward" else ["--checkpoint", run]
    assert "is a folder" in one_line(minidiff(*command, *checkpoint_args, "--out", folder))
    assert folder.is_dir() and not any(folder.iterdir())


# ---------------------------------------------------------------- signals


def _start_long_run(run):
    job = subprocess.Popen([sys.executable, "-m", "minidiff", "train", "--out", str(run), "--steps", "100000",
                            *TINY, "--checkpoint-every", "100000"], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:   # wait until it trains (a few metrics rows), not just imports
        if (run / "metrics.jsonl").exists() and job.poll() is None:
            time.sleep(1.0)
            return job
        time.sleep(0.1)
    job.kill()
    raise AssertionError(f"the training run did not start: {job.communicate()[1]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_a_checkpoint_like_ctrl_c(tmp_path, signum):
    """SLURM stops a job with SIGTERM; a closed terminal sends SIGHUP: the run saves the step it is at,
    says so, exits 128 + signal, and --resume continues from it."""
    run = tmp_path / "run"
    job = _start_long_run(run)
    err = signal_and_wait(job, signum)
    assert job.returncode == 128 + signum, err
    step = checkpoint.load(run)["step"]
    assert step >= 1 and metrics_steps(run)[-1] == step
    assert f"interrupted by {signal.Signals(signum).name} after step {step}: checkpoint saved" in err
    done = minidiff("train", "--out", run, "--resume", "--steps", step + 2, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert metrics_steps(run) == list(range(1, step + 3))


# ---------------------------------------------------------------- memory: small files that claim a lot


def _npz_declaring(path, shape):
    """An .npz of a few hundred bytes whose arr_0 header declares `shape` uint8: the array is not there."""
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    text = repr(header).encode()
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\0" * 64
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", member)


MEMORY_CAP = 3 << 30   # ulimit -v: room for Python, NumPy and BLAS, not for what the files claim


@pytest.mark.parametrize("shape", [(10 ** 7, 32, 32, 3), (2 ** 40, 8, 8, 1)])
def test_a_huge_declared_array_is_refused_under_a_memory_cap(tmp_path, shape):
    """A 300-byte .npz declaring 30 GB (or an overflowing shape) is refused from its header, before any
    allocation, in both readers: training data and eval --samples."""
    path = tmp_path / "claims.npz"
    _npz_declaring(path, shape)
    limits = [(resource.RLIMIT_AS, MEMORY_CAP)]
    train = minidiff("train", "--data", path, "--out", tmp_path / "run", "--steps", 1, *TINY, limits=limits)
    assert "claims.npz" in one_line(train)
    assert not (tmp_path / "run").exists()
    scored = minidiff("eval", "--samples", path, "--data", "digits", limits=limits)
    assert "claims.npz" in one_line(scored)


def test_a_zip_bomb_member_is_refused_under_a_memory_cap(tmp_path):
    """A deflated member of 256 KB whose header declares 2 GiB: refused before anything is inflated."""
    path = tmp_path / "bomb.npz"
    header = {"descr": "|u1", "fortran_order": False, "shape": (2 << 30,)}
    text = repr(header).encode()
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            member.write(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text)
            chunk = bytes(64 << 20)
            for _ in range(4):
                member.write(chunk)
    assert path.stat().st_size < 1 << 20
    line = one_line(minidiff("eval", "--samples", path, "--data", "digits",
                             limits=[(resource.RLIMIT_AS, MEMORY_CAP)]))
    assert "bomb.npz" in line


# ---------------------------------------------------------------- settings that would poison a run


@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--weight-decay", "nan"), ("--grad-clip", "inf"),
                                           ("--lr", "nan"), ("--ema-decay", "nan")])
def test_non_finite_settings_are_refused_before_anything_is_written(tmp_path, option, value):
    done = minidiff("train", "--out", tmp_path / "run", "--steps", 2, *TINY, option, value)
    assert option in one_line(done)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--eta", "nan"], "--eta"),
    (["--eta", "2"], "--eta"),
    (["--seed", "-1"], "--seed"),
    (["--progressive", "--frames", "1000000000", "--steps", "2", "--num", "1"], None),   # clamped: it finishes
])
def test_sampling_settings(run_of_3_steps, tmp_path, argv, message):
    run, _ = run_of_3_steps
    done = minidiff("sample", "--checkpoint", run, "--num", 4, "--steps", 3, *argv, "--out", tmp_path / "s.png",
                    timeout=60)
    if message is None:
        assert done.returncode == 0, done.stderr
    else:
        assert message in one_line(done)
        assert not (tmp_path / "s.png").exists()


def test_forward_steps_beyond_t_are_refused_at_once(tmp_path):
    began = time.monotonic()
    assert "--steps" in one_line(minidiff("forward", "--steps", 10 ** 9, "--out", tmp_path / "f.png"))
    assert time.monotonic() - began < 30


# ---------------------------------------------------------------- the run folder: one run at a time, nothing lost


def test_a_second_run_on_a_busy_folder_is_refused_and_the_first_goes_on(tmp_path):
    """Two runs on one folder at once would overwrite each other: the second gets one line naming the
    first (its pid), the first finishes its work, and the lock is gone afterwards."""
    run = tmp_path / "run"
    first = _start_long_run(run)
    try:
        second = minidiff("train", "--out", run, "--overwrite", "--steps", 5, *TINY)
        line = one_line(second)
        assert f"in use by process {first.pid}" in line and ".lock" in line, line
        assert first.poll() is None
    finally:
        err = signal_and_wait(first, signal.SIGINT)
    assert first.returncode == 130, err
    assert not (run / ".lock").exists()
    steps = metrics_steps(run)
    assert steps == list(range(1, len(steps) + 1))   # one run's rows, in order, none interleaved


def test_kill_9_leaves_a_stale_lock_the_next_run_replaces_and_keeps_every_row(tmp_path):
    """kill -9 right after a resume: the rows up to the checkpoint survive (the log is appended, not
    rewritten), the lock of the dead process is recognised as stale, and --resume goes on."""
    run = tmp_path / "run"
    done = minidiff("train", "--out", run, "--steps", 30, *TINY)
    assert done.returncode == 0, done.stderr
    job = subprocess.Popen([sys.executable, "-m", "minidiff", "train", "--out", str(run), "--resume", "--steps",
                            "100000", "--no-progress"], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    job.kill()
    job.communicate()
    assert metrics_steps(run)[:30] == list(range(1, 31))
    assert (run / ".lock").exists()   # left behind by kill -9
    done = minidiff("train", "--out", run, "--resume", "--steps", 32, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert metrics_steps(run) == list(range(1, 33)) and not (run / ".lock").exists()


def test_a_torn_last_metrics_line_is_repaired_on_resume(run_of_3_steps):
    run, _ = run_of_3_steps
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')          # what a crash mid-write leaves
    done = minidiff("train", "--out", run, "--resume", "--steps", 5, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert metrics_steps(run) == [1, 2, 3, 4, 5]
