"""Kernels of functional.GroupNorm and of silu(group_norm(x)) fused into one op (GroupNormSiLU).

What they change against the math ops, none of which changes what is computed:
- they work on an (N, C, S) or (N, S, C) view of x, whichever its storage allows without a
  copy (conv2d's kernel returns channels-last arrays);
- per-(n, c) sums by einsum (no temporaries), combined per group by one small GEMM with a
  cached group-averaging matrix, instead of a reshape, a sum, a division and a broadcast;
- they save x, mean and rstd and recompute x - mean in backward (one activation less);
- fused with SiLU, the norm's output is activated in place, and backward recomputes the
  normalised y for SiLU's derivative: the pair as two ops would also keep y alive;
- batch chunks on the thread pool (statistics are per sample, so chunks are independent).
tests/test_kernels.py holds them to functional.GroupNorm and to silu(GroupNorm(x)).
May import: backend, tensor, kernels.pool, kernels.elementwise.
"""
from .. import backend
from ..tensor import Function
from . import pool
from .elementwise import is_channels_last, sigmoid_into, silu_into

_averagers = {}  # (backend, dtype, C, G, count) -> the (C, C) group-averaging matrix


def group_averager(xp, c, g, count, dtype):
    """A (C, C) matrix A with A[i, j] = 1/count when channels i and j share a group, else 0.

    (per-channel sums (N, C)) @ A = each channel's group mean, already broadcast back to
    (N, C). Built once per shape, on the host, and kept on the device.
    """
    key = (xp.__name__, str(dtype), c, g, count)
    a = _averagers.get(key)
    if a is None:
        groups = backend.host.arange(c) // (c // g)
        a = _averagers[key] = xp.asarray((groups[:, None] == groups[None, :]) / count, dtype=dtype)
    return a


def spatial_view(x):
    """x (N, C, ...) as a 3-D view without copying: (N, C, S) when stored channels-first, or
    (N, S, C) when it has channels-last strides (conv2d's output); returns (view, channel axis)."""
    n, c = x.shape[:2]
    if is_channels_last(x):
        return x.transpose(0, 2, 3, 1).reshape(n, -1, c), 2
    return x.reshape(n, c, -1), 1                                  # a copy only for other odd strides


def from_spatial_view(v, shape, channel_axis):
    """Undo spatial_view for an array laid out like the view."""
    if channel_axis == 2:
        n, c, h, w = shape
        return v.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    return v.reshape(shape)


def _layout(axis):
    """The einsum subscripts of the view, and how (n, C) and (C,) arrays broadcast against it."""
    if axis == 1:
        return "ncs", (lambda a: a[:, :, None]), (lambda p: p[:, None])
    return "nsc", (lambda a: a[:, None, :]), (lambda p: p)


def _forward(ctx, x, affine, num_groups, eps, has_weight, has_bias, silu):
    """GroupNorm's forward, followed in place by SiLU when `silu`."""
    xp = backend.xp_of(x)
    v, axis = spatial_view(x)
    n, c, g = x.shape[0], x.shape[1], num_groups
    sub, per_c, per_channel = _layout(axis)
    count = v.size // (n * g)                                  # entries per group
    group_mean = group_averager(xp, c, g, count, x.dtype)     # (n, C) sums @ it = (n, C) group means

    def chunk(a, b, out, mean, rstd):                          # samples a..b-1: statistics are per sample
        va = pool.part(v, a, b)
        m = xp.matmul(xp.einsum(sub + "->nc", va), group_mean, out=mean)
        d = xp.subtract(va, per_c(m), out=out)                 # x - mean_g, where the output goes
        var = xp.einsum(f"{sub},{sub}->nc", d, d) @ group_mean
        var += x.dtype.type(eps)
        r = xp.sqrt(var, out=var)
        r = xp.divide(1, r, out=rstd)
        scale = r * affine[0] if has_weight else r             # y = d * scale + bias
        d *= per_c(scale.astype(x.dtype, copy=False))
        if has_bias:
            d += per_channel(affine[-1])
        if silu:
            silu_into(d, out=d)
        return d, m, r

    out, mean, rstd = pool.split(xp, n, chunk, pool.threads_for(x),
                                 rows=[v, ((n, c), x.dtype), ((n, c), x.dtype)])
    ctx.save_for_backward(v, mean, rstd, affine[0] if has_weight else None, affine[-1] if has_bias else None)
    ctx.geometry = x.shape, axis, g, count
    return from_spatial_view(out, x.shape, axis)


def _backward(ctx, grad, silu):
    """GroupNorm's backward; with `silu`, first through SiLU at the recomputed normalised output."""
    v, mean, rstd, weight, bias = ctx.saved
    shape, axis, g, count = ctx.geometry
    xp = backend.xp_of(grad)
    n, c = shape[:2]
    need = ctx.needs_input_grad
    gv, axis_g = spatial_view(grad)
    if axis_g != axis:                                         # match the forward's layout (one copy)
        gv = (xp.ascontiguousarray(grad.transpose(0, 2, 3, 1)).reshape(n, -1, c) if axis == 2
              else xp.ascontiguousarray(grad).reshape(n, c, -1))
    sub, per_c, per_channel = _layout(axis)
    w = weight if weight is not None else 1
    group_mean = group_averager(xp, c, g, count, v.dtype)
    dtype = grad.dtype

    def chunk(a, b, sum_g, sum_g_xhat, gx):                    # samples a..b-1
        r = pool.part(rstd, a, b)
        d = pool.part(v, a, b) - per_c(pool.part(mean, a, b))  # x - mean_g, recomputed (not saved: memory)
        ga = pool.part(gv, a, b)
        rw = per_c((r * w).astype(dtype, copy=False))          # rstd * weight, (n, C) broadcastable
        if silu:
            # y = GroupNorm(x), recomputed; dL/dy = dL/dout s (1 + y (1 - s)) with s = sigmoid(y)
            y = d * rw
            if bias is not None:
                y += per_channel(bias)
            s = sigmoid_into(y)
            dy = xp.subtract(1, s)
            dy *= y
            dy += 1
            dy *= s
            dy *= ga
            ga = dy
            del y, s
        sg = xp.einsum(sub + "->nc", ga)                       # sum over positions of dL/dy, (n, C)
        if sum_g is not None:
            sum_g[...] = sg
            sg = sum_g
        sgx = xp.einsum(f"{sub},{sub}->nc", ga, d)
        sgx *= r                                               # sum over positions of dL/dy * x_hat
        if not need[0]:
            return sg, sgx, None
        # dL/dx = rstd (gh - mean_g(gh) - x_hat mean_g(gh x_hat)), gh = dL/dy * weight
        m1 = (sg * w) @ group_mean                                                # mean_g(gh), (n, C)
        m2 = (sgx * w) @ group_mean                                               # mean_g(gh x_hat)
        d *= per_c((-m2 * r * r).astype(dtype, copy=False))                       # - rstd x_hat mean_g(gh x_hat)
        d -= per_c((m1 * r).astype(dtype, copy=False))                            # - rstd mean_g(gh)
        out = xp.multiply(ga, rw, out=gx)                                         # + rstd gh
        out += d
        return sg, sgx, out

    sum_g, sum_g_xhat, gx = pool.split(xp, n, chunk, pool.threads_for(v),
                                       rows=[((n, c), dtype), ((n, c), dtype), v if need[0] else None])
    grads = [None]
    if weight is not None:
        grads.append(sum_g_xhat.sum(axis=0) if need[1] else None)      # dL/dweight = sum dL/dy x_hat
    if len(need) > len(grads):
        grads.append(sum_g.sum(axis=0) if need[len(grads)] else None)  # dL/dbias = sum dL/dy
    if need[0]:
        grads[0] = from_spatial_view(gx, shape, axis)
    return tuple(grads)


class GroupNorm(Function):
    """Kernel of functional.GroupNorm."""

    @staticmethod
    def forward(ctx, x, *affine, num_groups, eps, has_weight, has_bias):
        return _forward(ctx, x, affine, num_groups, eps, has_weight, has_bias, silu=False)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, silu=False)


class GroupNormSiLU(Function):
    """Kernel of silu(functional.GroupNorm(x)), as every residual block and the output head apply them:
    one op that saves what GroupNorm saves (x, mean, rstd) and no more."""

    @staticmethod
    def forward(ctx, x, *affine, num_groups, eps, has_weight, has_bias):
        return _forward(ctx, x, affine, num_groups, eps, has_weight, has_bias, silu=True)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, silu=True)
