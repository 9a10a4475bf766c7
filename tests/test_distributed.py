"""Data-parallel training over MPI: `mpiexec -n 2 python -m minidiff train` is the 1-process run.

The unit tests need nothing; the end-to-end tests need mpi4py and an `mpiexec` (the `mpi`
extra: pip install "minidiff[mpi]"). On a user's machine without them those skip with a
message; in CI (CI=true, where .ci/run installs the extra) a skip would hide a broken
feature, so it is a failure.
"""
import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minidiff import backend, checkpoint, cli, distributed, sampling
from minidiff import train as training
from processes import signal_and_wait

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--ch", "8", "--ch-mult", "1", "--attn-resolutions", "--batch-size", "8", "--num-timesteps", "10",
        "--num-samples", "4", "--warmup", "2", "--no-progress", "--sample-every", "0"]
# Dropout and flips make every per-sample random number matter; checkpoints at 3 and 6
# exercise the replica checksum.
RUN = [*TINY, "--dropout", "0.1", "--hflip", "--checkpoint-every", "3"]
# 2 ranks against 1 process, float32: the global batch's mean loss and gradient are summed in
# another order (two half-batch means, BLAS blocking for 4 rows instead of 8), ~1e-7 relative.
# Adam passes such differences on at about their size (observed: at most 2e-7 on the weights
# after 6 steps); a wrong shard, wrong random numbers or a missing average moves weights by
# about one Adam step, lr = 1e-3, and a missing 1/N doubles the logged gradient norm.
WEIGHT_ATOL = 1e-5   # 1% of one Adam step at the peak learning rate
LOSS_RTOL = 1e-5


# ---------------------------------------------------------------- without MPI


def _same_stream(a, b):
    """PCG64 states equal; the buffered 32-bit half counts only while one is pending."""
    a, b = dict(a), dict(b)
    if not a["has_uint32"] and not b["has_uint32"]:
        a["uinteger"] = b["uinteger"] = 0
    return a == b


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_each_rank_draws_its_rows_of_the_global_draw(size):
    """Concatenated over ranks, the sharded draws are the 1-process draws, and the stream ends where it does."""
    n = 3   # odd: the integer draws leave a buffered 32-bit half, pending after the uniforms as in 1 process
    reference = backend.Generator([5, 2])
    want = [reference.integers(0, 10, (n * size,)), reference.uniform((n * size, 2, 3)),
            reference.normal((n * size, 4)), reference.integers(0, 10, (n * size,)),
            reference.uniform((n * size, 5), low=-1.0, high=2.0), reference.keep_mask((n * size, 3, 2), 0.3)]
    got, states = [], []
    for rank in range(size):
        g = distributed.ShardedGenerator(backend.Generator([5, 2]), rank, size)
        got.append([g.integers(0, 10, (n,)), g.uniform((n, 2, 3)), g.normal((n, 4)), g.integers(0, 10, (n,)),
                    g.uniform((n, 5), low=-1.0, high=2.0), g.keep_mask((n, 3, 2), 0.3)])
        states.append(g.get_state())
    for k, expected in enumerate(want):
        np.testing.assert_array_equal(np.concatenate([draws[k] for draws in got]), expected)
    assert all(_same_stream(state, reference.get_state()) for state in states)


def test_a_world_of_one_is_the_plain_run():
    world = distributed.World()
    batch = np.arange(12).reshape(6, 2)
    assert (world.rank, world.size, world.is_root) == (0, 1, True)
    assert world.shard(batch) is batch
    g = backend.Generator(0)
    assert world.sharded(g) is g
    assert world.mean([1.5, 2.0]) == [1.5, 2.0]
    assert world.from_root(lambda: 7) == 7
    world.check_replicas([np.ones(3)], step=1)
    world.first_error(None)
    with pytest.raises(ValueError, match="boom"):
        world.first_error(ValueError("boom"))


class FakeComm:
    """Rank 0 of 2, whose peer answers `peer` to every collective (the arithmetic of the checks, without MPI)."""

    def __init__(self, peer):
        self.peer = peer

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def allgather(self, value):
        return [value, self.peer(value)]

    def bcast(self, value, root=0):
        return value


def test_replicas_that_differ_stop_the_run():
    weights = [np.arange(6, dtype=np.float32)]
    distributed.World(FakeComm(lambda digest: digest)).check_replicas(weights, step=4)
    with pytest.raises(distributed.DistributedError, match="differ across MPI ranks at step 4 .rank 1 against rank 0"):
        distributed.World(FakeComm(lambda digest: "another digest")).check_replicas(weights, step=4)


def test_setup_errors_are_agreed_on():
    quiet = distributed.World(FakeComm(lambda error: None))
    quiet.first_error(None)
    with pytest.raises(ValueError, match="^on rank 0$"):
        quiet.first_error(ValueError("on rank 0"))
    with pytest.raises(FileNotFoundError, match="^on MPI rank 1 of 2: no data here$"):
        distributed.World(FakeComm(lambda error: FileNotFoundError("no data here"))).first_error(None)
    with pytest.raises(KeyError):   # rank 0's own error comes first
        distributed.World(FakeComm(lambda error: ValueError("later"))).first_error(KeyError("first"))
    assert distributed.World(FakeComm(None)).from_root(lambda: 41 + 1) == 42
    with pytest.raises(OSError, match="disk"):
        distributed.World(FakeComm(None)).from_root(lambda: (_ for _ in ()).throw(OSError("disk")))


def test_launcher_size_from_the_environment():
    assert distributed.launcher_size({}) is None
    assert distributed.launcher_size({"PMI_SIZE": "4", "PMI_RANK": "1"}) == 4
    assert distributed.launcher_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    assert distributed.launcher_size({"PMIX_RANK": "0"}) == 0   # a launcher that does not say the size


def test_batch_must_split_evenly():
    world = distributed.World()
    world.size = 4   # the check is arithmetic only
    world.check_batch(8)
    with pytest.raises(ValueError, match="among the 4 MPI ranks .*got 10: use a multiple of 4, e.g. 8 or 12"):
        world.check_batch(10)
    with pytest.raises(ValueError, match="e.g. 4$"):
        world.check_batch(3)


def test_plain_run_never_imports_mpi4py():
    """Without a launcher in the environment, `minidiff train` does not touch MPI at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI_", "PMIX", "MV2_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = ("import sys; from minidiff import cli, distributed; w = distributed.world(); "
            "print(w.size, 'mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"]


def test_launched_without_mpi4py_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)   # import mpi4py now fails
    monkeypatch.setattr(distributed, "_world", None)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--steps", "1", *TINY]) == 1
    err = capsys.readouterr().err
    assert "started by an MPI launcher (2 ranks) but mpi4py cannot be imported" in err
    assert 'pip install "minidiff[mpi]"' in err and "MINIDIFF_MPI=0" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- under mpiexec


def _mpiexec():
    """The mpiexec beside this Python (a virtual environment's, from the mpich wheel) or on PATH."""
    beside = pathlib.Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _need_mpi():
    missing = [name for name, ok in (("mpi4py", importlib.util.find_spec("mpi4py") is not None),
                                     ("mpiexec", _mpiexec() is not None)) if not ok]
    if missing:
        message = (f"MPI tests need {' and '.join(missing)}: pip install \"minidiff[mpi]\" (mpi4py and the "
                   f"mpich wheel, which brings mpiexec)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; .ci/run installs the mpi extra, so in CI this is a failure, not a skip")
        pytest.skip(message)


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI_", "PMIX", "MV2_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1", MINIDIFF_NUM_THREADS="1")
    return env


def mpi_train(n, *argv, timeout=120):
    """`mpiexec -n N python -m minidiff train ARGV`: the CompletedProcess."""
    _need_mpi()
    cmd = [_mpiexec(), "-n", str(n), sys.executable, "-m", "minidiff", "train", *map(str, argv)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def plain_train(*argv):
    """`python -m minidiff train ARGV`, one process."""
    cmd = [sys.executable, "-m", "minidiff", "train", *map(str, argv)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    """Two run folders: the same logged loss and gradient norm at every step, the same final state."""
    ma, mb = _metrics(a), _metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    np.testing.assert_allclose([r["loss"] for r in mb], [r["loss"] for r in ma], rtol=LOSS_RTOL)
    np.testing.assert_allclose([r["grad_norm"] for r in mb], [r["grad_norm"] for r in ma], rtol=LOSS_RTOL)
    np.testing.assert_array_equal([r["lr"] for r in mb], [r["lr"] for r in ma])
    sa, sb = checkpoint.load(a), checkpoint.load(b)
    assert sa["step"] == sb["step"]
    assert sa["rng"]["batches"] == sb["rng"]["batches"]
    assert all(_same_stream(sa["rng"][k], sb["rng"][k]) for k in ("train", "default")), \
        "the random streams must end where the 1-process run's do"
    for part in ("model", "ema", "optimizer"):
        assert sa[part].keys() == sb[part].keys()
        for name in sa[part]:
            np.testing.assert_allclose(sb[part][name], sa[part][name], rtol=0, atol=WEIGHT_ATOL,
                                       err_msg=f"{part}.{name}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: 6 steps of the tiny U-Net, one process, `python -m minidiff train`."""
    _need_mpi()   # no reference run where the runs to compare with cannot start
    out = tmp_path_factory.mktemp("mpi") / "one"
    done = plain_train("--out", out, "--steps", 6, *RUN)
    assert done.returncode == 0, done.stderr
    return out


def test_two_ranks_train_the_one_process_run(one_process, tmp_path):
    two = tmp_path / "two"
    done = mpi_train(2, "--out", two, "--steps", 6, *RUN)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("(2 MPI ranks)") == 1, f"rank 0 alone reports, as one job of 2 ranks:\n{done.stderr}"
    assert_same_run(one_process, two)
    assert (two / "samples.png").stat().st_size > 0 and (two / "loss.png").stat().st_size > 0


def test_resume_a_one_process_checkpoint_under_two_ranks(one_process, tmp_path):
    run = tmp_path / "run"
    done = plain_train("--out", run, "--steps", 3, *RUN)
    assert done.returncode == 0, done.stderr
    done = mpi_train(2, "--out", run, "--resume", "--steps", 6, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "(2 MPI ranks)" in done.stderr
    assert_same_run(one_process, run)


def test_a_batch_that_does_not_split_is_one_clear_error(tmp_path):
    done = mpi_train(2, "--out", tmp_path / "run", "--steps", 2, *TINY[:5], "--batch-size", 7, *TINY[7:])
    assert done.returncode == cli.EXIT_USAGE, done.stderr
    assert done.stderr.count("--batch-size must split evenly among the 2 MPI ranks") == 1, done.stderr
    assert "use a multiple of 2, e.g. 6 or 8" in done.stderr
    assert not (tmp_path / "run").exists()


def _rank_pid(marker, rank, timeout=60):
    """The pid of MPI rank `rank` of the job whose command line contains `marker` (Linux /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in pathlib.Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    env = (proc / "environ").read_bytes().split(b"\0")
                    if f"PMI_RANK={rank}".encode() in env and b"minidiff" in (proc / "cmdline").read_bytes():
                        return int(proc.name)
        time.sleep(0.1)
    raise AssertionError(f"no MPI rank {rank} running {marker}")


def _start_long_run(out):
    _need_mpi()
    if not pathlib.Path("/proc/self/environ").exists():
        pytest.skip("finding a rank's pid reads /proc (Linux)")
    cmd = [_mpiexec(), "-n", "2", sys.executable, "-m", "minidiff", "train", "--out", str(out), "--steps", "100000",
           *TINY, "--checkpoint-every", "2"]
    job = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / training.CHECKPOINT).exists():   # wait for a checkpoint to keep
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.1)
    return job


def test_a_killed_rank_ends_the_job_within_seconds_and_the_checkpoint_loads(tmp_path):
    out = tmp_path / "killed"
    job = _start_long_run(out)
    try:
        os.kill(_rank_pid(str(out), 1), signal.SIGKILL)
        killed = time.monotonic()
        job.communicate(timeout=30)   # without the launcher's cleanup rank 0 would wait forever
        assert time.monotonic() - killed < 15
        assert job.returncode != 0
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    state = checkpoint.load(out)
    assert state["step"] >= 2 and state["step"] % 2 == 0
    model, _, _, _ = sampling.load_model(out)
    assert model.config["ch"] == 8


def test_a_failing_rank_is_reported_by_rank_0_and_ends_the_job(tmp_path):
    """A Python exception on rank 1 (here: its disk fails) reaches rank 0, which prints it and aborts every rank."""
    _need_mpi()
    script = tmp_path / "failing.py"
    script.write_text(
        "import sys\n"
        "from minidiff import cli, distributed, train\n"
        "real = train.Trainer.train_step\n"
        "def step(self):\n"
        "    if self.step == 3 and distributed.world().rank == 1:\n"
        "        raise OSError('No space left on device')\n"
        "    return real(self)\n"
        "train.Trainer.train_step = step\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    out = tmp_path / "run"
    cmd = [_mpiexec(), "-n", "2", sys.executable, str(script), "train", "--out", str(out), "--steps", "50",
           *TINY, "--checkpoint-every", "2"]
    began = time.monotonic()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60)
    assert time.monotonic() - began < 30
    assert done.returncode != 0
    assert "error on MPI rank 1 of 2: OSError: No space left on device" in done.stderr, done.stderr
    assert f"the last checkpoint (step 2) in {out} is intact" in done.stderr
    assert f"'minidiff train --out {out} --resume'" in done.stderr
    assert checkpoint.load(out)["step"] == 2


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_every_rank_after_the_same_step(tmp_path, signum):
    """mpiexec passes Ctrl-C (and SIGTERM, as a batch system stops a job) to every rank; they agree on the
    step, rank 0 saves it, resume continues."""
    out = tmp_path / "interrupted"
    job = _start_long_run(out)
    err = signal_and_wait(job, signum)
    assert job.returncode == 128 + signum, err
    last = _metrics(out)[-1]["step"]
    assert checkpoint.load(out)["step"] == last
    cause = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    assert f"interrupted{cause} after step {last}: checkpoint saved" in err and err.count("checkpoint saved") == 1


def one_and_two_ranks(tmp_path, args):
    """The run folders of `train ARGS` in one process and under 2 ranks, checked to be the same run."""
    one, two = tmp_path / "one", tmp_path / "two"
    done = plain_train("--out", one, *args)
    assert done.returncode == 0, done.stderr
    done = mpi_train(2, "--out", two, *args)
    assert done.returncode == 0, done.stderr
    assert_same_run(one, two)
    return one, two


def test_two_ranks_train_the_one_process_run_conditional(tmp_path):
    """Each sample's "no label" draw (p_uncond) is its own, like its t and noise: 2 ranks = 1 process."""
    args = ["--steps", 4, *RUN, "--conditional", "--p-uncond", "0.5"]
    one, two = one_and_two_ranks(tmp_path, args)
    assert checkpoint.load(two)["model_config"]["num_classes"] == 10


def test_gather_on_a_world_of_one_is_its_input():
    values = np.arange(4.0)
    assert distributed.World().gather(values) is values


def test_two_ranks_learn_the_one_process_importance_sampler(tmp_path):
    """Improved DDPM's importance sampling under MPI: each rank gathers the global batch's t and losses, so every
    rank keeps the 1-process history (Eq. 18's p_t) and draws the same t; 24 steps cross the warm-up."""
    args = ["--steps", 24, *RUN, "--learn-sigma", "--timestep-sampler", "importance"]
    one, two = one_and_two_ranks(tmp_path, args)
    a, b = checkpoint.load(one)["timestep_sampler"], checkpoint.load(two)["timestep_sampler"]
    assert (a["counts"] == 10).all()   # warmed up: the last steps drew t from p_t
    np.testing.assert_array_equal(a["counts"], b["counts"])
    np.testing.assert_allclose(b["history"], a["history"], rtol=LOSS_RTOL)


class GatherComm:
    """Rank `rank` of len(shares) whose Iallgather is MPI's: every rank's send buffer, in rank order, in the
    receive buffer (the other ranks' buffers are `shares`). The request is done at its second Test(), so rank 0's
    wait loop listens once for a failing rank's report (none comes)."""

    def __init__(self, rank, shares):
        self.rank, self.shares, self.probes = rank, shares, 0

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.shares)

    def Iallgather(self, send, recv):
        assert send.flags.c_contiguous and recv.flags.c_contiguous, "MPI takes contiguous buffers"
        assert send.dtype == recv.dtype and recv.size == send.size * len(self.shares)
        np.testing.assert_array_equal(send, self.shares[self.rank])
        parts = [send if r == self.rank else np.asarray(s, dtype=send.dtype) for r, s in enumerate(self.shares)]
        recv[...] = np.concatenate(parts)
        return GatherRequest()

    def Iprobe(self, source, tag):
        self.probes += 1
        return False


class GatherRequest:
    def __init__(self):
        self.tests = 0

    def Test(self):
        self.tests += 1
        return self.tests > 1

    def Wait(self):
        self.tests = 2


class FakeMPI:
    ANY_SOURCE = -1


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_gather_puts_the_shares_in_rank_order(dtype):
    """Whichever rank calls it, World.gather returns the shares of ranks 0, 1, 2 concatenated in that order (the
    global batch's order, the inverse of World.shard), of the shares' dtype; a strided share goes out contiguous."""
    shares = [np.array([3, 1], dtype=dtype), np.array([4, 1], dtype=dtype), np.array([5, 9], dtype=dtype)]
    batch = np.concatenate(shares)
    for rank in range(3):
        comm = GatherComm(rank, shares)
        world = distributed.World(comm, FakeMPI)
        np.testing.assert_array_equal(world.shard(batch), shares[rank])
        strided = np.repeat(shares[rank], 2)[::2]   # the same values, not contiguous
        for mine in (shares[rank], strided):
            out = world.gather(mine)
            assert out.dtype == dtype
            np.testing.assert_array_equal(out, batch)
        assert comm.probes == (2 if rank == 0 else 0)   # rank 0 listened while it waited, the others just waited


def test_gather_on_a_world_of_one_is_its_input_whatever_it_is():
    values = np.arange(6, dtype=np.int64)[::2]
    assert distributed.World().gather(values) is values
