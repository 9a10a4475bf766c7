"""Kernels of functional.Linear and functional.Attention: the same products, in row (or image) chunks on
the thread pool with single-threaded BLAS inside each, results written in place through `out=`; and
column_sums, the bias gradients' sum over rows as a GEMV (also the convolution kernel's).

Attention scales q instead of the (L, L) scores (fewer multiplications) and saves the scaled q.
tests/test_kernels.py holds both to their math ops.
May import: backend, tensor, kernels.pool.
"""
from .. import backend
from ..tensor import Function
from . import pool

_ones = {}  # (backend, dtype, length) -> a vector of ones, made once (a slice of a longer one would be a GPU op)


def ones(xp, length, dtype):
    """A vector of `length` ones, cached per backend, dtype and length: shared, so callers only read it."""
    key = (xp.__name__, xp.dtype(dtype).str, length)
    v = _ones.get(key)
    if v is None:
        v = _ones[key] = xp.ones(length, dtype=dtype)
    return v


def column_sums(a):
    """a (R, K) -> (K,), the sum of its rows, as the product ones(R) @ a (a GEMV).

    numpy's a.sum(axis=0) adds the rows one after another in inner loops of K elements: on the narrow
    gradients of the small configurations (R = 4096, K = 32) it is 10x slower than the GEMV
    (BENCHMARKS.md, "Small shapes"). The sum is the same to float32 rounding, and the same product on
    every backend, so a seed gives the same bits on numpy and on the CuPy stand-in.
    """
    return ones(backend.xp_of(a), a.shape[0], a.dtype) @ a


class Linear(Function):
    """Kernel of functional.Linear: y = x W^T + b in row chunks (attention's q, k, v projections are
    (N*H*W, C) GEMMs); dL/dW and dL/db sum the chunks' products."""

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        xp = backend.xp_of(x)
        x2 = x.reshape(-1, x.shape[-1])                      # (M, in)

        def chunk(a, b, out):                                # rows a..b-1
            o = xp.matmul(pool.part(x2, a, b), weight.T, out=out)   # (m, out)
            if bias is not None:
                o += bias
            return o

        threads = pool.threads_for(x2, macs=x2.size * weight.shape[0])
        out = pool.split(xp, len(x2), chunk, threads, rows=[((x2.shape[0], weight.shape[0]), xp.result_type(x, weight))])
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        ctx.x_shape = x.shape
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved
        xp = backend.xp_of(grad)
        g2 = xp.ascontiguousarray(grad.reshape(-1, weight.shape[0]))   # a broadcast (zero-stride) grad would miss BLAS
        need = tuple(ctx.needs_input_grad) + (False,)

        def chunk(a, b, gx):                                 # rows a..b-1 -> (dx rows, dW part, db part)
            ga = pool.part(g2, a, b)
            gx = xp.matmul(ga, weight, out=gx) if need[0] else None          # dL/dx = dL/dy W
            gw = ga.T @ pool.part(x2, a, b) if need[1] else None            # dL/dW = dL/dy^T x
            gb = column_sums(ga) if need[2] else None                        # dL/db = sum_rows dL/dy
            return gx, gw, gb

        threads = pool.threads_for(g2, macs=g2.size * weight.shape[1])
        gx_spec = ((len(g2), weight.shape[1]), g2.dtype) if need[0] else None
        grad_x, grad_w, grad_b = pool.split(xp, len(g2), chunk, threads, rows=[gx_spec], sums=2)
        if need[0]:
            grad_x = grad_x.reshape(ctx.x_shape)
        return (grad_x, grad_w, grad_b)[:len(ctx.needs_input_grad)]


class Attention(Function):
    """Kernel of functional.Attention: out = softmax(q k^T / sqrt(C)) v on (N, L, C), in image chunks; the
    (N, L, L) probabilities are saved for backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        xp = backend.xp_of(q)
        n, l, c = q.shape

        def chunk(a, b, qs, p, out):                         # images a..b-1
            qa = xp.multiply(pool.part(q, a, b), q.dtype.type(c ** -0.5), out=qs)   # scale q, not the scores
            pa = xp.matmul(qa, pool.part(k, a, b).swapaxes(-1, -2), out=p)          # (n, L, L) scores
            pa -= pa.max(axis=-1, keepdims=True)             # shift by the max: exp never overflows
            xp.exp(pa, out=pa)
            pa /= pa.sum(axis=-1, keepdims=True)             # softmax probabilities P
            oa = xp.matmul(pa, pool.part(v, a, b), out=out)  # (n, L, C)
            return qa, pa, oa

        threads = pool.threads_for(q, size=n * l * l, macs=n * l * l * (c + v.shape[-1]))   # (N, L, L) scores
        qs, p, out = pool.split(xp, n, chunk, threads, rows=[(q.shape, q.dtype), ((n, l, l), xp.result_type(q, k)),
                                                              ((n, l, v.shape[-1]), xp.result_type(q, k, v))])
        ctx.save_for_backward(qs, k, v, p, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        qs, k, v, p, out = ctx.saved
        xp = backend.xp_of(grad)
        grad = xp.ascontiguousarray(grad)                    # a broadcast (zero-stride) grad would miss BLAS
        need = ctx.needs_input_grad
        scale = qs.dtype.type(qs.shape[-1] ** -0.5)

        def chunk(a, b, gq, gk, gv):                         # images a..b-1
            g, pa = pool.part(grad, a, b), pool.part(p, a, b)
            if need[2]:
                gv = xp.matmul(pa.swapaxes(-1, -2), g, out=gv)                     # dL/dv = P^T dL/dout
            if need[0] or need[1]:
                # dL/dS = P * (dL/dP - rowsum(dL/dP * P)), and rowsum(dL/dP * P) = rowsum(dL/dout * out)
                ds = g @ pool.part(v, a, b).swapaxes(-1, -2)                       # dL/dP, (n, L, L)
                ds -= (g * pool.part(out, a, b)).sum(axis=-1, keepdims=True)
                ds *= pa
            if need[0]:
                gq = xp.matmul(ds, pool.part(k, a, b), out=gq)                     # dL/dq = dL/dS k / sqrt(C)
                gq *= scale
            if need[1]:
                gk = xp.matmul(ds.swapaxes(-1, -2), pool.part(qs, a, b), out=gk)   # dL/dk = dL/dS^T q / sqrt(C)
            return gq, gk, gv

        threads = pool.threads_for(p, macs=p.size * (2 * qs.shape[-1] + 2 * v.shape[-1]))
        specs = [(a.shape, grad.dtype) if needed else None for a, needed in zip((qs, k, v), need)]
        return pool.split(xp, grad.shape[0], chunk, threads, rows=specs)
