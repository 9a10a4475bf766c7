"""Data-parallel training over MPI: steps/s on 1 and 2 ranks, the all-reduce, and scaling on paper.

    python benchmarks/bench_mpi.py                  # about 2 minutes on 2 cores
    python benchmarks/bench_mpi.py --steps 40 --rounds 3 --no-cifar

Every process runs one BLAS thread (OPENBLAS/OMP/MKL/MINIDIFF_NUM_THREADS=1), so N ranks use
N cores. Measured here, side by side (A B A B, the machine is shared):
  1. training steps/s of the digits preset (batch 64, the default run) as `minidiff train`
     runs it: one process, then `mpiexec -n 2` (each rank 32 images), with the share of the
     step spent in the gradient Allreduce (including the wait for the slower rank);
  2. the time of one Allreduce (sum, in place, float32) of the digits model's gradient and of
     the 35.7M-parameter CIFAR-10 model's, between 2 ranks on this machine (shared memory);
  3. one training step of the CIFAR-10 model (Ho et al. App. B) at batch 2 on one rank: its
     CPU time per image is the compute that the estimate for 8 and 64 ranks starts from.
Then, on paper, the CIFAR-10 recipe (global batch 128) on N = 8 and 64 ranks: compute per
rank = (128 / N) x the measured time per image, plus a bandwidth-optimal all-reduce
(ring or reduce-scatter + all-gather, as MPICH picks for large messages): 2 (N-1)/N x bytes /
bandwidth + 2 (N-1) x latency, on 10 Gb/s Ethernet and on 100 Gb/s InfiniBand. minidiff
reduces after backward, without overlap, so the step is the sum of the two.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
JSON_TAG = "BENCH_MPI_JSON "
CIFAR = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
CIFAR_PARAMS = 35_746_307   # the README's count for this configuration (checked by the cifar worker)
NETWORKS = {  # name: (bandwidth bytes/s, per-message latency s)
    "10 Gb/s Ethernet": (1.25e9, 50e-6),
    "100 Gb/s InfiniBand": (12.5e9, 2e-6),
}
PAPER_BATCH = 128


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI_", "PMIX", "MV2_"))}
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MINIDIFF_NUM_THREADS"):
        env[name] = "1"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def spawn(ranks, *worker_args):
    """Run this script's worker on `ranks` processes; rank 0's JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *map(str, worker_args)]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith(JSON_TAG)]
    return json.loads(lines[-1][len(JSON_TAG):])


# ---------------------------------------------------------------- workers (one per process)


def worker_train(steps, warmup, overrides):
    """Steps/s of Trainer.train_step (the loop of `minidiff train`, without writing files)."""
    from minidiff import distributed
    from minidiff import train as training
    from minidiff.config import make_config
    world = distributed.world()
    reduce_time = [0.0]
    real = world.allreduce_mean_

    def timed(flat):   # the gradient Allreduce, its wait for the slower rank included
        t0 = time.perf_counter()
        real(flat)
        reduce_time[0] += time.perf_counter() - t0
        return flat

    world.allreduce_mean_ = timed
    config = make_config(**overrides, steps=warmup + steps, sample_every=0)
    trainer = training.Trainer(config)
    for _ in range(warmup):
        trainer.train_step()
    if world.size > 1:
        world.comm.Barrier()
    reduce_time[0] = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    params = trainer.optimizer.flat.size
    return {"ranks": world.size, "steps_per_s": steps / wall, "step_ms": 1e3 * wall / steps,
            "cpu_ms": 1e3 * cpu / steps, "allreduce_ms": 1e3 * reduce_time[0] / steps, "params": int(params),
            "batch": config.batch_size}


def worker_allreduce(sizes, reps):
    """Median time of World.allreduce_mean_ on float32 buffers of `sizes` elements."""
    from minidiff import backend, distributed
    world = distributed.world()
    out = {}
    for size in sizes:
        buf = backend.host.ones(size, dtype=backend.DTYPE)
        times = []
        for i in range(reps + 2):
            world.comm.Barrier()
            t0 = time.perf_counter()
            world.allreduce_mean_(buf)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out[str(size)] = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}
    return {"ranks": world.size, "allreduce": out}


def worker_cifar(batch, steps):
    """One training step of the paper's CIFAR-10 model (random 32x32 RGB data), one rank."""
    from minidiff import backend
    folder = tempfile.mkdtemp()
    try:
        path = os.path.join(folder, "cifar-shaped.npy")
        rng = backend.host.random.default_rng(0)
        backend.host.save(path, rng.integers(0, 256, (64, 32, 32, 3), dtype=backend.host.uint8))
        result = worker_train(steps, 1, dict(data=path, batch_size=batch, **CIFAR))
    finally:
        shutil.rmtree(folder)
    assert result["params"] == CIFAR_PARAMS, result["params"]
    # CPU time, not wall time: on a shared machine the wall clock also counts waits for a core,
    # and a rank of a real job has its core to itself.
    result["ms_per_image"] = result["cpu_ms"] / batch
    return result


def run_worker(argv):
    kind, args = argv[0], argv[1:]
    if kind == "train":
        result = worker_train(int(args[0]), int(args[1]), {})
    elif kind == "allreduce":
        result = worker_allreduce([int(s) for s in args[1:]], int(args[0]))
    else:
        result = worker_cifar(int(args[0]), int(args[1]))
    from minidiff import distributed
    if distributed.world().is_root:
        print(JSON_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the estimate


def allreduce_seconds(n, nbytes, bandwidth, latency):
    """Bandwidth-optimal all-reduce on n ranks (ring / reduce-scatter + all-gather)."""
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def estimate(ms_per_image, params):
    rows = []
    for n in (8, 64):
        compute = ms_per_image / 1e3 * PAPER_BATCH / n
        for net, (bw, lat) in NETWORKS.items():
            comm = allreduce_seconds(n, 4 * params, bw, lat)
            step = compute + comm
            rows.append((n, net, compute, comm, step, compute / step))
    return rows


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "(uptime unavailable)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=2, help="A B rounds of (1 rank, 2 ranks)")
    p.add_argument("--reps", type=int, default=10, help="timed all-reduces per size")
    p.add_argument("--no-cifar", action="store_true", help="skip the CIFAR-10 step; use --cifar-ms-per-image")
    p.add_argument("--cifar-ms-per-image", type=float, default=541.6,
                   help="with --no-cifar: BENCHMARKS.md's 1-thread figure (4332.5 ms for batch 8)")
    p.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args.worker)
    if mpiexec() is None:
        raise SystemExit('needs mpiexec and mpi4py: pip install "minidiff[mpi]"')
    print(f"load before: {uptime()}")
    train = {1: [], 2: []}
    for _ in range(args.rounds):   # A B A B: the machine is shared, drifts hit both sides
        for ranks in (1, 2):
            train[ranks].append(spawn(ranks, "train", args.steps, args.warmup))
    digits_params = train[1][0]["params"]
    reduce = spawn(2, "allreduce", args.reps, 1, digits_params, CIFAR_PARAMS)["allreduce"]
    if args.no_cifar:
        ms_per_image, cifar_note = args.cifar_ms_per_image, "BENCHMARKS.md's 1-thread train step (batch 8)"
    else:
        cifar = spawn(1, "cifar", 2, 2)
        ms_per_image, cifar_note = cifar["ms_per_image"], (f"measured: batch 2, {cifar['cpu_ms']:.0f} ms of CPU "
                                                            f"per step ({cifar['step_ms']:.0f} ms wall)")
    print(f"load after:  {uptime()}")

    print(f"\n## Training steps/s, digits preset (batch 64, {digits_params:,} parameters), 1 thread per rank\n")
    print("| ranks | images per rank | round | steps/s | step ms | CPU ms per rank | gradient Allreduce ms (share) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for ranks in (1, 2):
        for k, r in enumerate(train[ranks], 1):
            share = f"{r['allreduce_ms']:.2f} ({r['allreduce_ms'] / r['step_ms']:.0%})" if ranks > 1 else "-"
            print(f"| {ranks} | {r['batch'] // ranks} | {k} | {r['steps_per_s']:.2f} | {r['step_ms']:.1f} | "
                  f"{r['cpu_ms']:.1f} | {share} |")
    best = {n: max(r["steps_per_s"] for r in train[n]) for n in (1, 2)}
    print(f"\nspeed-up, best round of each: {best[2] / best[1]:.2f}x on 2 ranks (ideal 2x)")

    print("\n## One Allreduce (sum in place, float32), 2 ranks on this machine\n")
    print("| buffer | elements | bytes | median ms | min ms | GB/s (bytes / median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, size in (("1 float (latency)", 1), ("digits model", digits_params), ("CIFAR-10 model", CIFAR_PARAMS)):
        r = reduce[str(size)]
        print(f"| {name} | {size:,} | {4 * size:,} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | "
              f"{4 * size / r['median_ms'] / 1e6:.2f} |")

    print(f"\n## On paper: CIFAR-10 (35.7M parameters, global batch {PAPER_BATCH}) on N ranks\n")
    print(f"compute per image on one core: {ms_per_image:.0f} ms ({cifar_note})\n")
    print("| ranks | network | compute per rank s | all-reduce s | step s | efficiency | steps/s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n, net, compute, comm, step, eff in estimate(ms_per_image, CIFAR_PARAMS):
        print(f"| {n} | {net} | {compute:.2f} | {comm:.3f} | {step:.2f} | {eff:.0%} | {1 / step:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
