"""Speed and memory of a DDPM training step and a sampling step: minidiff against PyTorch.

    python benchmarks/bench_speed.py                      # tiny, small, mnist, cifar on 2 threads
    python benchmarks/bench_speed.py --configs tiny small --profile
    python benchmarks/bench_speed.py --backend cupy       # GPU: minidiff on CuPy against torch CUDA

Training step = the DDPM eps loss (Ho et al. 2020, Eq. 14 / Algorithm 1) + backward + Adam
(global-norm clipping 1.0, as the paper). Sampling step = one U-Net forward under no_grad.
float32; the median over `--reps` timed repetitions after `--warmup` untimed ones.
Each (framework, config) runs in a fresh subprocess of this script, with
OMP/OPENBLAS/MKL_NUM_THREADS set before numpy or torch is imported, so that its peak
resident memory (VmHWM, reset once the model, the batch and Adam's moments exist)
belongs to the training step: activations, gradients and temporaries. Achieved GFLOP/s count conv and matmul FLOPs analytically
(backward = 2x forward) and are compared with a large float32 matrix product's rate
on the same library and thread count.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The benchmark configurations; cifar is the paper's 35.7M-parameter CIFAR-10 model.
CONFIGS = {
    "tiny": dict(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), batch=64),
    "small": dict(image_size=16, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), batch=32),
    "mnist": dict(image_size=32, in_channels=1, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), batch=16),
    "cifar": dict(image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                  dropout=0.1, batch=8),
}
# Fewer timed repetitions where one step takes seconds on 2 cores.
DEFAULT_REPS = {"tiny": 10, "small": 7, "mnist": 5, "cifar": 3}
DEFAULT_WARMUP = {"tiny": 3, "small": 2, "mnist": 2, "cifar": 1}
T_STEPS = 1000  # length of the linear beta schedule of the benchmark's diffusion
JSON_TAG = "BENCH_JSON "
FRAMEWORKS = ("minidiff", "minidiff+tuning", "torch")  # minidiff with tuning off (the default) and on


# ---------------------------------------------------------------- analytic FLOP count


def unet_flops(cfg):
    """Forward FLOPs (2 per multiply-add) of the convolutions and matrix products of one U-Net call.

    Walks the architecture exactly as minidiff.UNet builds it (like the original
    code); elementwise ops, norms and softmax are not counted (they are not GEMMs).
    """
    n, s0, ch, mult = cfg["batch"], cfg["image_size"], cfg["ch"], cfg["ch_mult"]
    nrb, attn = cfg["num_res_blocks"], set(cfg["attn_resolutions"])
    flops = {"conv": 0, "linear": 0, "attention": 0}

    def conv(cin, cout, s_out, k):
        flops["conv"] += 2 * n * s_out * s_out * cin * cout * k * k

    def res(cin, cout, s):
        conv(cin, cout, s, 3)
        flops["linear"] += 2 * n * 4 * ch * cout  # temb_proj
        conv(cout, cout, s, 3)
        if cin != cout:
            conv(cin, cout, s, 1)  # 1x1 shortcut (the original's nin_shortcut)

    def attention(c, s):
        conv(c, c, s, 1)  # q, k, v, proj_out are 1x1 projections
        conv(c, c, s, 1)
        conv(c, c, s, 1)
        conv(c, c, s, 1)
        flops["attention"] += 2 * (2 * n * (s * s) ** 2 * c)  # q k^T and P v

    flops["linear"] += 2 * n * (ch * 4 * ch + 4 * ch * 4 * ch)  # temb dense0, dense1
    conv(cfg["in_channels"], ch, s0, 3)
    skips, c, s = [ch], ch, s0
    for level, m in enumerate(mult):
        for _ in range(nrb):
            res(c, ch * m, s)
            c = ch * m
            if s in attn:
                attention(c, s)
            skips.append(c)
        if level != len(mult) - 1:
            s //= 2
            conv(c, c, s, 3)  # stride-2 downsample: output size s
            skips.append(c)
    res(c, c, s)
    attention(c, s)
    res(c, c, s)
    for level in reversed(range(len(mult))):
        for _ in range(nrb + 1):
            res(c + skips.pop(), ch * mult[level], s)
            c = ch * mult[level]
            if s in attn:
                attention(c, s)
        if level != 0:
            s *= 2
            conv(c, c, s, 3)  # upsample conv at the doubled size
    conv(c, cfg["in_channels"], s, 3)
    flops["total"] = flops["conv"] + flops["linear"] + flops["attention"]
    return flops


# ---------------------------------------------------------------- worker helpers (run in the subprocess)


def _set_env_threads(env, threads):
    """One thread count for every BLAS and OpenMP runtime and minidiff's own pool; effective only
    before numpy/torch import."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINIDIFF_NUM_THREADS"):
        env[var] = str(threads)


def _release_free_memory():
    """Hand memory malloc holds free back to the OS (glibc's malloc_trim), so that the baseline resident
    set is the live data: minidiff keeps freed blocks for reuse (kernels.memory.keep_freed_memory), and the GEMM
    peak's freed 16 MB matrices would otherwise sit resident and hide the step's own allocations."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss():
    """Reset the process's resident high-water mark (Linux VmHWM); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb(field):
    """VmRSS or VmHWM in MiB from /proc/self/status, or ru_maxrss as the fallback for the peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, warmup, reps, sync=lambda: None):
    """Median wall time, all wall times and median process CPU time (seconds) of fn() after warm-up.

    CPU time (all threads) is reported too: on a loaded machine it still measures the
    work done, where wall time also counts the waits for a core.
    """
    for _ in range(warmup):
        fn()
    sync()
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), times, statistics.median(cpu)


def _host_batch(cfg, seed=0):
    """The same x_0 in [-1, 1], timesteps and noise for both frameworks, as float32 numpy arrays."""
    import numpy as np
    rng = np.random.default_rng(seed)
    shape = (cfg["batch"], cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    x0 = rng.uniform(-1, 1, shape).astype(np.float32)
    t = rng.integers(0, T_STEPS, cfg["batch"]).astype(np.int64)
    noise = rng.standard_normal(shape).astype(np.float32)
    betas = np.linspace(1e-4, 0.02, T_STEPS, dtype=np.float64)  # Ho et al. 2020, Sec. 4
    abar = np.cumprod(1.0 - betas)
    a = np.sqrt(abar[t]).astype(np.float32).reshape(-1, 1, 1, 1)
    b = np.sqrt(1.0 - abar[t]).astype(np.float32).reshape(-1, 1, 1, 1)
    return x0, t, noise, a, b


def model_kwargs(cfg):
    return {k: v for k, v in cfg.items() if k != "batch"}


def _gemm_peak(matmul, make, sync=lambda: None, n=2048):
    """GFLOP/s of an n x n float32 matrix product (best of 5 after 2 warm-ups)."""
    a, b = make(n), make(n)
    best = float("inf")
    for i in range(7):
        t0 = time.perf_counter()
        matmul(a, b)
        sync()
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def build_minidiff(cfg, seed=0):
    import minidiff
    from minidiff.unet import UNet
    minidiff.manual_seed(seed)
    return UNet(**model_kwargs(cfg))


def worker_minidiff(cfg, args):
    import numpy as np
    from minidiff import backend
    from minidiff.optim import Adam
    from minidiff.tensor import Tensor, no_grad
    if args.backend == "cupy":
        backend.use_backend("cupy")
    xp = backend.xp()
    sync = (lambda: xp.cuda.Stream.null.synchronize()) if args.backend == "cupy" else (lambda: None)
    peak = _gemm_peak(lambda a, b: a @ b, lambda n: xp.asarray(np.random.rand(n, n).astype(np.float32)), sync)
    model = build_minidiff(cfg)
    opt = Adam(model.parameters(), lr=2e-4, grad_clip=1.0)
    x0, t, noise, a, b = (xp.asarray(v) for v in _host_batch(cfg))

    def train_step():
        x_t = Tensor(a * x0 + b * noise)  # q_sample, Eq. 4: data preparation, no gradient
        eps = model(x_t, t)
        loss = ((eps - Tensor(noise)) ** 2).mean()  # Eq. 14, the "simple" loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sample_step():
        with no_grad():
            model(Tensor(x0), t)

    # Adam() allocates its moments up front, but as zero pages the OS maps only when first written, so the
    # first step would count them: a step on zero gradients (no change to the weights) makes them resident,
    # as the torch side does for its lazily created moments
    for p in model.parameters():
        p.grad = xp.zeros_like(p.data)
    opt.step()
    opt.zero_grad()
    sync()
    _release_free_memory()
    base_rss = _rss_mb("VmRSS")
    from minidiff.kernels import tuning
    tuning_steps = 0
    while tuning.setting() != "off" and tuning_steps < 200 and (tuning_steps == 0 or tuning.searching()):
        train_step()    # tuning times each shape's first calls: let every search end before the timed steps
        model.eval()
        sample_step()
        model.train()
        tuning_steps += 1
    if tuning_steps:
        _release_free_memory()
    reset = _reset_peak_rss()
    if args.backend == "cupy":
        pool = xp.get_default_memory_pool()
        pool.free_all_blocks()
        base_pool = pool.used_bytes()
    train, train_all, train_cpu = _time(train_step, args.warmup, args.reps, sync)
    peak_rss = _rss_mb("VmHWM")
    out = dict(train_s=train, train_all=train_all, train_cpu_s=train_cpu, gemm_peak=peak, base_mb=base_rss,
               peak_mb=peak_rss, peak_reset=reset, params=sum(p.size for p in model.parameters()))
    if args.backend == "cupy":
        out["gpu_peak_mb"] = (pool.total_bytes() - base_pool) / 2 ** 20  # pool never shrinks: ~ peak held
    model.eval()  # sampling runs without dropout (cifar has dropout 0.1)
    out["sample_s"], out["sample_all"], out["sample_cpu_s"] = _time(sample_step, args.warmup, args.reps, sync)
    if tuning.setting() != "off":   # the shapes were timed during the untimed warm-up steps
        out["tuning_s"], out["tuning_report"] = tuning.seconds_spent(), tuning.format_report()
        out["tuning_steps"] = tuning_steps
    if args.profile:
        model.train()
        out["profile"] = profile_minidiff(train_step, sync, reps=max(2, args.reps // 2))
        model.eval()
        out["profile_sample"] = profile_minidiff(sample_step, sync, reps=max(2, args.reps // 2))
    return out


def worker_torch(cfg, args):
    import torch
    sys.path.insert(0, HERE)
    from torch_unet import TorchUNet
    torch.set_num_threads(args.threads)
    dev = "cuda" if args.backend == "cupy" else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this torch build sees no CUDA device: no GPU reference")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    peak = _gemm_peak(torch.matmul, lambda n: torch.rand(n, n, device=dev), sync)
    torch.manual_seed(0)
    model = TorchUNet(**model_kwargs(cfg), num_groups=args.num_groups or minidiff_groups(cfg)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    x0, t, noise, a, b = (torch.from_numpy(v).to(dev) for v in _host_batch(cfg))

    def train_step():
        x_t = a * x0 + b * noise
        loss = ((model(x_t, t) - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def sample_step():
        with torch.no_grad():
            model(x0, t)

    # torch creates Adam's moments at the first step, minidiff in Adam(): make them exist here too, with a
    # step on zero gradients (no change to the weights), so that neither side's step memory counts them
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    _release_free_memory()
    base_rss = _rss_mb("VmRSS")
    reset = _reset_peak_rss()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_reserved()
    train, train_all, train_cpu = _time(train_step, args.warmup, args.reps, sync)
    out = dict(train_s=train, train_all=train_all, train_cpu_s=train_cpu, gemm_peak=peak, base_mb=base_rss,
               peak_mb=_rss_mb("VmHWM"), peak_reset=reset, params=sum(p.numel() for p in model.parameters()))
    if dev == "cuda":
        # reserved (the caching allocator's held blocks), like cupy's pool total: same measure on both sides
        out["gpu_peak_mb"] = (torch.cuda.max_memory_reserved() - base_gpu) / 2 ** 20
    model.eval()  # sampling runs without dropout (cifar has dropout 0.1)
    out["sample_s"], out["sample_all"], out["sample_cpu_s"] = _time(sample_step, args.warmup, args.reps, sync)
    return out


def minidiff_groups(cfg):
    """The GroupNorm group count minidiff.UNet picks for this config, for the torch model."""
    try:
        from minidiff.unet import default_num_groups
        return default_num_groups(cfg["ch"])
    except ImportError:
        return min(32, cfg["ch"])


# ---------------------------------------------------------------- per-op profile of minidiff's steps


def profile_minidiff(step, sync, reps):
    """Time every Function's forward and backward (and Adam.step) over `reps` calls of step().

    Wraps the forward/backward staticmethods of every Function subclass: the seconds
    spent inside them per op, the rest of the step being Python graph overhead.
    """
    from minidiff import optim
    from minidiff.tensor import Function

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    totals, cpu, counts, originals = {}, {}, {}, []

    def wrap(owner, attr, key):
        fn = owner.__dict__[attr]
        raw = fn.__func__ if isinstance(fn, staticmethod) else fn

        def timed(*a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            r = raw(*a, **k)
            sync()
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0
            cpu[key] = cpu.get(key, 0.0) + time.process_time() - c0
            counts[key] = counts.get(key, 0) + 1
            return r
        originals.append((owner, attr, fn))
        setattr(owner, attr, staticmethod(timed) if isinstance(fn, staticmethod) else timed)

    for cls in set(subclasses(Function)):
        for attr in ("forward", "backward"):
            if attr in cls.__dict__:
                wrap(cls, attr, f"{cls.__name__}.{attr}")
    wrap(optim.Adam, "step", "Adam.step")
    try:
        step()  # one untimed step through the wrappers
        totals.clear(), cpu.clear(), counts.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            step()
        sync()
        wall, cpu_all = (time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)
    ops = {k: dict(s=v / reps, cpu_s=cpu[k] / reps, calls=counts[k] // reps) for k, v in totals.items()}
    return dict(wall_s=wall, cpu_s=cpu_all, ops=ops)


# ---------------------------------------------------------------- conformance (minidiff vs torch forward)


def conformance(cfg_name, args):
    """Max |minidiff - torch| of the U-Net output with the same weights, and of the parameter gradients."""
    import numpy as np
    import torch
    sys.path.insert(0, HERE)
    from torch_unet import TorchUNet, load_minidiff_state, minidiff_grads_as_torch, randomize_
    from minidiff.tensor import Tensor
    torch.set_num_threads(args.threads)
    cfg = dict(CONFIGS[cfg_name], batch=4)
    model = randomize_(build_minidiff(cfg))  # the DDPM init zeroes output layers: compare O(1) outputs
    tmodel = TorchUNet(**model_kwargs(cfg), num_groups=args.num_groups or minidiff_groups(cfg))
    load_minidiff_state(tmodel, model)
    x0, t, noise, _, _ = _host_batch(cfg, seed=1)
    out = model(Tensor(x0), t)
    loss = ((out - Tensor(noise)) ** 2).mean()
    loss.backward()
    tout = tmodel(torch.from_numpy(x0), torch.from_numpy(t))
    ((tout - torch.from_numpy(noise)) ** 2).mean().backward()
    grads = minidiff_grads_as_torch(tmodel, model)
    # Relative to each parameter's gradient scale, floored at 1e-3 of the largest: some gradients
    # are zero in exact arithmetic (attention's k bias: softmax ignores a per-row shift) and hold only rounding.
    floor = 1e-3 * max(float(p.grad.abs().max()) for p in tmodel.parameters())
    gerr = max(float((grads[n] - p.grad).abs().max()) / max(float(p.grad.abs().max()), floor)
               for n, p in tmodel.named_parameters())
    return dict(out_err=float(np.abs(out.numpy() - tout.detach().numpy()).max()),
                out_scale=float(np.abs(tout.detach().numpy()).max()), grad_rel_err=gerr)


# ---------------------------------------------------------------- driver


def run_worker(args):
    """Subprocess entry: one (framework, config); prints one JSON line."""
    if args.framework == "conformance":
        result = conformance(args.config, args)
    else:
        cfg = CONFIGS[args.config]
        result = (worker_minidiff if args.framework.startswith("minidiff") else worker_torch)(cfg, args)
        result["flops"] = unet_flops(cfg)
    print(JSON_TAG + json.dumps(result), flush=True)


def spawn(framework, config, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--framework", framework, "--config", config,
           "--threads", str(args.threads), "--backend", args.backend,
           "--warmup", str(args.warmup or DEFAULT_WARMUP[config]),
           "--reps", str(args.reps or DEFAULT_REPS[config])]
    if args.profile and framework.startswith("minidiff"):
        cmd.append("--profile")
    if args.num_groups:
        cmd += ["--num-groups", str(args.num_groups)]
    env = dict(os.environ)
    _set_env_threads(env, args.threads)
    if framework.startswith("minidiff"):   # "minidiff+tuning": measured kernel choices (kernels/tuning.py)
        env["MINIDIFF_TUNING"] = "on" if framework == "minidiff+tuning" else "off"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"  [{framework}/{config}] timed out after {args.timeout} s", file=sys.stderr)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith(JSON_TAG):
            return json.loads(line[len(JSON_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    print(f"  [{framework}/{config}] failed (rc {proc.returncode}): " + " | ".join(tail), file=sys.stderr)
    return None


def torch_available():
    try:
        import importlib.util
        return importlib.util.find_spec("torch") is not None
    except Exception:
        return False


def machine_line(args):
    import platform
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import numpy
    blas = "?"
    try:
        cfg = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{cfg.get('name')} {cfg.get('version')}"
    except Exception:
        pass
    core = os.environ.get("OPENBLAS_CORETYPE") or _openblas_core()
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, numpy {numpy.__version__} "
            f"({blas}{', OpenBLAS kernel ' + core if core else ''}), load average {load:.2f} at start, "
            f"threads={args.threads}, backend={args.backend}")


def _openblas_core():
    """The CPU kernel set numpy's bundled OpenBLAS picked (e.g. "SkylakeX"), or None if unknown."""
    try:
        import ctypes
        import glob
        import numpy
        libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs", "*openblas*"))
        lib = ctypes.CDLL(libs[0])
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
                     "openblas_get_corename"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    except Exception:
        pass
    return None


def _best(old, new):
    """Merge two runs of one (framework, config): each timing's minimum, the smaller step memory."""
    if old is None:
        return new
    out = dict(old)
    for key in ("train_s", "sample_s", "train_cpu_s", "sample_cpu_s"):
        out[key] = min(old[key], new[key])
    if new["train_s"] < old["train_s"] and "profile" in new:
        out["profile"], out["profile_sample"] = new["profile"], new.get("profile_sample")
    if new["peak_mb"] - new["base_mb"] < old["peak_mb"] - old["base_mb"]:
        out["peak_mb"], out["base_mb"] = new["peak_mb"], new["base_mb"]
    out["gemm_peak"] = max(old["gemm_peak"], new["gemm_peak"])
    return out


def fmt_ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def report(results, args):
    """Print the markdown tables: timings, memory, GFLOP/s, ratios minidiff / PyTorch."""
    rows = []
    head = ("| config | params | batch | GFLOP/step (train) | framework | train step ms | train img/s | "
            "sample step ms | sample img/s | train-step memory MiB (step / process peak) | train GFLOP/s (% of GEMM peak) |")
    rows += [head, "|" + "---|" * (head.count("|") - 1)]
    ratio_rows = ["| config | train time | sample time | training-step memory | train GFLOP/s | train CPU time | sample CPU time |",
                  "|---|---|---|---|---|---|---|"]
    # The machine's GEMM peak per library: the best of the workers' measurements (one can be disturbed)
    peaks = {}
    for (fw, _), r in results.items():
        if r:
            peaks[fw] = max(peaks.get(fw, 0.0), r["gemm_peak"])
    for name in args.configs:
        cfg = CONFIGS[name]
        fwd = unet_flops(cfg)["total"]
        per = {}
        for fw in FRAMEWORKS:
            r = results.get((fw, name))
            if not r:
                continue
            per[fw] = r
            train_gflops = 3 * fwd / r["train_s"] / 1e9
            mem_key = "gpu_peak_mb" if args.backend == "cupy" else None
            step_mem = r[mem_key] if mem_key else r["peak_mb"] - r["base_mb"]
            r["step_mem"] = step_mem
            r["train_gflops"] = train_gflops
            mem = f"{step_mem:.0f} / {r['peak_mb']:.0f}" if not mem_key else f"{step_mem:.0f} (GPU)"
            rows.append(f"| {name} | {r['params'] / 1e6:.2f}M | {cfg['batch']} | {3 * fwd / 1e9:.1f} | {fw} | "
                        f"{1e3 * r['train_s']:.1f} | {cfg['batch'] / r['train_s']:.1f} | {1e3 * r['sample_s']:.1f} | "
                        f"{cfg['batch'] / r['sample_s']:.1f} | {mem} | "
                        f"{train_gflops:.0f} ({100 * train_gflops / peaks[fw]:.0f}%) |")
        for variant in (v for v in FRAMEWORKS[:2] if v in per and "torch" in per):
            m, t = per[variant], per["torch"]
            label = name if variant == "minidiff" else f"{name}, tuning on"
            ratio_rows.append(f"| {label} | {fmt_ratio(m['train_s'], t['train_s'])} | "
                              f"{fmt_ratio(m['sample_s'], t['sample_s'])} | {fmt_ratio(m['step_mem'], t['step_mem'])} | "
                              f"{fmt_ratio(m['train_gflops'], t['train_gflops'])} | "
                              f"{fmt_ratio(m['train_cpu_s'], t['train_cpu_s'])} | {fmt_ratio(m['sample_cpu_s'], t['sample_cpu_s'])} |")
    print("\n".join(rows))
    print("\nfloat32 GEMM peak (2048^3, same threads, best of the workers): " +
          ", ".join(f"{'torch' if fw == 'torch' else 'numpy/cupy'} {p:.0f} GFLOP/s" for fw, p in peaks.items()))
    if len(ratio_rows) > 2:
        print("\nRatio minidiff / PyTorch (lower is better for time and memory; targets: train <= 1.2x, "
              "sample <= 1.2x, memory <= 1.5x)\n")
        print("\n".join(ratio_rows))
    tuned = [(name, results.get(("minidiff", name)), results.get(("minidiff+tuning", name))) for name in args.configs]
    tuned = [(name, off, on) for name, off, on in tuned if on]
    if tuned:
        print("\nTuning on / off (lower is better; target: no configuration above 1.00x), and the first-call cost\n")
        print("| config | train time | sample time | training-step memory | tuning cost (slower candidates' extra time) |")
        print("|---|---|---|---|---|")
        for name, off, on in tuned:
            if off:
                print(f"| {name} | {fmt_ratio(on['train_s'], off['train_s'])} | {fmt_ratio(on['sample_s'], off['sample_s'])} "
                      f"| {fmt_ratio(on['step_mem'], off['step_mem'])} | {on['tuning_s']:.2f} s over {on['tuning_steps']} steps |")
        for name, _, on in tuned:
            print(f"\nTuned choices, {name} (* = chosen; the first candidate of each shape is the fixed rules' plan):\n")
            print(on["tuning_report"])


def print_profile(name, prof, fwd_flops, what="training", peak=None):
    """Per-op breakdown of one minidiff training (or sampling) step, largest first."""
    wall, cpu = prof["wall_s"], prof["cpu_s"]
    ops = sorted(prof["ops"].items(), key=lambda kv: -kv[1]["s"])
    inside = sum(v["s"] for v in prof["ops"].values())
    inside_cpu = sum(v["cpu_s"] for v in prof["ops"].values())
    print(f"\nProfile of one minidiff {what} step, {name}: {1e3 * wall:.1f} ms wall, {1e3 * cpu:.1f} ms CPU "
          "(all threads; wrapped, so slightly slower than the table)\n")
    print("| op | calls | wall ms | % of wall | CPU ms | % of CPU |")
    print("|---|---|---|---|---|---|")
    for key, v in ops:
        print(f"| {key} | {v['calls']} | {1e3 * v['s']:.1f} | {100 * v['s'] / wall:.1f} | "
              f"{1e3 * v['cpu_s']:.1f} | {100 * v['cpu_s'] / cpu:.1f} |")
    print(f"| (Python: graph, tensor creation, outside ops) | | {1e3 * (wall - inside):.1f} | "
          f"{100 * (wall - inside) / wall:.1f} | {1e3 * (cpu - inside_cpu):.1f} | {100 * (cpu - inside_cpu) / cpu:.1f} |")
    conv = sum(v["s"] for k, v in prof["ops"].items() if k.startswith("Conv2d."))
    if conv:
        cf = (3 if what == "training" else 1) * fwd_flops["conv"]
        rate = cf / conv / 1e9
        share = f", {100 * rate / peak:.0f}% of the {peak:.0f} GFLOP/s GEMM peak" if peak else ""
        print(f"\nConv2d {'forward+backward' if what == 'training' else 'forward'}: {1e3 * conv:.1f} ms for "
              f"{cf / 1e9:.2f} GFLOP = {rate:.0f} GFLOP/s{share} (including im2col / col2im copies and Winograd's "
              "transforms; FLOPs counted as the direct convolution's)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads for both frameworks")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"],
                   help="cupy: minidiff on CuPy against PyTorch CUDA")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions (0: per-config default)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (0: per-config default)")
    p.add_argument("--profile", action="store_true", help="print a per-op time breakdown of minidiff's training step")
    p.add_argument("--no-torch", action="store_true", help="minidiff only")
    p.add_argument("--num-groups", type=int, default=0, help="GroupNorm groups for the torch model (0: as minidiff)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per subprocess")
    p.add_argument("--json", help="also write all results to this file")
    p.add_argument("--tuning", default="off", choices=["off", "on", "both"],
                   help="minidiff's measured kernel choices (MINIDIFF_TUNING): off (the fixed rules), on, or both "
                        "side by side, with the tuned choices and each candidate's time printed")
    p.add_argument("--rounds", type=int, default=1,
                   help="run each (framework, config) this many times, alternating A B A B, and keep each "
                        "timing's best: on a shared machine the least disturbed run is the closest to the truth")
    # subprocess-only options
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--framework", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        _set_env_threads(os.environ, args.threads)  # the parent set them already; this covers direct calls
        return run_worker(args)

    use_torch = not args.no_torch and torch_available()
    print(f"Machine: {machine_line(args)}")
    print("Command: python benchmarks/bench_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if not use_torch:
        print("PyTorch not importable (or --no-torch): minidiff only. pip install torch==2.13.0 for the comparison.")
    else:
        c = spawn("conformance", "tiny", args)
        if c:
            print(f"Conformance (tiny, batch 4, same weights): max |out_minidiff - out_torch| = {c['out_err']:.2e} "
                  f"(outputs up to {c['out_scale']:.2f}); max relative gradient error {c['grad_rel_err']:.2e}")
    results = {}
    for name in args.configs:
        for rnd in range(max(1, args.rounds)):
            variants = {"off": ["minidiff"], "on": ["minidiff+tuning"], "both": ["minidiff", "minidiff+tuning"]}
            for fw in variants[args.tuning] + (["torch"] if use_torch else []):
                t0 = time.perf_counter()
                r = spawn(fw, name, args)
                if r:
                    print(f"  {name:6s} {fw:8s} train {1e3 * r['train_s']:8.1f} ms  sample {1e3 * r['sample_s']:8.1f} ms  "
                          f"({time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
                    results[(fw, name)] = _best(results.get((fw, name)), r)
                else:
                    results.setdefault((fw, name), None)
    if args.rounds > 1:
        print(f"\nBest of {args.rounds} rounds per (framework, config), run alternately (A B A B).")
    print()
    report(results, args)
    if args.profile:
        for name in args.configs:
            r = results.get(("minidiff", name))
            if r and "profile" in r:
                print_profile(name, r["profile"], unet_flops(CONFIGS[name]), peak=r["gemm_peak"])
                print_profile(name, r["profile_sample"], unet_flops(CONFIGS[name]), what="sampling", peak=r["gemm_peak"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{fw}/{name}": r for (fw, name), r in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
