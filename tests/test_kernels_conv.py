"""The convolution kernel (kernels/conv.py) against the math op it speeds up (conv.Conv2d) and against
float64 nested loops: its im2col in image blocks, the transposed-convolution input gradient and
Winograd F(2x2, 3x3), forward and both gradients."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from references import conv_reference

from minidiff import Tensor, functional as F, kernels
from minidiff.kernels import conv as kconv
from minidiff.testing import check_gradients


def _both(x, w, b, stride, padding, cot):
    """(out, dx, dW, db) of F.conv2d on the plain math op and on the kernel."""
    results = []
    for mode in ("reference", "fast"):
        previous = kernels.use_kernels(mode)
        try:
            ts = [Tensor(a, requires_grad=True) for a in (x, w, b)]
            out = F.conv2d(*ts, stride=stride, padding=padding)
            out.backward(cot)
            results.append([out.numpy()] + [t.grad for t in ts])
        finally:
            kernels.use_kernels(previous)
    return results


# float32 tolerance of the kernel's im2col + GEMM paths against the math op: the same products summed in
# another order (channels-last columns, blocks, chunks), so |kernel - math| is within a few float32
# roundings of the largest sum |x| |w| (or |cot| |w|, |x| |cot|) that one output adds up: 1e-6 of it.
IM2COL_F32_TOL = 1e-6


@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(1, 9), st.integers(1, 9),
       st.sampled_from([1, 2, 3]), st.integers(1, 2), st.tuples(*[st.integers(0, 2)] * 4), st.integers(0, 2**31))
def test_kernel_matches_the_math_op_in_float32(n, c, o, h, w, k, stride, pads, seed):
    assume(h + pads[0] + pads[1] >= k and w + pads[2] + pads[3] >= k)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((o, c, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    ho, wo = (h + pads[0] + pads[1] - k) // stride + 1, (w + pads[2] + pads[3] - k) // stride + 1
    cot = rng.standard_normal((n, o, ho, wo)).astype(np.float32)
    math, fast = _both(x, weight, b, stride, pads, cot)
    # the scales: the same op on |x|, |w|, |cot| sums every term's magnitude (sum |x| |w| per output, ...)
    scales, _ = _both(np.abs(x), np.abs(weight), np.abs(b), stride, pads, np.abs(cot))
    for got, want, scale in zip(fast, math, scales):
        assert np.abs(got - want).max() <= IM2COL_F32_TOL * scale.max()


# ---------------------------------------------------------------- the Winograd F(2x2, 3x3) fast path


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """The fast path on every stride-1 3x3 conv, whatever its size (the production rule skips small ones)."""
    monkeypatch.setattr(kconv, "USE_WINOGRAD", True)
    monkeypatch.setattr(kconv, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(kconv, "WINOGRAD_MIN_PIXELS", 1)


def _conv_and_grads(x, w, b, padding, cot, fast, monkeypatch):
    monkeypatch.setattr(kconv, "USE_WINOGRAD", fast)
    xt, wt, bt = (Tensor(a, requires_grad=True) for a in (x, w, b))
    out = F.conv2d(xt, wt, bt, padding=padding)
    out.backward(cot)
    return out.numpy(), xt.grad, wt.grad, bt.grad


# float32 tolerance of the fast path against the plain im2col + GEMM convolution: |fast - plain| at most
# 2e-6 times the largest sum |x| |w| over a window (the scale of the outputs' rounding). Not per output:
# Winograd's transforms add and subtract whole 4x4 tiles, so an output that is small by cancellation
# carries the rounding of its tile's larger terms. Worst seen over 2000 hypothesis examples: 3e-7.
WINOGRAD_F32_TOL = 2e-6


@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9),
       st.tuples(*[st.integers(0, 2)] * 4), st.integers(0, 2**31))
def test_winograd_matches_the_plain_convolution_in_float32(winograd_everywhere, monkeypatch, n, c, o, h, w, pads,
                                                           seed):
    assume(h + pads[0] + pads[1] >= 3 and w + pads[2] + pads[3] >= 3)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    ho, wo = h + pads[0] + pads[1] - 2, w + pads[2] + pads[3] - 2
    cot = rng.standard_normal((n, o, ho, wo)).astype(np.float32)
    plain = _conv_and_grads(x, weight, b, pads, cot, False, monkeypatch)
    fast = _conv_and_grads(x, weight, b, pads, cot, True, monkeypatch)
    scale_out = conv_reference(np.abs(x), np.abs(weight), None, 1, pads)          # sum |x| |w| per output
    assert np.abs(fast[0] - plain[0]).max() <= WINOGRAD_F32_TOL * scale_out.max()
    # dL/dx is the transposed convolution of the cotangent: sum |cot| |w| per input pixel
    monkeypatch.setattr(kconv, "USE_WINOGRAD", False)
    full_grad = conv_reference(np.abs(cot), np.abs(weight)[:, :, ::-1, ::-1].transpose(1, 0, 2, 3), None, 1,
                               tuple(2 - p for p in pads))
    assert np.abs(fast[1] - plain[1]).max() <= WINOGRAD_F32_TOL * full_grad.max()
    # dL/dW sums x times the cotangent over the batch and the positions: sum |x| |cot| per weight
    _, _, scale_w, _ = _conv_and_grads(np.abs(x), np.abs(weight), b, pads, np.abs(cot), False, monkeypatch)
    assert np.abs(fast[2] - plain[2]).max() <= WINOGRAD_F32_TOL * scale_w.max()
    np.testing.assert_array_equal(fast[3], plain[3])   # the bias gradient is the same sum on both paths


@pytest.mark.parametrize("size", [(4, 4), (5, 7), (8, 6), (1, 3)])
@pytest.mark.parametrize("padding", [1, 0, (2, 0, 1, 2)])
def test_winograd_matches_nested_loops_in_float64(winograd_everywhere, size, padding):
    """Even and odd output sizes (odd ones get one extra zero row/column); float64 to 1e-12."""
    if size[0] + 2 * (padding if isinstance(padding, int) else 0) < 3 and padding != (2, 0, 1, 2):
        pytest.skip("the kernel does not fit this input")
    rng = np.random.default_rng(7)
    x, w, b = rng.standard_normal((3, 2, *size)), rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
    out = F.conv2d(Tensor(x), Tensor(w), Tensor(b), padding=padding)
    np.testing.assert_allclose(out.numpy(), conv_reference(x, w, b, 1, padding), rtol=1e-12, atol=1e-12)


def test_winograd_gradients_by_finite_differences(winograd_everywhere):
    rng = np.random.default_rng(8)
    x, w, b = rng.standard_normal((2, 3, 5, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    check_gradients(lambda x, w, b: F.conv2d(x, w, b, padding=1), [x, w, b])
    check_gradients(lambda x, w: F.conv2d(x, w, padding=0), [x, w])


def test_the_production_rule_takes_the_fast_path_on_large_convs(monkeypatch):
    """A 64-channel 16x16 conv goes through Winograd (and the rule's thresholds are what they say)."""
    calls = []
    original = kconv.winograd_input
    monkeypatch.setattr(kconv, "winograd_input", lambda *a: (calls.append(a[0].shape), original(*a))[1])
    rng = np.random.default_rng(9)
    x = Tensor(rng.standard_normal((1, 64, 16, 16)).astype(np.float32), requires_grad=True)
    w = Tensor(rng.standard_normal((64, 64, 3, 3)).astype(np.float32), requires_grad=True)
    F.conv2d(x, w, padding=1).sum().backward()
    assert len(calls) == 3                                # forward, the weight gradient and the input gradient
    F.conv2d(Tensor(x.numpy()[:, :32]), Tensor(w.numpy()[:, :32]), padding=1)
    F.conv2d(Tensor(x.numpy()[:, :, :8, :8]), w, padding=1)
    assert len(calls) == 3                                # 32 channels, 8x8: the plain path


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("padding", [1, (2, 0, 1, 2)])
def test_one_image_per_block_gives_the_same_convolution(monkeypatch, fast, padding):
    """A chunk's images go through im2col (or Winograd's transforms) in blocks of at most BLOCK_BYTES of
    scratch; with one image per block the output and every gradient are still the nested loops' (float64)."""
    monkeypatch.setattr(kconv, "BLOCK_BYTES", 1)
    monkeypatch.setattr(kconv, "USE_WINOGRAD", fast)
    monkeypatch.setattr(kconv, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(kconv, "WINOGRAD_MIN_PIXELS", 1)
    assert kconv.image_blocks(3, 10, np) == [(0, 1), (1, 2), (2, 3)]
    rng = np.random.default_rng(11)
    x, w, b = rng.standard_normal((3, 2, 5, 6)), rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
    out = F.conv2d(Tensor(x), Tensor(w), Tensor(b), padding=padding)
    np.testing.assert_allclose(out.numpy(), conv_reference(x, w, b, 1, padding), rtol=1e-12, atol=1e-12)
    check_gradients(lambda x, w, b: F.conv2d(x, w, b, padding=padding), [x, w, b])
