"""Data-parallel training over MPI (mpi4py): one process per rank, gradients averaged each step.

Under `mpiexec -n N` every rank holds the whole model. `--batch-size` is the *global* batch B:
each rank takes rows [r B/N, (r+1) B/N) of every global batch, in the order a 1-process run
draws them, and the random numbers of each row (its t, its noise, its dropout masks) are the
ones a 1-process run gives that row (ShardedGenerator). After backward one Allreduce over one
flat gradient buffer turns the N local means into the global mean, so every rank takes the
same Adam step from the same gradient: the run is the 1-process run up to float summation order.
Before backward a second, tiny all-reduce (two float64 numbers) gives every rank the global
batch's loss, so a NaN on any rank stops all of them at the same step, and a Ctrl-C flag.

mpi4py is imported only when the process was started by an MPI launcher, so a plain
`minidiff train` never touches MPI. With N = 1 every method here is a no-op.
May import: backend.
"""
import hashlib
import math
import os
import sys
import time
import traceback

from . import backend

MPI_INSTALL_HINT = 'pip install "minidiff[mpi]"'
# Environment variables by which launchers tell a process it is one of several ranks.
LAUNCHER_SIZE_VARS = ("PMI_SIZE",              # MPICH / Intel MPI (hydra), srun --mpi=pmi2
                      "OMPI_COMM_WORLD_SIZE",  # Open MPI
                      "MV2_COMM_WORLD_SIZE")   # MVAPICH2
LAUNCHER_RANK_VARS = ("PMIX_RANK",)            # srun --mpi=pmix, prrte: size unknown until MPI starts
FAIL_TAG = 7015          # point-to-point tag of a failing rank's report to rank 0
FORWARD_GRACE = 0.5      # seconds between printing the failure and MPI_Abort: MPICH's launcher lost the
                         # last lines of stderr in about 1 run of 3 without it (0 of 12 with it)
REPORT_TIMEOUT = 5.0     # seconds a failing rank waits for rank 0 to report it before aborting alone


class DistributedError(RuntimeError):
    """MPI is needed but unusable, or the ranks disagree (their parameters drifted apart)."""


def launcher_size(environ=None):
    """The number of ranks an MPI launcher announced: None without a launcher, 0 if it did not say."""
    environ = os.environ if environ is None else environ
    for name in LAUNCHER_SIZE_VARS:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 0 if any(name in environ for name in LAUNCHER_RANK_VARS) else None


_world = None


def world():
    """The World of this process (cached): MPI's COMM_WORLD under a launcher, else a 1-rank World.

    MINIDIFF_MPI=0 makes every process a 1-rank World (independent runs under mpiexec).
    """
    global _world
    if _world is None:
        _world = _detect()
    return _world


def is_root():
    """True unless this process is an MPI rank other than 0 (for messages printed once per job)."""
    return _world is None or _world.is_root


def _detect():
    size = launcher_size()
    if size is None or size == 1 or os.environ.get("MINIDIFF_MPI") == "0":
        return World()
    try:
        from mpi4py import MPI
    except ImportError as err:
        said = f"{size} ranks" if size else "several ranks"
        raise DistributedError(f"this process was started by an MPI launcher ({said}) but mpi4py cannot be "
                               f"imported ({err}): {MPI_INSTALL_HINT}, or set MINIDIFF_MPI=0 to run each "
                               f"process on its own") from None
    return World(MPI.COMM_WORLD, MPI)


class World:
    """This process's rank among `size` and the few collectives data parallelism needs."""

    def __init__(self, comm=None, mpi=None):
        self.comm, self.MPI = comm, mpi
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.stop_requested = False   # set by a Ctrl-C handler; the ranks agree on it at the next step
        self.stop_agreed = False      # some rank's stop request, agreed on by global_loss (MPI only)

    @property
    def is_root(self):
        """Rank 0 alone writes checkpoints, logs, pictures and the progress bar."""
        return self.rank == 0

    def __repr__(self):
        return f"World(rank={self.rank}, size={self.size})"

    # ------------------------------------------------------------ the data: each rank's share

    def check_batch(self, batch_size):
        """The global batch must split into equal shares (equal shares make the mean of means the mean)."""
        if batch_size % self.size:
            lower, upper = batch_size // self.size * self.size, -(-batch_size // self.size) * self.size
            hint = f"{lower} or {upper}" if lower else f"{upper}"
            raise ValueError(f"batch_size must split evenly among the {self.size} MPI ranks (it is the global "
                             f"batch), got {batch_size}: use a multiple of {self.size}, e.g. {hint}")

    def shard(self, batch):
        """This rank's rows of a global batch (a view): rows [r B/N, (r+1) B/N)."""
        if self.size == 1:
            return batch
        n = len(batch) // self.size
        return batch[self.rank * n:(self.rank + 1) * n]

    def sharded(self, generator):
        """`generator` as seen by this rank: each draw of (n, ...) yields this rank's rows of (N n, ...)."""
        return generator if self.size == 1 else ShardedGenerator(generator, self.rank, self.size)

    # ------------------------------------------------------------ collectives

    def _wait(self, request):
        """Complete a nonblocking collective; rank 0 meanwhile listens for a failing rank's report."""
        if not self.is_root:
            request.Wait()
            return
        while not request.Test():
            if self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=FAIL_TAG):
                message = self.comm.recv(source=self.MPI.ANY_SOURCE, tag=FAIL_TAG)
                self.abort(message)

    def mean(self, values):
        """The mean over ranks of a few Python floats (one small all-reduce, float64)."""
        if self.size == 1:
            return list(values)
        buf = backend.host.asarray(values, dtype=backend.host.float64)
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM))
        return [float(v) / self.size for v in buf]

    def gather(self, values):
        """The global batch's 1-D host array from this rank's share `values` (equal lengths on every rank):
        the ranks' arrays concatenated in rank order, which is the global batch's order (shard)."""
        if self.size == 1:
            return values
        values = backend.host.ascontiguousarray(values)
        out = backend.host.empty(len(values) * self.size, dtype=values.dtype)
        self._wait(self.comm.Iallgather(values, out))
        return out

    def global_loss(self, value):
        """The global batch's loss from this rank's share's `value` (equal shares: the mean of the
        ranks' means), in the same small all-reduce that lets the ranks agree on a stop request:
        afterwards `stop_agreed` says whether some rank asked to stop after this step (Ctrl-C)."""
        if self.size == 1:
            return value
        value, stop = self.mean([value, float(self.stop_requested)])
        self.stop_agreed = stop > 0
        return value

    def allreduce_mean_(self, flat):
        """Replace the flat array `flat` by its mean over ranks, in place, with one Allreduce.

        A cupy array makes the trip through host memory (a device-to-host copy each way):
        correct with any MPI. On multi-GPU nodes NCCL (cupy.cuda.nccl) or a CUDA-aware MPI
        would reduce the device buffer in place; the README's section on several machines
        says how.
        """
        if self.size == 1:
            return flat
        on_host = backend.xp_of(flat) is backend.host
        buf = flat if on_host else backend.to_numpy(flat)
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM))
        buf *= buf.dtype.type(1.0 / self.size)
        if not on_host:
            flat[...] = backend.xp_of(flat).asarray(buf)
        return flat

    def mean_gradients_(self, flat_params):
        """Average the gradients of an optim.FlatParameters over ranks: one Allreduce of its flat `grad`.

        Each rank's gradient is that of its share's mean loss; with equal shares their mean
        is the gradient of the global batch's mean loss, the 1-process gradient.
        gather_grads() first puts every .grad into the buffer (zeros where a parameter has
        none: the same parameters on every rank, since that depends on the graph only).
        """
        if self.size > 1:
            flat_params.gather_grads()
            self.allreduce_mean_(flat_params.grad)

    def check_replicas(self, arrays, step):
        """Compare a checksum of `arrays` (the weights and optimizer state) across ranks.

        Every rank applies the same update to the same weights, so they stay bit-identical;
        a difference means a bug or bad hardware, and a checkpoint of one rank's weights
        would misrepresent the run. Raises DistributedError on every rank.
        """
        if self.size == 1:
            return
        digest = hashlib.blake2b(digest_size=16)
        for a in arrays:
            digest.update(backend.host.ascontiguousarray(backend.to_numpy(a)).view(backend.host.uint8))
        digests = self.comm.allgather(digest.hexdigest())
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise DistributedError(f"the parameters differ across MPI ranks at step {step} (rank"
                                   f"{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))} against "
                                   f"rank 0): the replicas drifted "
                                   f"apart, so no checkpoint was written for this step")

    def from_root(self, fn):
        """fn() on rank 0, its result broadcast to all ranks (an exception is re-raised on every rank).

        Lets a resumed run read its checkpoint on rank 0's machine only: the other machines
        need no shared filesystem.
        """
        if self.size == 1:
            return fn()
        result, error = None, None
        if self.is_root:
            try:
                result = fn()
            except Exception as err:   # sent as an exception, re-raised everywhere
                error = err
        result, error = self.comm.bcast((result, error), root=0)
        if error is not None:
            raise error
        return result

    def first_error(self, error):
        """Agree on setup errors: every rank passes its exception (or None); if any rank has one, all
        raise rank 0's, or the first failing rank's with its rank named. A collective call.
        """
        if self.size == 1:
            if error is not None:
                raise error
            return
        errors = self.comm.allgather(error)
        failing = [(r, e) for r, e in enumerate(errors) if e is not None]
        if not failing:
            return
        rank, err = failing[0]
        if rank != 0:
            err = type(err)(f"on MPI rank {rank} of {self.size}: {err}")
        raise err

    # ------------------------------------------------------------ failure: end the whole job

    def abort(self, message, code=1):
        """Print `message` on stderr and end every rank of the job (MPI_Abort): none is left waiting."""
        print(message, file=sys.stderr, flush=True)
        if self.size == 1:
            raise SystemExit(code)
        time.sleep(FORWARD_GRACE)   # MPI_Abort tears the job down at once; let mpiexec pass the message on
        self.comm.Abort(code)

    def report_failure(self, message):
        """A failing rank: hand `message` to rank 0, which prints it and aborts the job; if rank 0
        does not take it within REPORT_TIMEOUT seconds (busy writing a checkpoint, or gone),
        print it here and abort alone.
        """
        if self.is_root or self.size == 1:
            self.abort(message)
        request = self.comm.isend(message, dest=0, tag=FAIL_TAG)
        deadline = time.monotonic() + REPORT_TIMEOUT
        while time.monotonic() < deadline:
            if request.Test():     # delivered; rank 0 aborts the job (and this process with it)
                time.sleep(0.05)
            else:
                time.sleep(0.01)
        self.abort(message)

    def fail(self, err, advice=""):
        """After `err` on this rank: with N > 1, end every rank (MPI_Abort) with a message naming the
        rank and the error, plus `advice` (the step, the last checkpoint), printed by rank 0. Returns
        (for the caller to re-raise) only in a 1-rank world.
        """
        if self.size == 1:
            return
        detail = "".join(traceback.format_exception_only(type(err), err)).strip()
        self.report_failure(f"minidiff train: error on MPI rank {self.rank} of {self.size}: {detail}"
                            + (f"\n{advice}" if advice else ""))


class ShardedGenerator(backend.Generator):
    """A Generator seen by rank `rank` of `size`: a draw of shape (n, ...) returns rows
    [rank n, (rank+1) n) of the (size n, ...) draw the underlying stream would give.

    Row i of the global batch thus gets the same t, noise, label drop and dropout mask
    whatever the number of ranks, and the stream's state after each draw is the 1-process
    state, so a checkpoint written by any rank count resumes under any other. Normals,
    integers and uniforms draw the global block and keep a slice: they are batch-sized
    (t, eps, the p_uncond draw), small next to the network's work. Dropout masks, as large
    as the activations, are counter-based (keep_mask): each rank computes only its own rows.
    """

    def __init__(self, generator, rank, size):
        self.base, self.rank, self.size = generator, rank, size
        self.seed, self._rng = generator.seed, generator.host_rng()   # the same stream: state is shared

    def _rows(self, block):
        n = len(block) // self.size
        return block[self.rank * n:(self.rank + 1) * n]

    def _global(self, shape):
        return (shape[0] * self.size, *shape[1:])

    def normal(self, shape, dtype=backend.DTYPE, like=None):
        shape = tuple(shape)
        draws = self._rng.standard_normal(self._global(shape), dtype=backend.host.float64)
        return self._put(self._rows(draws).astype(dtype), like)

    def integers(self, low, high, shape, like=None):
        shape = tuple(shape)
        return self._put(self._rows(self._rng.integers(low, high, self._global(shape), dtype=backend.host.int64)), like)

    def uniform(self, shape, low=0.0, high=1.0, dtype=backend.DTYPE, like=None):
        shape = tuple(shape)
        return self._put(self._rows(self._rng.uniform(low, high, self._global(shape))).astype(dtype), like)

    def keep_mask(self, shape, p, like=None, first=0):
        """Dropout masks are counter-based (backend.Generator.keep_mask): this rank's rows are the
        entries after the earlier ranks' of the one global mask, from the same one key."""
        return super().keep_mask(shape, p, like=like, first=first + self.rank * math.prod(shape))
