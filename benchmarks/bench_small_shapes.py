"""Where the small configurations' time goes: the costs that bound tiny and small against PyTorch.

    python benchmarks/bench_small_shapes.py               # every section, 2 threads
    python benchmarks/bench_small_shapes.py --sections pool gemm

Each section prints one table of medians (microseconds or milliseconds), measured side by side in this
process (PyTorch's columns where torch is installed; it is only a reference):
- pool:   one parallel region of the kernels' thread pool: an empty one, and two halves of a narrow GEMM
          against the same work in the calling thread;
- gemm:   the narrow GEMMs of tiny's 3x3 convolutions (numpy's OpenBLAS against torch.mm, 1 thread), and
          the convolution kernel against torch's conv2d at 1 and 2 threads;
- convs:  every convolution of tiny's sampling step, timed inside the step (the kernel's own calls), beside
          torch's conv2d on the same shape, and their sums per step;
- passes: one elementwise pass over a tiny activation (64 images, 8x8, 32 channels, channels-last): the
          cost every fused or unfused step of a norm pays, and a.sum(axis=0) against the GEMV column_sums;
- split:  tiny's sampling step with the per-op split (what minidiff does), as a whole-model batch split
          (each pool thread runs the U-Net on its share of the batch), on one thread, and with one chunk
          per op and OpenBLAS's own threads in the GEMMs.
BENCHMARKS.md, "Small shapes", records a run and what it says.
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
SECTIONS = ("pool", "gemm", "convs", "passes", "split")


def median_us(fn, reps=200, warmup=10):
    """The median time of one fn() call, in microseconds."""
    import numpy as np
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e6


def torch_or_none(threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def section_pool(threads):
    import numpy as np
    from minidiff.kernels import pool
    pool.set_num_threads(threads)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, 288), dtype=np.float32)
    w = rng.standard_normal((288, 32), dtype=np.float32)
    out = np.empty((4096, 32), np.float32)

    def rows(s, e):          # images s..e-1 of tiny's first 3x3 convolution, as its im2col GEMM
        np.matmul(a[s * 64:e * 64], w, out=out[s * 64:e * 64])

    print(f"\n### pool: one parallel region ({threads} threads)\n")
    print("| what | median us |")
    print("|---|---|")
    print(f"| empty region (hand the chunk to a worker, run our own, wait) | {median_us(lambda: pool.parallel_for(64, lambda s, e: None, threads)):.1f} |")
    serial = median_us(lambda: rows(0, 64))
    split = median_us(lambda: pool.parallel_for(64, rows, threads))
    half = median_us(lambda: rows(0, 32))
    print(f"| GEMM (4096 x 288) @ (288 x 32) in the calling thread | {serial:.1f} |")
    print(f"| its first half alone (the ideal split) | {half:.1f} |")
    print(f"| both halves on the pool | {split:.1f} (speed-up {serial / split:.2f}x, ideal {serial / half:.2f}x) |")


TINY_CONVS = [(64, 32, 8, 32), (64, 64, 4, 64), (64, 96, 8, 32), (64, 128, 4, 64)]   # (n, c, h=w, o), 3x3, pad 1


def section_gemm(threads):
    import numpy as np
    from threadpoolctl import threadpool_limits
    from minidiff.kernels import conv as kconv, pool
    torch = torch_or_none(1)
    rng = np.random.default_rng(0)
    print("\n### gemm: tiny's 3x3 convolutions (batch 64)\n")
    print("| n, c, h, o | im2col GEMM, numpy 1 thr GFLOP/s | torch.mm 1 thr GFLOP/s | minidiff conv 1 / 2 thr ms | torch conv2d 1 / 2 thr ms |")
    print("|---|---|---|---|---|")

    class Ctx:
        needs_input_grad = (False, False, False)

        def save_for_backward(self, *a):
            pass

    for n, c, h, o in TINY_CONVS:
        m, k = n * h * h, 9 * c
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, o), dtype=np.float32)
        flop = 2 * m * k * o
        with threadpool_limits(1, "blas"):
            np_gf = flop / median_us(lambda: a @ b, reps=50) / 1e3
        x = rng.standard_normal((n, h, h, c), dtype=np.float32).transpose(0, 3, 1, 2)   # channels-last, as in the model
        wt = rng.standard_normal((o, c, 3, 3), dtype=np.float32)
        bias = rng.standard_normal(o, dtype=np.float32)
        ms = []
        for t in (1, threads):
            pool.set_num_threads(t)
            with threadpool_limits(1, "blas"):
                ms.append(median_us(lambda: kconv.Conv2d.forward(Ctx(), x, wt, bias, (1, 1), (1, 1, 1, 1)), reps=50) / 1e3)
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            xt, wtt, bt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(wt), torch.from_numpy(bias)
            torch.set_num_threads(1)
            with torch.no_grad():
                t_gf = flop / median_us(lambda: torch.mm(ta, tb), reps=50) / 1e3
                tms = [median_us(lambda: torch.nn.functional.conv2d(xt, wtt, bt, padding=1), reps=50) / 1e3]
                torch.set_num_threads(threads)
                tms.append(median_us(lambda: torch.nn.functional.conv2d(xt, wtt, bt, padding=1), reps=50) / 1e3)
            tcols = f"{t_gf:.0f}", f"{tms[0]:.3f} / {tms[1]:.3f}"
        else:
            tcols = "(no torch)", "(no torch)"
        print(f"| {n}, {c}, {h}, {o} | {np_gf:.0f} | {tcols[0]} | {ms[0]:.3f} / {ms[1]:.3f} | {tcols[1]} |")
    pool.set_num_threads(threads)


def section_convs(threads):
    import collections
    import numpy as np
    sys.path.insert(0, HERE)
    import bench_speed
    from minidiff.kernels import conv as kconv, pool
    from minidiff.tensor import Tensor, no_grad
    pool.set_num_threads(threads)
    cfg = bench_speed.CONFIGS["tiny"]
    model = bench_speed.build_minidiff(cfg)
    model.eval()
    x0, t, *_ = bench_speed._host_batch(cfg)
    seen = collections.defaultdict(list)
    forward = kconv.Conv2d.forward

    def timed(ctx, x, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0)):
        t0 = time.perf_counter()
        out = forward(ctx, x, weight, bias, stride, padding)
        seen[(x.shape, weight.shape, stride, padding)].append(time.perf_counter() - t0)
        return out

    kconv.Conv2d.forward = staticmethod(timed)
    steps = 5
    try:
        for i in range(3 + steps):
            if i == 3:
                seen.clear()                       # the first steps fault in memory
            with no_grad():
                model(Tensor(x0), t)
    finally:
        kconv.Conv2d.forward = staticmethod(forward)
    torch = torch_or_none(threads)
    print(f"\n### convs: tiny's sampling step, each convolution shape ({threads} threads)\n")
    print("| x | weight | stride | calls per step | minidiff ms (in the step) | torch conv2d ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    total = total_torch = 0.0
    for (xs, ws, stride, pad), times in sorted(seen.items(), key=lambda kv: -sum(kv[1])):
        ours = float(np.median(times)) * 1e3
        calls = len(times) // steps
        total += ours * calls
        theirs = "(no torch) | "
        if torch is not None:
            xt = torch.randn(*xs)
            wt = torch.randn(*ws)
            with torch.no_grad():
                ms = median_us(lambda: torch.nn.functional.conv2d(
                    torch.nn.functional.pad(xt, (pad[2], pad[3], pad[0], pad[1])), wt, stride=stride), reps=30) / 1e3
            total_torch += ms * calls
            theirs = f"{ms:.3f} | {ours / ms:.2f}x"
        print(f"| {'x'.join(map(str, xs))} | {'x'.join(map(str, ws))} | {stride[0]} | {calls} | {ours:.3f} | {theirs} |")
    if torch is not None:
        print(f"\nPer step: minidiff's convolutions {total:.1f} ms, torch's {total_torch:.1f} ms")


def section_passes(threads):
    import numpy as np
    from minidiff.kernels import dense
    rng = np.random.default_rng(0)
    n, s, c = 64, 64, 32
    v = rng.standard_normal((n, s, c), dtype=np.float32)
    out, t = np.empty_like(v), np.empty_like(v)
    per_nc = rng.random((n, c), dtype=np.float32)[:, None, :]
    per_c = rng.random(c, dtype=np.float32)
    g = v.reshape(-1, c)
    print(f"\n### passes: one pass over a (64, 8x8, 32) float32 activation ({v.nbytes >> 10} KiB), 1 thread\n")
    print("| pass | median us |")
    print("|---|---|")
    rows = [
        ("x * scalar", lambda: np.multiply(v, np.float32(0.5), out=out)),
        ("x * y (same shape)", lambda: np.multiply(v, v, out=out)),
        ("x * per-(n, c) scale (a norm's scale)", lambda: np.multiply(v, per_nc, out=out)),
        ("x + per-channel bias", lambda: np.add(v, per_c, out=out)),
        ("tanh(x)", lambda: np.tanh(v, out=t)),
        ("einsum sum of squares per (n, c)", lambda: np.einsum("nsc,nsc->nc", v, v)),
        ("einsum sum per (n, c)", lambda: np.einsum("nsc->nc", v)),
        ("ones(S) @ x, sum per (n, c) (GEMVs)", lambda: np.matmul(dense.ones(np, s, np.float32), v)),
        ("bias gradient: g.sum(axis=0), g (4096, 32)", lambda: g.sum(axis=0)),
        ("bias gradient: column_sums(g) (a GEMV)", lambda: dense.column_sums(g)),
    ]
    for name, fn in rows:
        print(f"| {name} | {median_us(fn, reps=300):.1f} |")
    torch = torch_or_none(1)
    if torch is not None:
        from minidiff import functional as F, nn
        from minidiff.tensor import Tensor, no_grad
        x = rng.standard_normal((n, 8, 8, c), dtype=np.float32).transpose(0, 3, 1, 2)
        norm = nn.GroupNorm(32, c)
        tnorm = torch.nn.GroupNorm(32, c)
        xt = torch.from_numpy(np.ascontiguousarray(x))
        with no_grad():
            ours = median_us(lambda: F.group_norm(Tensor(x), 32, norm.weight, norm.bias, silu=True))
        with torch.no_grad():
            theirs = median_us(lambda: torch.nn.functional.silu(tnorm(xt)))
        print(f"| silu(GroupNorm(x)), minidiff's fused kernel / torch, 1 thread | {ours:.1f} / {theirs:.1f} |")


def section_split(threads):
    import numpy as np
    sys.path.insert(0, HERE)
    import bench_speed
    from minidiff.kernels import pool
    from minidiff.tensor import Tensor, no_grad
    cfg = bench_speed.CONFIGS["tiny"]
    model = bench_speed.build_minidiff(cfg)
    model.eval()
    x0, t, *_ = bench_speed._host_batch(cfg)

    def per_op():
        with no_grad():
            return model(Tensor(x0), t).data

    def batch_split():
        with no_grad():
            parts = pool.parallel_for(len(x0), lambda s, e: model(Tensor(x0[s:e]), t[s:e]).data)
        return np.concatenate(parts)

    print(f"\n### split: tiny's sampling step (batch 64), two ways to use {threads} threads\n")
    print("| how | median ms |")
    print("|---|---|")
    pool.set_num_threads(threads)
    a, b = per_op(), batch_split()
    print(f"| per-op split (minidiff: each op's chunks on the pool) | {median_us(per_op, reps=20, warmup=3) / 1e3:.1f} |")
    print(f"| whole-model batch split (each thread runs the U-Net on half the batch) | "
          f"{median_us(batch_split, reps=20, warmup=3) / 1e3:.1f} (max difference {float(np.abs(a - b).max()):.1e}) |")
    from threadpoolctl import threadpool_limits
    pool.set_num_threads(1)
    with threadpool_limits(1, "blas"):
        print(f"| one thread (pool and BLAS) | {median_us(per_op, reps=20, warmup=3) / 1e3:.1f} |")
    print(f"| one chunk per op, BLAS on {threads} threads | {median_us(per_op, reps=20, warmup=3) / 1e3:.1f} |")
    pool.set_num_threads(threads)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=2, help="the pool's threads (and torch's, where it runs 2)")
    args = parser.parse_args(argv)
    import platform
    import numpy as np
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Machine: {cpu}, {os.cpu_count()} logical CPUs, numpy {np.__version__}, load {load:.2f} at start")
    for name in args.sections:
        globals()[f"section_{name}"](args.threads)


if __name__ == "__main__":
    main()
