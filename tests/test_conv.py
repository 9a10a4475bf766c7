"""conv2d, the math op and its kernel alike: against float64 nested loops, gradients by finite
differences, im2col/col2im adjointness. The kernel's own paths (Winograd, image blocks) are held to
the math op in tests/test_kernels_conv.py."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from references import conv_reference

from minidiff import Tensor, backend, functional as F
from minidiff.conv import col2im, im2col
from minidiff.testing import check_backward, check_gradients

pytestmark = pytest.mark.usefixtures("kernels_mode")   # every test on the kernel and on the plain math

PADDINGS = [0, 1, 2, (1, 0), (0, 2), (0, 1, 0, 1), (2, 0, 1, 3)]   # int, (ph, pw), (top, bottom, left, right)


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
    assume(h + pads[0] + pads[1] >= kh and w + pads[2] + pads[3] >= kw)
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
    cols = im2col(x, 3, 3, 1, 1)                           # (N*Ho*Wo, C*kh*kw), columns ordered (c, i, j)
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    np.testing.assert_array_equal(cols[4 * 1 + 2].reshape(2, 3, 3), xpad[0, :, 1:4, 2:5])      # image 0, pixel (1, 2)
    np.testing.assert_array_equal(cols[16 + 4 * 3 + 0].reshape(2, 3, 3), xpad[1, :, 3:6, 0:3])  # image 1, pixel (3, 0)


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
