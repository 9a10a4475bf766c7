"""Kernels of the elementwise math ops: SiLU (functional.SiLU), the batch add (ops.Add) and
nearest upsampling (functional.UpsampleNearest2d).

What they change against the math ops, none of which changes what is computed:
- batch chunks on the thread pool for large host arrays (pool.split);
- results written in place through `out=` (one temporary per pass instead of several), and
  SiLU in place on its input under no_grad (sampling), where no backward needs x;
- upsampling and the adds keep a channels-last layout (conv2d's output), so the next op reads
  it without a transposing copy.
tests/test_kernels.py holds each to its math op.
May import: backend, tensor, kernels.pool.
"""
from .. import backend
from ..tensor import Function
from . import pool


def sigmoid_into(x, out=None):
    """out = sigmoid(x) as (1 + tanh(x/2)) / 2 (no overflow), in four passes without temporaries."""
    xp = backend.xp_of(x)
    s = xp.multiply(x, x.dtype.type(0.5), out=out)
    xp.tanh(s, out=s)
    s *= x.dtype.type(0.5)
    s += x.dtype.type(0.5)
    return s


def silu_into(x, out=None):
    """out = x sigmoid(x) = x/2 (1 + tanh(x/2)); out may be x itself."""
    xp = backend.xp_of(x)
    half = x * x.dtype.type(0.5)
    y = xp.tanh(half, out=out)
    y += 1
    y *= half
    return y


def silu_grad_into(x, grad, out=None):
    """out = dL/dx of SiLU at x: dy/dx = s (1 + x (1 - s)) with s = sigmoid(x), times grad."""
    xp = backend.xp_of(x)
    s = sigmoid_into(x)
    d = xp.subtract(1, s, out=out)
    d *= x
    d += 1
    d *= s
    d *= grad
    return d


class SiLU(Function):
    """Kernel of functional.SiLU (y = x sigmoid(x)): chunked, in place through out=, and in place on x when
    no gradient is needed and the caller allows it (sampling: one activation less to allocate)."""

    @staticmethod
    def forward(ctx, x, inplace=False):
        xp = backend.xp_of(x)
        ctx.save_for_backward(x)
        shape, x = x.shape, (x if x.ndim else x.reshape(1))  # chunks slice the first axis
        threads = pool.threads_for(x)
        if inplace and not ctx.needs_input_grad[0]:
            def in_place(a, b):
                silu_into(x[a:b], out=x[a:b])
                return ()

            pool.split(xp, x.shape[0], in_place, threads)
            return x.reshape(shape)
        y = pool.split(xp, x.shape[0], lambda a, b, y: silu_into(pool.part(x, a, b), out=y), threads, rows=[x])
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        xp = backend.xp_of(x)
        shape, x = x.shape, (x if x.ndim else x.reshape(1))
        grad = xp.broadcast_to(grad, shape).reshape(x.shape)
        out = pool.split(xp, x.shape[0], lambda a, b, d: silu_grad_into(pool.part(x, a, b), pool.part(grad, a, b), d),
                         pool.threads_for(x, grad), rows=[x])
        return out.reshape(shape)


def add(a, b):
    """Kernel of ops.Add's forward: a + b in batch chunks on the pool when a is a large host array of one
    batch (the U-Net's residual and timestep adds), keeping a's memory layout as numpy's a + b does."""
    sa, sb = getattr(a, "shape", ()), getattr(b, "shape", ())
    if len(sa) < 1 or len(sa) != len(sb) or sa[0] != sb[0] or any(m < n for m, n in zip(sa, sb)):
        return a + b                                   # scalars, or b's broadcast changes the batch axis
    threads = pool.threads_for(a, b)
    if threads <= 1:
        return a + b
    xp = backend.xp_of(a, b)
    out = xp.empty_like(a, dtype=xp.result_type(a, b))
    pool.parallel_for(sa[0], lambda i, j: xp.add(a[i:j], b[i:j], out=out[i:j]), threads)
    return out


def is_channels_last(x):
    """True when the (N, C, H, W) array x is stored as (N, H, W, C), as conv2d's kernel returns it.

    Read from the strides (no transposed view: on a GPU every view is a call), ignoring
    axes of length 1 as NumPy's contiguity flags do.
    """
    if x.ndim != 4 or x.flags.c_contiguous:
        return False
    n, c, h, w = x.shape
    size = x.itemsize
    expected = (h * w * c * size, size, w * c * size, c * size)   # strides of an (N, H, W, C) layout
    return all(s == e for s, e, length in zip(x.strides, expected, x.shape) if length != 1)


class UpsampleNearest2d(Function):
    """Kernel of functional.UpsampleNearest2d: the same repeat, keeping a channels-last layout."""

    @staticmethod
    def forward(ctx, x, scale):
        xp = backend.xp_of(x)
        n, c, h, w = x.shape
        ctx.scale = scale
        if is_channels_last(x):                                   # repeat whole C-vectors: (N, H, s, W, s, C)
            wide = xp.broadcast_to(x.transpose(0, 2, 3, 1)[:, :, None, :, None], (n, h, scale, w, scale, c))
            return wide.reshape(n, h * scale, w * scale, c).transpose(0, 3, 1, 2)   # the one copy
        wide = xp.broadcast_to(x[:, :, :, None, :, None], (n, c, h, scale, w, scale))
        return wide.reshape(n, c, h * scale, w * scale)           # the one copy

    @staticmethod
    def backward(ctx, grad):
        n, c, hs, ws = grad.shape
        s = ctx.scale
        if is_channels_last(grad):                                # dL/dx = sum of dL/dy over each s x s block
            g = grad.transpose(0, 2, 3, 1).reshape(n, hs // s, s, ws // s, s, c).sum(axis=(2, 4))
            return g.transpose(0, 3, 1, 2)
        return grad.reshape(n, c, hs // s, s, ws // s, s).sum(axis=(3, 5))
