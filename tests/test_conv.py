"""conv2d against a nested-loop reference; its gradients by finite differences; im2col/col2im adjointness."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minidiff import Tensor, backend, conv, functional as F
from minidiff.conv import col2im, im2col, normalize_padding
from minidiff.testing import check_backward, check_gradients

PADDINGS = [0, 1, 2, (1, 0), (0, 2), (0, 1, 0, 1), (2, 0, 1, 3)]   # int, (ph, pw), (top, bottom, left, right)


def conv_reference(x, w, b, stride, padding):
    """Direct float64 cross-correlation: one dot product per output pixel and output channel."""
    pt, pb, pl, pr = normalize_padding(padding)
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    xpad = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, _, hp, wp = xpad.shape
    o, _, kh, kw = w.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    out = np.zeros((n, o, ho, wo))
    for i_n in range(n):
        for i_o in range(o):
            for i in range(ho):
                for j in range(wo):
                    patch = xpad[i_n, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    out[i_n, i_o, i, j] = (patch * w[i_o]).sum() + (0 if b is None else b[i_o])
    return out


def _conv(x, w, b, stride, padding):
    return F.conv2d(x, w, b, stride=stride, padding=padding)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("size", [(5, 5), (6, 8), (7, 4)])
def test_forward_matches_nested_loops(backend_name, kernel, stride, padding, size):
    rng = np.random.default_rng(hash((kernel, stride, str(padding), size)) % 2**32)
    c, o = (3, 4) if size[0] % 2 else (1, 2)
    x = rng.standard_normal((2, c, *size))
    w = rng.standard_normal((o, c, kernel, kernel))
    b = rng.standard_normal(o)
    xp = backend.xp()
    for bias in (b, None):
        out = _conv(Tensor(xp.asarray(x)), Tensor(xp.asarray(w)), None if bias is None else Tensor(xp.asarray(bias)),
                    stride, padding)
        np.testing.assert_allclose(out.numpy(), conv_reference(x, w, bias, stride, padding), rtol=1e-12, atol=1e-12)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 7), st.integers(1, 7),
       st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2),
       st.tuples(*[st.integers(0, 2)] * 4), st.booleans())
def test_forward_matches_nested_loops_on_random_shapes(n, c, o, h, w, kh, kw, sh, sw, pads, with_bias):
    if h + pads[0] + pads[1] < kh or w + pads[2] + pads[3] < kw:
        return
    rng = np.random.default_rng(0)
    x, weight, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((o, c, kh, kw)), rng.standard_normal(o)
    b = b if with_bias else None
    out = _conv(Tensor(x), Tensor(weight), None if b is None else Tensor(b), (sh, sw), pads)
    np.testing.assert_allclose(out.numpy(), conv_reference(x, weight, b, (sh, sw), pads), rtol=1e-12, atol=1e-12)


def test_float32_stays_float32_forward_and_backward():
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((2, 3, 6, 6)).astype(np.float32), requires_grad=True)
    w = Tensor(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), requires_grad=True)
    b = Tensor(rng.standard_normal(4).astype(np.float32), requires_grad=True)
    out = F.conv2d(x, w, b, padding=1)
    out.backward(np.ones(out.shape, np.float32))
    assert out.dtype == x.grad.dtype == w.grad.dtype == b.grad.dtype == np.float32
    np.testing.assert_allclose(out.numpy(), conv_reference(x.numpy().astype(np.float64), w.numpy().astype(np.float64),
                                                           b.numpy().astype(np.float64), 1, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,stride,padding", [
    (3, 1, 1), (3, 2, (0, 1, 0, 1)), (3, 2, 1), (1, 1, 0), (1, 2, 0), (3, 1, (1, 0)), (2, 2, (0, 1, 1, 0)),
])
def test_gradients_by_finite_differences(backend_name, kernel, stride, padding):
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((3, 2, kernel, kernel)), rng.standard_normal(3)
    check_gradients(lambda x, w, b: _conv(x, w, b, stride, padding), [x, w, b])
    check_gradients(lambda x, w: _conv(x, w, None, stride, padding), [x, w])


def test_gradients_through_a_chain_of_convs():
    """A conv fed by a conv sees channels-last strided input and gradients; check that layout too."""
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((5, 4, 1, 1)),
              rng.standard_normal((2, 5, 3, 3)), rng.standard_normal(2)]

    def chain(x, w1, w2, w3, b3):
        h = _conv(x, w1, None, 1, 1)
        h = _conv(h, w2, None, 1, 0) * h[:, :1]          # the 1x1 GEMM path, then an elementwise op
        return _conv(h, w3, b3, 2, (0, 1, 0, 1))

    check_backward(chain, arrays)
    check_gradients(chain, [a[..., :4, :4] if a.ndim == 4 and a.shape[-1] == 6 else a for a in arrays])


def test_no_input_gradient_when_input_needs_none():
    rng = np.random.default_rng(4)
    x = Tensor(rng.standard_normal((2, 3, 5, 5)))
    w = Tensor(rng.standard_normal((4, 3, 3, 3)), requires_grad=True)
    F.conv2d(x, w, padding=1).sum().backward()
    assert x.grad is None
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    # dL/dw[o, c, i, j] for L = sum(out): the sum of the input window at offset (i, j)
    ref = np.stack([[[expected[:, c, i:i + 5, j:j + 5].sum() for j in range(3)] for i in range(3)] for c in range(3)])
    np.testing.assert_allclose(w.grad, np.broadcast_to(ref, (4, 3, 3, 3)), rtol=1e-12)


@given(st.integers(1, 2), st.integers(1, 3), st.integers(3, 7), st.integers(3, 7),
       st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.tuples(*[st.integers(0, 2)] * 4))
def test_im2col_and_col2im_are_adjoint(n, c, h, w, kh, kw, stride, pads):
    """<im2col(x), y> == <x, col2im(y)>: col2im is exactly the transpose of im2col."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, c, h, w))
    cols = im2col(x, kh, kw, stride, pads)
    y = rng.standard_normal(cols.shape)
    back = col2im(y, x.shape, kh, kw, stride, pads)
    assert back.shape == x.shape
    np.testing.assert_allclose((cols * y).sum(), (x * back).sum(), rtol=1e-10)


def test_im2col_rows_are_the_windows():
    x = np.arange(2 * 2 * 4 * 4, dtype=np.float64).reshape(2, 2, 4, 4)
    cols = im2col(x, 3, 3, 1, 1)                           # (N*Ho*Wo, kh*kw*C), columns ordered (i, j, c)
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    np.testing.assert_array_equal(cols[4 * 1 + 2].reshape(3, 3, 2), xpad[0, :, 1:4, 2:5].transpose(1, 2, 0))


def test_invalid_arguments_raise():
    x, w = Tensor(np.zeros((1, 3, 4, 4))), Tensor(np.zeros((2, 4, 3, 3)))
    with pytest.raises(ValueError, match="channels"):
        F.conv2d(x, w)
    with pytest.raises(ValueError, match="does not fit"):
        F.conv2d(Tensor(np.zeros((1, 4, 2, 2))), w)
    with pytest.raises(ValueError, match="padding"):
        F.conv2d(x, Tensor(np.zeros((2, 3, 3, 3))), padding=(1, 2, 3))
    with pytest.raises(ValueError, match="non-negative"):
        F.conv2d(x, Tensor(np.zeros((2, 3, 3, 3))), padding=-1)


# ---------------------------------------------------------------- the Winograd F(2x2, 3x3) fast path


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """The fast path on every stride-1 3x3 conv, whatever its size (the production rule skips small ones)."""
    monkeypatch.setattr(conv, "USE_WINOGRAD", True)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_PIXELS", 1)


def _conv_and_grads(x, w, b, padding, cot, fast, monkeypatch):
    monkeypatch.setattr(conv, "USE_WINOGRAD", fast)
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
    if h + pads[0] + pads[1] < 3 or w + pads[2] + pads[3] < 3:
        return
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
    monkeypatch.setattr(conv, "USE_WINOGRAD", False)
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
        return
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
    original = conv._winograd_input
    monkeypatch.setattr(conv, "_winograd_input", lambda *a: (calls.append(a[0].shape), original(*a))[1])
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
    monkeypatch.setattr(conv, "BLOCK_BYTES", 1)
    monkeypatch.setattr(conv, "USE_WINOGRAD", fast)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_PIXELS", 1)
    assert conv.image_blocks(3, 10, np) == [(0, 1), (1, 2), (2, 3)]
    rng = np.random.default_rng(11)
    x, w, b = rng.standard_normal((3, 2, 5, 6)), rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
    out = F.conv2d(Tensor(x), Tensor(w), Tensor(b), padding=padding)
    np.testing.assert_allclose(out.numpy(), conv_reference(x, w, b, 1, padding), rtol=1e-12, atol=1e-12)
    check_gradients(lambda x, w, b: F.conv2d(x, w, b, padding=padding), [x, w, b])
