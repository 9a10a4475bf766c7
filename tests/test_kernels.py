"""Every kernel against the math op it speeds up (kernels/elementwise, norm, dense, optim, memory), the
mode switch, and whole runs (a training step, DDIM-50 sampling, the CLI) agreeing between the modes.

The convolution kernel has its own file (test_kernels_conv.py), the thread pool too (test_kernels_pool.py).
float32 throughout, the tolerance stated per op: a kernel sums the same terms in another order (chunks,
einsum, one GEMM for the group means), so it may differ from the math by a few float32 roundings of the
largest magnitude involved, never by a wrong term.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minidiff
from minidiff import Tensor, backend, functional as F, kernels, nn
from minidiff.kernels import memory, pool
from minidiff.optim import EMA, Adam
from minidiff.tensor import no_grad
from minidiff.unet import UNet

F32_TOL = 2e-6   # |kernel - math| / (largest |value| of that output or gradient): float32 reorderings only


def _channels_last(a):
    """The same (N, C, H, W) values stored with channels-last strides, as the conv kernel returns them."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _run(mode, fn, arrays, cotangent):
    """fn(*arrays) and the gradients of sum(fn * cotangent) in one kernels mode, as host arrays."""
    previous = kernels.use_kernels(mode)
    try:
        inputs = [Tensor(a, requires_grad=True) for a in arrays]
        out = fn(*inputs)
        out.backward(cotangent)
        return [out.numpy()] + [x.grad for x in inputs]
    finally:
        kernels.use_kernels(previous)


def assert_kernel_matches_math(fn, arrays, cotangent, tol=F32_TOL, scales=()):
    """`scales` (optional, per result) replaces the largest |value| as the magnitude a result is made of,
    for results that are small by cancellation (group norm's input gradient)."""
    math_side, kernel_side = _run("reference", fn, arrays, cotangent), _run("fast", fn, arrays, cotangent)
    for i, (want, got) in enumerate(zip(math_side, kernel_side)):
        assert got.dtype == want.dtype == np.float32
        scale = max(float(np.abs(want).max()), scales[i] if i < len(scales) else 0.0, 1e-30)
        assert np.abs(got - want).max() <= tol * scale, f"kernel differs from the math op by {np.abs(got - want).max()}"


def _arrays(seed, *shapes, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in shapes]


# hypothesis: small shapes, and a thread count of 1 or 3 with every array chunked (no size threshold)
shapes4 = st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))


@pytest.fixture
def chunked(monkeypatch):
    """Let the kernels split even tiny arrays over the pool, so the chunked paths run too."""
    old = pool.get_num_threads()
    monkeypatch.setattr(pool, "MIN_PARALLEL_SIZE", 0)
    yield pool.set_num_threads
    pool.set_num_threads(old)


@given(shapes4, st.booleans(), st.sampled_from([1, 3]), st.integers(0, 2**31))
def test_silu_kernel_matches_the_math_op(chunked, shape, channels_last, threads, seed):
    chunked(threads)
    x, cot = _arrays(seed, shape, shape, scale=4.0)
    x = _channels_last(x) if channels_last else x
    assert_kernel_matches_math(F.silu, [x], cot)


@given(shapes4, st.sampled_from(["same", "per_channel", "scalar_row"]), st.sampled_from([1, 3]), st.integers(0, 2**31))
def test_add_kernel_matches_the_math_op(chunked, shape, broadcast, threads, seed):
    chunked(threads)
    other = {"same": shape, "per_channel": shape[:2] + (1, 1), "scalar_row": (1,) + shape[1:]}[broadcast]
    a, b, cot = _arrays(seed, shape, other, shape)
    assert_kernel_matches_math(lambda a, b: a + b, [a, b], cot)


@given(shapes4, st.booleans(), st.integers(1, 3), st.integers(0, 2**31))
def test_upsample_kernel_matches_the_math_op(shape, channels_last, scale, seed):
    x, = _arrays(seed, shape)
    x = _channels_last(x) if channels_last else x
    n, c, h, w = shape
    cot, = _arrays(seed + 1, (n, c, h * scale, w * scale))
    assert_kernel_matches_math(lambda x: F.upsample_nearest2d(x, scale), [x], cot, tol=0)   # a copy: exact


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5),
       st.booleans(), st.booleans(), st.sampled_from(["both", "weight", "bias", "none"]), st.sampled_from([1, 3]),
       st.integers(0, 2**31))
def test_group_norm_kernels_match_the_math_ops(chunked, n, groups, per_group, h, w, channels_last, silu, affine,
                                               threads, seed):
    """GroupNorm, and GroupNormSiLU against silu(GroupNorm) of the math layer: values and every gradient."""
    chunked(threads)
    c = groups * per_group
    x, weight, bias, cot = _arrays(seed, (n, c, h, w), (c,), (c,), (n, c, h, w))
    x = _channels_last(x * 3 + 1) if channels_last else x * 3 + 1
    params = {"both": [weight, bias], "weight": [weight], "bias": [bias], "none": []}[affine]

    def fn(x, *p):
        wt = p[0] if affine in ("both", "weight") else None
        b = p[-1] if affine in ("both", "bias") else None
        return F.group_norm(x, groups, wt, b, eps=1e-6, silu=silu)

    # dL/dx = rstd (gh - mean(gh) - x_hat mean(gh x_hat)) cancels to ~0 for groups of 1 or 2 entries:
    # its magnitude is that of its terms, rstd |cot| |weight|
    g = np.asarray(x, np.float64).reshape(n, groups, -1)
    rstd = 1 / np.sqrt(g.var(axis=2) + 1e-6)
    dx_scale = float(rstd.max() * np.abs(cot).max() * (np.abs(weight).max() if affine in ("both", "weight") else 1))
    # the affine gradients sum cot x_hat (and cot) over the batch and the positions, which may cancel too
    x_hat_max = float(np.abs((g - g.mean(axis=2, keepdims=True)) * rstd[..., None]).max())
    cot_sums = float(np.abs(cot).sum(axis=(0, 2, 3)).max())
    affine_scales = {"both": (cot_sums * x_hat_max, cot_sums), "weight": (cot_sums * x_hat_max,),
                     "bias": (cot_sums,), "none": ()}[affine]
    assert_kernel_matches_math(fn, [x, *params], cot, tol=1e-5, scales=(0.0, dx_scale, *affine_scales))


@given(st.integers(1, 3), st.integers(1, 7), st.integers(1, 6), st.integers(1, 5), st.booleans(),
       st.sampled_from([1, 3]), st.integers(0, 2**31))
def test_linear_kernel_matches_the_math_op(chunked, n, rows, d_in, d_out, with_bias, threads, seed):
    chunked(threads)
    x, w, b, cot = _arrays(seed, (n, rows, d_in), (d_out, d_in), (d_out,), (n, rows, d_out))
    fn = (lambda x, w, b: F.linear(x, w, b)) if with_bias else (lambda x, w: F.linear(x, w))
    assert_kernel_matches_math(fn, [x, w, b] if with_bias else [x, w], cot, tol=1e-5)


@given(st.integers(1, 300), st.integers(1, 40), st.integers(0, 2**31))
def test_column_sums_are_the_sums_of_the_rows(rows, cols, seed):
    """The GEMV that stands in for a.sum(axis=0) in the bias gradients, held to a float64 sum; the cached
    vector of ones stays ones whatever lengths were asked before."""
    from minidiff.kernels import dense
    a = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) + 2
    got = dense.column_sums(a)
    assert got.dtype == np.float32 and got.shape == (cols,)
    np.testing.assert_allclose(got, a.astype(np.float64).sum(axis=0), rtol=0,
                               atol=1e-6 * float(np.abs(a).sum(axis=0).max()))
    assert dense.ones(np, rows + 7, np.float32).shape == (rows + 7,)
    assert (dense.ones(np, rows, np.float32) == 1).all()


@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 6), st.integers(1, 5), st.sampled_from([1, 3]),
       st.integers(0, 2**31))
def test_attention_kernel_matches_the_math_op(chunked, n, length, c, cv, threads, seed):
    chunked(threads)
    q, k, v, cot = _arrays(seed, (n, length, c), (n, length, c), (n, length, cv), (n, length, cv))
    q, k = q * 2, k * 2
    # dL/dS = P (dL/dP - rowsum(dL/dP P)) cancels (exactly, for one key): dq and dk are made of |cot| |v| |k or q|
    terms = float(np.abs(cot).max() * np.abs(v).max()) * length
    assert_kernel_matches_math(F.attention, [q, k, v], cot, tol=1e-5,
                               scales=(0.0, terms * float(np.abs(k).max()), terms * float(np.abs(q).max())))


def test_silu_kernel_in_place_writes_into_x_only_when_no_gradient_needs_it():
    """The kernel's one liberty: under no_grad, silu(x, inplace=True) reuses x's array (the math op
    never writes into its input, and ignores inplace)."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((3, 4, 5)).astype(np.float32)
    expected = F.silu(Tensor(a)).numpy()
    x = Tensor(a.copy())
    with no_grad():
        y = F.silu(x, inplace=True)
    assert np.shares_memory(y.data, x.data)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-6, atol=1e-7)
    x = Tensor(a.copy(), requires_grad=True)                 # training: x is saved for backward, so no aliasing
    y = F.silu(x, inplace=True)
    assert not np.shares_memory(y.data, x.data)
    np.testing.assert_array_equal(x.numpy(), a)
    kernels.use_kernels("reference")
    with no_grad():
        x = Tensor(a.copy())
        assert not np.shares_memory(F.silu(x, inplace=True).data, x.data)


# ---------------------------------------------------------------- optimizer kernels


def _adam_and_ema_run(mode, steps=4, block=None, monkeypatch=None):
    previous = kernels.use_kernels(mode)
    try:
        if block is not None:
            monkeypatch.setattr(kernels.optim, "CACHE_BLOCK", block)
        rng = np.random.default_rng(3)
        params = [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in ((7, 3), (11,), (2, 2, 2))]
        holder = _Holder(params)
        opt = Adam(params, lr=1e-2, weight_decay=0.1, grad_clip=0.5, warmup_steps=2)
        ema = EMA(holder, decay=0.9)
        norms = []
        for step in range(steps):
            for i, p in enumerate(params):
                p.grad = None if (step == 2 and i == 1) else rng.standard_normal(p.shape).astype(np.float32)
            norms.append(opt.step())
            ema.update(holder)
        return [p.numpy().copy() for p in params] + [ema.flat_shadow.copy(), opt.flat_exp_avg.copy(),
                                                      opt.flat_exp_avg_sq.copy(), np.array(norms, np.float32)]
    finally:
        kernels.use_kernels(previous)


def test_flat_adam_and_ema_kernels_match_the_per_parameter_math():
    """Four steps with warmup, weight decay, clipping and a parameter without a gradient in one step:
    the flat-buffer kernels and the per-parameter math agree to float32 rounding (the kernel folds the
    clip scale into the moment coefficients, so the products round differently)."""
    for want, got in zip(_adam_and_ema_run("reference"), _adam_and_ema_run("fast")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


def test_cache_blocks_give_the_same_bits(monkeypatch):
    """The kernels walk the flat buffers in CACHE_BLOCK pieces: elementwise, so no bit changes."""
    whole = _adam_and_ema_run("fast", block=1 << 20, monkeypatch=monkeypatch)
    for a, b in zip(whole, _adam_and_ema_run("fast", block=5, monkeypatch=monkeypatch)):
        np.testing.assert_array_equal(a, b)


class _Holder(nn.Module):
    def __init__(self, params):
        for i, p in enumerate(params):
            setattr(self, f"p{i}", p)


# ---------------------------------------------------------------- memory


def test_freed_arrays_are_reused_without_page_faults():
    """memory.keep_freed_memory: ten 4 MB arrays allocated and freed together, as a step's activations
    are, come back from the process's own memory; with glibc's defaults the freed 40 MB are returned to
    the OS and the next burst faults them in again (25,000 faults over these five bursts)."""
    import resource
    assert memory.tuned    # the fast kernels (the default) were chosen at import

    def burst():
        arrays = [np.ones(1 << 20, np.float32) for _ in range(10)]
        del arrays

    for _ in range(3):
        burst()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        burst()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 1000


@pytest.mark.parametrize("env,expected", [({"MINIDIFF_MALLOC_TUNING": "0"}, "False"),
                                          ({"MINIDIFF_KERNELS": "reference"}, "False"), ({}, "True")])
def test_malloc_tuning_follows_the_fast_kernels_and_can_be_switched_off(env, expected):
    code = "import minidiff, minidiff.backend; from minidiff.kernels import memory; print(memory.tuned)"
    base = {k: v for k, v in os.environ.items() if k not in ("MINIDIFF_MALLOC_TUNING", "MINIDIFF_KERNELS")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == expected


# ---------------------------------------------------------------- the mode switch


def test_use_kernels_switches_and_returns_the_previous_mode():
    assert kernels.mode() == "fast" and minidiff.use_kernels is kernels.use_kernels
    assert kernels.use_kernels("reference") == "fast" and not kernels.enabled()
    assert kernels.use_kernels("fast") == "reference" and kernels.enabled()
    with pytest.raises(ValueError, match="unknown kernels mode 'turbo'.*fast.*reference"):
        kernels.use_kernels("turbo")
    assert kernels.mode() == "fast"


def test_an_unknown_minidiff_kernels_is_one_clear_error_at_first_use(tmp_path):
    env = {**os.environ, "MINIDIFF_KERNELS": "turbo"}
    code = ("import minidiff\nfrom minidiff import F, Tensor\nimport numpy as np\n"
            "try:\n    F.silu(Tensor(np.ones(3, np.float32)))\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "MINIDIFF_KERNELS='turbo' is not a kernels mode" in out.stdout
    cli = subprocess.run([sys.executable, "-m", "minidiff", "forward", "mondrian", "--steps", "2", "--out",
                          str(tmp_path / "f.png")], env=env, capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.strip().count("\n") == 0 and "MINIDIFF_KERNELS" in cli.stderr
    assert not (tmp_path / "f.png").exists()


def test_reference_mode_runs_the_plain_conv_in_a_real_forward(monkeypatch):
    """A breakpoint in the math op's forward is hit during a U-Net forward in reference mode, never in fast."""
    from minidiff import conv
    calls = []
    original = conv.im2col
    monkeypatch.setattr(conv, "im2col", lambda *a: (calls.append(a[0].shape), original(*a))[1])
    model = UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    x, t = Tensor(np.zeros((2, 1, 8, 8), np.float32)), np.array([0, 1])
    model(x, t)
    assert calls == []
    kernels.use_kernels("reference")
    model(x, t)
    assert (2, 1, 8, 8) in calls


# ---------------------------------------------------------------- whole runs in both modes


def _digits_step(mode):
    """One digits training step of the default U-Net (batch 16) from a fixed seed: loss, weights, EMA."""
    from minidiff.data import load_dataset
    from minidiff.diffusion import GaussianDiffusion
    from minidiff.schedule import get_named_beta_schedule
    previous = kernels.use_kernels(mode)
    try:
        minidiff.manual_seed(0)
        images, _ = load_dataset("digits", split="train")
        model = UNet(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                     dropout=0.1)
        for p in model.parameters():   # the DDPM init zeroes output layers: random weights reach every path
            p.data[...] = np.random.default_rng(1).standard_normal(p.shape).astype(np.float32) * 0.1
        diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
        opt, ema = Adam(model.parameters(), lr=1e-3, grad_clip=1.0), EMA(model, decay=0.9)
        rng = backend.Generator(5)
        x0 = Tensor(images[:16])
        t = rng.integers(0, 1000, (16,))
        loss = diffusion.training_losses(model, x0, t, noise=rng.normal(x0.shape))["loss"].mean()
        loss.backward()
        norm = opt.step()
        ema.update(model)
        return float(loss.data), norm, [p.numpy().copy() for p in model.parameters()], ema.flat_shadow.copy()
    finally:
        kernels.use_kernels(previous)


def test_a_digits_training_step_agrees_between_the_modes():
    loss_m, norm_m, params_m, ema_m = _digits_step("reference")
    loss_k, norm_k, params_k, ema_k = _digits_step("fast")
    assert loss_k == pytest.approx(loss_m, rel=1e-5)
    assert norm_k == pytest.approx(norm_m, rel=1e-4)
    for want, got in zip(params_m, params_k):   # Adam's first step moves each weight by about lr
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ema_k, ema_m, rtol=0, atol=1e-5)


def test_ddim_50_sampling_agrees_between_the_modes():
    from minidiff.diffusion import GaussianDiffusion
    from minidiff.schedule import get_named_beta_schedule
    minidiff.manual_seed(0)
    model = UNet(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    for p in model.parameters():
        p.data[...] = np.random.default_rng(2).standard_normal(p.shape).astype(np.float32) * 0.05
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    samples = {}
    for mode in ("reference", "fast"):
        previous = kernels.use_kernels(mode)
        try:
            samples[mode] = backend.to_numpy(diffusion.ddim_sample_loop(model, (4, 1, 8, 8), num_steps=50, seed=3))
        finally:
            kernels.use_kernels(previous)
    assert np.abs(samples["fast"]).max() > 0.1
    np.testing.assert_allclose(samples["fast"], samples["reference"], rtol=0, atol=1e-4)


def test_the_cli_trains_and_samples_in_reference_mode(tmp_path):
    """MINIDIFF_KERNELS=reference minidiff train, then sample with both samplers: the plain path end to end."""
    env = {**os.environ, "MINIDIFF_KERNELS": "reference"}
    run = tmp_path / "run"
    small = ["--batch-size", "8", "--ch", "8", "--num-timesteps", "20", "--sample-every", "0", "--num-samples", "4",
             "--no-progress"]
    subprocess.run([sys.executable, "-m", "minidiff", "train", "--steps", "3", *small, "--out", str(run)], env=env,
                   check=True, capture_output=True, text=True)
    for sampler in ("ddpm", "ddim"):
        out = tmp_path / f"{sampler}.npz"
        subprocess.run([sys.executable, "-m", "minidiff", "sample", "--checkpoint", str(run), "--num", "4",
                        "--sampler", sampler, "--out", str(out)], env=env, check=True, capture_output=True, text=True)
        with np.load(out) as f:
            assert f["arr_0"].shape == (4, 8, 8, 1) and f["arr_0"].dtype == np.uint8 and f["arr_0"].std() > 0
