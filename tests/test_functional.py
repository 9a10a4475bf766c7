"""The functional ops, the math layer and its kernels alike: hand-written backwards equal autograd of the
ops' definitions (silu_reference, group_norm_reference, attention_reference) and finite differences."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st
from conftest import compat_import
from references import group_norm_reference

from minidiff import Generator, Tensor, backend, functional as F, ops
from minidiff.tensor import no_grad
from minidiff.testing import check_backward, check_gradients

pytestmark = pytest.mark.usefixtures("kernels_mode")   # every test on the kernels and on the plain math


def _on_backend(*arrays, requires_grad=False):
    xp = backend.xp()
    return [Tensor(xp.asarray(a), requires_grad=requires_grad) for a in arrays]


def _channels_last(a):
    """The same (N, C, H, W) values stored with channels-last strides, as conv2d returns them."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _grads_of(fn, arrays, cotangent):
    """Autograd gradients of sum(fn(*arrays) * cotangent) as host arrays."""
    inputs = _on_backend(*arrays, requires_grad=True)
    out = fn(*inputs)
    out.backward(backend.xp().asarray(cotangent))
    return out.numpy(), [x.grad if x.grad is None else backend.to_numpy(x.grad) for x in inputs]


# ---------------------------------------------------------------- group norm


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4),
       st.booleans(), st.sampled_from([1e-5, 1e-6]), st.booleans())
def test_group_norm_forward_and_fused_backward_match_the_composite(n, groups, per_group, h, w, channels_last, eps,
                                                                   silu):
    """GroupNorm against its reference composite; with silu=True the fused GroupNormSiLU against
    silu_reference(group_norm_reference(x)), values and every gradient."""
    rng = np.random.default_rng(0)
    c = groups * per_group
    x = rng.standard_normal((n, c, h, w)) * 3 + 1
    if channels_last:
        x = _channels_last(x)
    weight, bias, cot = rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(x.shape)
    act = F.silu_reference if silu else (lambda y: y)
    out, grads = _grads_of(lambda x, w, b: F.group_norm(x, groups, w, b, eps, silu=silu), [x, weight, bias], cot)
    ref_out, ref_grads = _grads_of(lambda x, w, b: act(F.group_norm_reference(x, groups, w, b, eps)),
                                   [x, weight, bias], cot)
    expected = group_norm_reference(x, groups, weight, bias, eps)
    if silu:
        expected = expected / (1 + np.exp(-expected))
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ref_out, expected, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "3d"])
def test_group_norm_gradients_by_finite_differences(backend_name, affine, layout, silu):
    rng = np.random.default_rng(1)
    shape = (2, 4, 6) if layout == "3d" else (2, 4, 3, 2)
    x = rng.standard_normal(shape)
    if layout == "channels_last":
        x = _channels_last(x)
    params = {"both": [rng.standard_normal(4), rng.standard_normal(4)], "weight": [rng.standard_normal(4)],
              "bias": [rng.standard_normal(4)], "none": []}[affine]

    def fn(x, *p):
        weight = p[0] if affine in ("both", "weight") else None
        bias = p[-1] if affine in ("both", "bias") else None
        return F.group_norm(x, 2, weight, bias, eps=1e-6, silu=silu)

    check_gradients(fn, [x, *params], atol=1e-6)


def test_group_norm_float32_and_gradient_of_channels_last_output():
    """A conv's channels-last output fed to group_norm, and back: both layouts meet in backward."""
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal((2, 3, 5, 5)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4),
              rng.standard_normal(4)]
    check_backward(lambda x, w, g, b: F.group_norm(F.conv2d(x, w, padding=1), 2, g, b) * x[:, :1], arrays)
    # channels-first input, channels-last gradient (from the conv after it)
    check_gradients(lambda x, w: F.conv2d(F.group_norm(x, 3), w, padding=1), [arrays[0][:, :, :3, :3], arrays[1][:2]])
    x = Tensor(arrays[0].astype(np.float32), requires_grad=True)
    out = F.group_norm(x, 3, Tensor(np.ones(3, np.float32)), Tensor(np.zeros(3, np.float32)), eps=1e-6)
    out.sum().backward()
    assert out.dtype == x.grad.dtype == np.float32


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="6 channels"):
        F.group_norm(Tensor(np.zeros((1, 6, 2, 2))), 4)


# ---------------------------------------------------------------- attention


def attention_loops(q, k, v):
    """One query position at a time, plainly."""
    out = np.zeros(q.shape[:2] + v.shape[2:])
    for n in range(q.shape[0]):
        for i in range(q.shape[1]):
            s = np.array([q[n, i] @ k[n, j] for j in range(k.shape[1])]) / math.sqrt(q.shape[2])
            p = np.exp(s - s.max())
            out[n, i] = (p / p.sum()) @ v[n]
    return out


@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 5), st.integers(1, 4), st.booleans())
def test_attention_matches_loops_and_composite(n, length, c, cv, transposed_views):
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((n, length, c)) * 2, rng.standard_normal((n, length, c)), \
        rng.standard_normal((n, length, cv))
    if transposed_views:   # (N, L, C) views of channels-first arrays, as a U-Net might pass them
        q, k, v = (np.ascontiguousarray(a.transpose(0, 2, 1)).transpose(0, 2, 1) for a in (q, k, v))
    cot = rng.standard_normal((n, length, cv))
    out, grads = _grads_of(F.attention, [q, k, v], cot)
    ref_out, ref_grads = _grads_of(F.attention_reference, [q, k, v], cot)
    np.testing.assert_allclose(out, attention_loops(q, k, v), rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)


def test_attention_gradients_by_finite_differences(backend_name):
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 4))
    check_gradients(F.attention, [q, k, v])
    check_backward(lambda q, k, v: F.attention(q, k, v) * q[:, :, :1], [q, k, v])


def test_attention_skips_unneeded_gradients_and_keeps_float32():
    rng = np.random.default_rng(5)
    q, k, v = (Tensor(rng.standard_normal((2, 6, 4)).astype(np.float32)) for _ in range(3))
    v.requires_grad_()
    out = F.attention(q, k, v)
    out.sum().backward()
    assert q.grad is None and k.grad is None and v.grad.dtype == out.dtype == np.float32


# ---------------------------------------------------------------- linear, silu, upsample


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
def test_linear(backend_name, shape):
    rng = np.random.default_rng(6)
    x, w, b = rng.standard_normal(shape), rng.standard_normal((5, 4)), rng.standard_normal(5)
    out = F.linear(*_on_backend(x, w, b))
    np.testing.assert_allclose(out.numpy(), x @ w.T + b, rtol=1e-12)
    np.testing.assert_allclose(F.linear(*_on_backend(x, w)).numpy(), x @ w.T, rtol=1e-12)
    check_gradients(F.linear, [x, w, b])
    check_gradients(F.linear, [x, w])


def test_silu(backend_name):
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal(20) * 4, [0.0, -100.0, 100.0, -800.0]])
    out = F.silu(*_on_backend(x))
    # sigmoid as (tanh(x/2) + 1) / 2 never overflows; for x << 0 it rounds to 0 (absolute error ~1e-16)
    with np.errstate(over="ignore"):        # the reference's exp(800) = inf is fine: 1 / inf = 0
        np.testing.assert_allclose(out.numpy(), x / (1 + np.exp(-x)), rtol=1e-12, atol=1e-14)
    check_gradients(F.silu, [x[:20].reshape(4, 5)])
    cot = rng.standard_normal(20)
    fused = _grads_of(F.silu, [x[:20]], cot)[1][0]
    composite = _grads_of(F.silu_reference, [x[:20]], cot)[1][0]
    np.testing.assert_allclose(fused, composite, rtol=1e-12)
    x32 = Tensor(np.array([-200.0, 0.5, 200.0], np.float32), requires_grad=True)
    with np.errstate(all="raise"):   # no overflow warnings for large |x| in float32
        y = F.silu(x32)
        y.sum().backward()
    assert y.dtype == x32.grad.dtype == np.float32
    s = 1 / (1 + np.exp(-0.5))
    np.testing.assert_allclose(x32.grad, [0.0, s * (1 + 0.5 * (1 - s)), 1.0], rtol=1e-6, atol=1e-30)


def test_upsample_nearest2d(backend_name):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 3, 4))
    for s in (1, 2, 3):
        out = F.upsample_nearest2d(*_on_backend(x), scale_factor=s)
        np.testing.assert_array_equal(out.numpy(), x.repeat(s, axis=2).repeat(s, axis=3))
    check_gradients(lambda a: F.upsample_nearest2d(a, 2), [x[:1, :2]])
    check_gradients(lambda a: F.upsample_nearest2d(a, 2), [_channels_last(x[:1, :2])])
    with pytest.raises(ValueError, match="integer"):
        F.upsample_nearest2d(Tensor(x), 1.5)


# ---------------------------------------------------------------- dropout


def test_dropout_with_a_fixed_mask(backend_name):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 4))
    mask = rng.random((3, 4)) > 0.5
    out = F.dropout(*_on_backend(x), 0.25, True, mask=backend.xp().asarray(mask))
    np.testing.assert_allclose(out.numpy(), x * mask / 0.75, rtol=1e-12)
    check_gradients(lambda a: F.dropout(a, 0.25, True, mask=backend.xp().asarray(mask)), [x])


def test_dropout_statistics_and_scaling():
    p, n = 0.3, 200_000
    x = Tensor(np.ones(n, np.float32))
    out = F.dropout(x, p, True, generator=Generator(0)).numpy()
    assert out.dtype == np.float32
    kept = out != 0
    assert abs(1 - kept.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)            # 4 sigma of a binomial share
    np.testing.assert_allclose(out[kept], 1 / (1 - p), rtol=1e-6)            # survivors scaled by 1/(1-p)
    again = F.dropout(x, p, True, generator=Generator(0)).numpy()
    np.testing.assert_array_equal(out, again)                                  # a seed fixes the mask


def test_dropout_eval_mode_and_p_zero_are_the_identity():
    x = Tensor(np.arange(6.0))
    assert F.dropout(x, 0.5, False) is x
    assert F.dropout(x, 0.0, True) is x
    with pytest.raises(ValueError, match="probability"):
        F.dropout(x, 1.0, True)
    with pytest.raises(ValueError, match="shape"):
        F.dropout(x, 0.5, True, mask=np.ones(3, bool))


# ---------------------------------------------------------------- timestep embedding


@pytest.mark.parametrize("dim", [4, 7, 32, 128])
def test_timestep_embedding_matches_the_original_formula(backend_name, dim):
    t = [0, 1, 17, 999]
    half = dim // 2
    expected = np.zeros((len(t), dim))
    for row, step in enumerate(t):
        for i in range(half):
            freq = math.exp(-i * math.log(10000) / (half - 1))
            expected[row, i], expected[row, half + i] = math.sin(step * freq), math.cos(step * freq)
    for given_t in (np.array(t), Tensor(np.array(t)), backend.xp().asarray(t), t):
        emb = F.timestep_embedding(given_t, dim)
        assert isinstance(emb, Tensor) and emb.shape == (4, dim) and emb.dtype == np.float32
        assert backend.xp_of(emb.data) is backend.xp()
        np.testing.assert_allclose(emb.numpy(), expected, rtol=0, atol=1e-6)
    if dim % 2:
        assert not F.timestep_embedding(np.array(t), dim).numpy()[:, -1].any()


@pytest.mark.parametrize("flip, shift", [(True, 0), (False, 0), (True, 1)])
def test_timestep_embedding_options_follow_their_formula(flip, shift):
    """diffusers' variants: freq_i = exp(-i ln(10000) / (half - shift)), and cos before sin when flipped."""
    t, dim = [0, 3, 999], 10
    half = dim // 2
    expected = np.zeros((len(t), dim))
    for row, step in enumerate(t):
        for i in range(half):
            arg = step * math.exp(-i * math.log(10000) / (half - shift))
            first, second = (math.cos(arg), math.sin(arg)) if flip else (math.sin(arg), math.cos(arg))
            expected[row, i], expected[row, half + i] = first, second
    emb = F.timestep_embedding(np.array(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    np.testing.assert_allclose(emb.numpy(), expected, rtol=0, atol=1e-6)


def test_timestep_embedding_rejects_too_small_dims():
    with pytest.raises(ValueError, match="dim"):
        F.timestep_embedding(np.array([1]), 3)


# ---------------------------------------------------------------- layouts meeting in a chain


def test_a_resblock_like_chain_mixes_memory_layouts_correctly(backend_name):
    """conv2d returns channels-last views; group_norm, silu, upsample and attention must accept and
    return either layout, in forward and in backward (a conv's input gradient is channels-last too)."""
    rng = np.random.default_rng(10)
    arrays = [rng.standard_normal((2, 4, 3, 3)), rng.standard_normal((4, 4, 3, 3)), rng.standard_normal(4),
              rng.standard_normal(4), rng.standard_normal((4, 4, 1, 1)), rng.standard_normal((4, 4, 3, 3))]

    def chain(x, w1, gamma, beta, w_qkv, w2):
        h = F.silu(F.group_norm(F.conv2d(x, w1, padding=1), 2, gamma, beta))      # channels-last from here
        hw = ops.reshape(ops.transpose(F.conv2d(h, w_qkv), 0, 2, 3, 1), 2, 9, 4)   # (N, HW, C): a free view
        a = ops.transpose(ops.reshape(F.attention(hw, hw, hw), 2, 3, 3, 4), 0, 3, 1, 2)
        up = F.upsample_nearest2d(a + h, 2)
        return F.conv2d(up, w2, padding=(0, 1, 0, 1), stride=2) + F.group_norm(up, 4)[:, :, ::2, ::2]

    check_backward(chain, arrays)
    check_gradients(chain, arrays, atol=1e-6)


def test_dropout_draws_its_mask_on_the_device_and_matches_numpy(standin):
    """A seed gives the same mask on numpy and cupy; the cupy mask is made on the device (no host copy)."""
    x = np.random.default_rng(3).standard_normal((8, 4, 5, 5)).astype(np.float32)
    on_host = F.dropout(Tensor(x), 0.1, True, generator=Generator(4)).data
    dev = backend.to_active(x)
    standin.reset()
    on_device = F.dropout(Tensor(dev), 0.1, True, generator=Generator(4)).data
    assert standin.counts["h2d_bytes"] == 0 and isinstance(on_device, standin.ndarray)
    np.testing.assert_array_equal(backend.to_numpy(on_device), on_host)


# ---------------------------------------------------------------- pooling and resizing


def _pool_loops(x, k, s, p, op, count_include_pad=True):
    """Slow direct pooling: one window at a time, padding as PyTorch (-inf for max, 0 for mean)."""
    n, c, h, w = x.shape
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = np.empty((n, c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            r0, c0 = i * s - p, j * s - p
            rows = [r for r in range(r0, r0 + k) if 0 <= r < h]
            cols = [q for q in range(c0, c0 + k) if 0 <= q < w]
            window = x[:, :, rows][:, :, :, cols]
            if op == "max":
                out[:, :, i, j] = window.max(axis=(2, 3))
            else:
                out[:, :, i, j] = window.sum(axis=(2, 3)) / (k * k if count_include_pad else len(rows) * len(cols))
    return out


@pytest.mark.parametrize("k,s,p", [(3, 2, 0), (3, 1, 1), (2, 2, 0), (3, 2, 1)])
def test_pools_match_loops_and_their_gradients_match_finite_differences(k, s, p):
    x = np.random.default_rng(k + s + p).normal(size=(2, 3, 7, 6))
    np.testing.assert_array_equal(F.max_pool2d(Tensor(x), k, stride=s, padding=p).data, _pool_loops(x, k, s, p, "max"))
    check_gradients(lambda a: F.max_pool2d(a, k, stride=s, padding=p), [x])
    for include in (True, False):
        np.testing.assert_allclose(F.avg_pool2d(Tensor(x), k, stride=s, padding=p, count_include_pad=include).data,
                                   _pool_loops(x, k, s, p, "mean", include), rtol=1e-12)
        check_gradients(lambda a: F.avg_pool2d(a, k, stride=s, padding=p, count_include_pad=include), [x])


def test_max_pool_routes_a_tie_to_the_first_maximum_as_pytorch():
    x = np.zeros((1, 1, 2, 2))
    y = Tensor(x, requires_grad=True)
    F.max_pool2d(y, 2).sum().backward()
    np.testing.assert_array_equal(y.grad, [[[[1.0, 0.0], [0.0, 0.0]]]])


def test_pool_padding_larger_than_half_the_kernel_is_refused():
    with pytest.raises(ValueError, match="half the kernel"):
        F.max_pool2d(Tensor(np.zeros((1, 1, 4, 4))), 3, padding=2)


def _bilinear_loops(x, ho, wo):
    """PyTorch's bilinear (align_corners=False) one output pixel at a time."""
    n, c, h, w = x.shape
    out = np.empty((n, c, ho, wo))
    for i in range(ho):
        sy = max((i + 0.5) * h / ho - 0.5, 0.0)
        y0 = int(sy); y1 = min(y0 + 1, h - 1); ly = sy - y0
        for j in range(wo):
            sx = max((j + 0.5) * w / wo - 0.5, 0.0)
            x0 = int(sx); x1 = min(x0 + 1, w - 1); lx = sx - x0
            out[:, :, i, j] = ((1 - ly) * ((1 - lx) * x[:, :, y0, x0] + lx * x[:, :, y0, x1])
                               + ly * ((1 - lx) * x[:, :, y1, x0] + lx * x[:, :, y1, x1]))
    return out


@pytest.mark.parametrize("size", [(13, 11), (3, 2), (5, 4), (299, 299)])
def test_resize_bilinear_matches_loops_and_its_gradient(size):
    x = np.random.default_rng(0).normal(size=(2, 2, 5, 4))
    np.testing.assert_allclose(F.resize_bilinear(Tensor(x), size).data, _bilinear_loops(x, *size), rtol=1e-12, atol=1e-12)
    if size != (299, 299):
        check_gradients(lambda a: F.resize_bilinear(a, size), [x])
    assert F.resize_bilinear(Tensor(x), (5, 4)).data is not None


def test_pools_and_resize_equal_torch():
    torch = compat_import("torch")
    x = np.random.default_rng(3).random((2, 3, 17, 12), dtype=np.float32)
    t = torch.from_numpy(x)
    tf = torch.nn.functional
    np.testing.assert_array_equal(F.max_pool2d(Tensor(x), 3, stride=1, padding=1).data,
                                  tf.max_pool2d(t, 3, stride=1, padding=1).numpy())
    np.testing.assert_allclose(F.avg_pool2d(Tensor(x), 3, stride=1, padding=1, count_include_pad=False).data,
                               tf.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False).numpy(), rtol=1e-6)
    np.testing.assert_allclose(F.resize_bilinear(Tensor(x), (299, 299)).data,
                               tf.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False).numpy(),
                               rtol=1e-5, atol=1e-6)
