"""The functional ops of the U-Net (issue 3), PyTorch names and conventions: `from minidiff import functional as F`.

conv2d (conv.py), linear, group_norm (fused backward), silu, softmax, dropout,
upsample_nearest2d, attention (fused backward) and the sinusoidal timestep_embedding
of Ho et al. 2020 (arXiv:2006.11239), App. B, as in the original DDPM code.
Fused ops compute their statistics once in forward and reuse them in backward. Each has its
definition written plainly with primitives directly above it (silu_reference,
group_norm_reference, attention_reference): read those to learn what the op computes;
tests/test_functional.py checks each fused op's output and gradients against them.
SiLU, group_norm and attention run per batch chunk on the thread pool (parallel.py);
each chunk is the plain code on a slice of the batch.
May import: backend, tensor, parallel, ops, conv.
"""
import math

from . import backend, ops, parallel
from .conv import conv2d  # noqa: F401  (re-exported: F.conv2d)
from .ops import softmax  # noqa: F401  (re-exported: F.softmax)
from .tensor import Function, Tensor

__all__ = ["conv2d", "linear", "group_norm", "silu", "softmax", "dropout",
           "upsample_nearest2d", "attention", "timestep_embedding"]


# ---------------------------------------------------------------- linear


class Linear(Function):
    """y = x W^T + b: x (..., in), weight (out, in), bias (out,) -> (..., out). On the CPU in row chunks
    on the thread pool (attention's q, k, v projections are (N*H*W, C) GEMMs); dL/dW sums the chunks'."""

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        xp = backend.xp_of(x)
        x2 = x.reshape(-1, x.shape[-1])                      # (M, in)
        threads = parallel.threads_for(x2, macs=x2.size * weight.shape[0])
        out = parallel.buffer(xp, (x2.shape[0], weight.shape[0]), xp.result_type(x, weight), threads)

        def chunk(a, b):                                     # rows a..b-1
            o = xp.matmul(parallel.part(x2, a, b), weight.T, out=parallel.part(out, a, b))   # (m, out)
            if bias is not None:
                o += bias
            return o

        parts = parallel.parallel_for(len(x2), chunk, threads)
        out = parts[0] if out is None else out
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        ctx.x_shape = x.shape
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved
        xp = backend.xp_of(grad)
        g2 = grad.reshape(-1, weight.shape[0])               # (M, out)
        g2 = xp.ascontiguousarray(g2)                        # a broadcast (zero-stride) grad would miss BLAS
        need = ctx.needs_input_grad
        threads = parallel.threads_for(g2, macs=g2.size * weight.shape[1])
        grad_x = parallel.buffer(xp, (len(g2), weight.shape[1]), g2.dtype, threads) if need[0] else None

        def chunk(a, b):                                     # rows a..b-1 -> (dW part, db part, dx part)
            ga = parallel.part(g2, a, b)
            gx = xp.matmul(ga, weight, out=parallel.part(grad_x, a, b)) if need[0] else None   # dL/dx = dL/dy W
            gw = ga.T @ parallel.part(x2, a, b) if need[1] else None    # dL/dW = dL/dy^T x
            gb = ga.sum(axis=0) if len(need) > 2 and need[2] else None   # dL/db = sum_rows dL/dy
            return gw, gb, gx

        parts = parallel.parallel_for(len(g2), chunk, threads)
        if need[0] and grad_x is None:
            grad_x = parts[0][2]
        grad_w = grad_b = None
        if need[1]:
            grad_w = parts[0][0]
            for p in parts[1:]:
                grad_w += p[0]                               # the weight gradient sums the chunks' products
        if len(need) > 2 and need[2]:
            grad_b = parts[0][1]
            for p in parts[1:]:
                grad_b = grad_b + p[1]
        if need[0]:
            grad_x = grad_x.reshape(ctx.x_shape)
        return (grad_x, grad_w, grad_b)[:len(need)]


def linear(x, weight, bias=None):
    """x W^T + b with weight shaped (out, in), as torch.nn.functional.linear."""
    return Linear.apply(x, weight) if bias is None else Linear.apply(x, weight, bias)


# ---------------------------------------------------------------- silu


def silu_reference(x):
    """SiLU ("swish") as its definition, x sigmoid(x), with primitives: what the fused SiLU below computes."""
    return x * ops.sigmoid(x)


class SiLU(Function):
    """y = x sigmoid(x) (the paper's "swish"). Only x is saved (as PyTorch does): backward
    recomputes sigmoid, which costs three elementwise passes and saves one activation per call."""

    @staticmethod
    def forward(ctx, x, inplace=False):
        xp = backend.xp_of(x)
        ctx.save_for_backward(x)
        shape, x = x.shape, (x if x.ndim else x.reshape(1))  # chunks slice the first axis
        # in place only when no backward will need x (sampling under no_grad): one activation less to allocate
        threads = parallel.threads_for(x)
        # x's layout (channels-last stays)
        y = x if inplace and not ctx.needs_input_grad[0] else parallel.buffer(xp, x.shape, x.dtype, threads, like=x)

        def chunk(a, b):
            half = parallel.part(x, a, b) * x.dtype.type(0.5)
            ya = xp.tanh(half, out=parallel.part(y, a, b))   # sigmoid(x) = (tanh(x/2) + 1) / 2: no overflow
            ya += 1
            ya *= half                                       # y = x/2 (1 + tanh(x/2)) = x sigmoid(x)
            return ya

        parts = parallel.parallel_for(x.shape[0], chunk, threads)
        return (parts[0] if y is None else y).reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        xp = backend.xp_of(x)
        shape, x = x.shape, (x if x.ndim else x.reshape(1))
        grad = xp.broadcast_to(grad, shape).reshape(x.shape)
        threads = parallel.threads_for(x, grad)
        out = parallel.buffer(xp, x.shape, x.dtype, threads, like=x)

        def chunk(a, b):
            xa = parallel.part(x, a, b)
            s = xa * x.dtype.type(0.5)
            xp.tanh(s, out=s)
            s *= x.dtype.type(0.5)
            s += x.dtype.type(0.5)                           # s = sigmoid(x), recomputed
            # dy/dx = s + x s (1 - s) = s (1 + x (1 - s))
            d = xp.subtract(1, s, out=parallel.part(out, a, b))
            d *= xa
            d += 1
            d *= s
            d *= parallel.part(grad, a, b)
            return d

        parts = parallel.parallel_for(x.shape[0], chunk, threads)
        return (parts[0] if out is None else out).reshape(shape)


def silu(x, inplace=False):
    """x * sigmoid(x), elementwise. inplace=True may write the result into x's array (as torch's
    inplace=True), which it does only when x needs no gradient; pass it only for a temporary x."""
    return SiLU.apply(x, inplace=inplace)


# ---------------------------------------------------------------- group norm


def _is_channels_last(x):
    """True when the (N, C, H, W) array x is stored as (N, H, W, C), as conv2d returns it.

    Read from the strides (no transposed view: on a GPU every view is a call), ignoring
    axes of length 1 as NumPy's contiguity flags do.
    """
    if x.ndim != 4 or x.flags.c_contiguous:
        return False
    n, c, h, w = x.shape
    size = x.itemsize
    expected = (h * w * c * size, size, w * c * size, c * size)   # strides of an (N, H, W, C) layout
    return all(s == e for s, e, length in zip(x.strides, expected, x.shape) if length != 1)


_averagers = {}  # (backend, dtype, C, G, count) -> the (C, C) group-averaging matrix


def _group_averager(xp, c, g, count, dtype):
    """A (C, C) matrix A with A[i, j] = 1/count when channels i and j share a group, else 0.

    (per-channel sums (N, C)) @ A = each channel's group mean, already broadcast back to
    (N, C): one small GEMM instead of a reshape, a sum, a division and a broadcast.
    Built once per shape, on the host, and kept on the device.
    """
    key = (xp.__name__, str(dtype), c, g, count)
    a = _averagers.get(key)
    if a is None:
        groups = backend.host.arange(c) // (c // g)
        a = _averagers[key] = xp.asarray((groups[:, None] == groups[None, :]) / count, dtype=dtype)
    return a


def _spatial_view(x):
    """x (N, C, ...) as a 3-D view without copying: (N, C, S) when stored channels-first, or
    (N, S, C) when it has channels-last strides (conv2d's output); returns (view, channel axis)."""
    n, c = x.shape[:2]
    if _is_channels_last(x):
        return x.transpose(0, 2, 3, 1).reshape(n, -1, c), 2
    return x.reshape(n, c, -1), 1                                  # a copy only for other odd strides


def _from_spatial_view(v, shape, channel_axis):
    """Undo _spatial_view for an array laid out like the view."""
    if channel_axis == 2:
        n, c, h, w = shape
        return v.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    return v.reshape(shape)


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group normalisation (Wu & He 2018) as its definition, with primitives: what the fused
    GroupNorm below computes. Each sample's channels split into groups; each group is shifted
    to mean 0 and scaled to variance 1 over its channels and positions; then a per-channel
    affine map y = x_hat * weight + bias."""
    n, c = x.shape[:2]
    g = ops.reshape(x, n, num_groups, -1)                          # (N, G, C/G * H * W)
    d = g - ops.mean(g, axis=2, keepdims=True)
    x_hat = ops.reshape(d / ops.sqrt(ops.mean(d * d, axis=2, keepdims=True) + eps), x.shape)
    pshape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        x_hat = x_hat * ops.reshape(weight, pshape)
    if bias is not None:
        x_hat = x_hat + ops.reshape(bias, pshape)
    return x_hat


def _silu_(y):
    """y <- y sigmoid(y) in place (one temporary): y/2 (1 + tanh(y/2)), tanh for no overflow."""
    y *= y.dtype.type(0.5)
    t = backend.xp_of(y).tanh(y)
    t += 1
    y *= t
    return y


def _group_norm_forward(ctx, x, affine, num_groups, eps, has_weight, has_bias, silu):
    """GroupNorm's forward (see the class), followed in place by SiLU when `silu`."""
    xp = backend.xp_of(x)
    v, axis = _spatial_view(x)
    n, c, g = x.shape[0], x.shape[1], num_groups
    sub = "ncs" if axis == 1 else "nsc"
    count = v.size // (n * g)                                  # entries per group
    per_c = (lambda a: a[:, :, None]) if axis == 1 else (lambda a: a[:, None, :])   # (n, C) -> broadcastable
    per_channel = (lambda p: p[:, None]) if axis == 1 else (lambda p: p)              # (C,) -> broadcastable
    group_mean = _group_averager(xp, c, g, count, x.dtype)    # (n, C) sums @ it = (n, C) group means
    threads = parallel.threads_for(x)
    out = parallel.buffer(xp, v.shape, x.dtype, threads, like=v)
    mean = parallel.buffer(xp, (n, c), x.dtype, threads)
    rstd = parallel.buffer(xp, (n, c), x.dtype, threads)

    def chunk(a, b):                                           # samples a..b-1: statistics are per sample
        va = parallel.part(v, a, b)
        m = xp.matmul(xp.einsum(sub + "->nc", va), group_mean, out=parallel.part(mean, a, b))
        d = xp.subtract(va, per_c(m), out=parallel.part(out, a, b))   # x - mean_g, where the output goes
        var = xp.einsum(f"{sub},{sub}->nc", d, d) @ group_mean
        var += x.dtype.type(eps)
        r = xp.sqrt(var, out=var)
        r = xp.divide(1, r, out=parallel.part(rstd, a, b))
        scale = r * affine[0] if has_weight else r             # y = d * scale + bias
        d *= per_c(scale.astype(x.dtype, copy=False))
        if has_bias:
            d += per_channel(affine[-1])
        if silu:
            _silu_(d)
        return d, m, r

    parts = parallel.parallel_for(n, chunk, threads)
    if out is None:
        out, mean, rstd = parts[0]
    ctx.save_for_backward(v, mean, rstd, affine[0] if has_weight else None, affine[-1] if has_bias else None)
    ctx.geometry = x.shape, axis, g, count
    return _from_spatial_view(out, x.shape, axis)


def _group_norm_backward(ctx, grad, silu):
    """GroupNorm's backward; with `silu`, first through SiLU at the recomputed normalised output."""
    v, mean, rstd, weight, bias = ctx.saved
    shape, axis, g, count = ctx.geometry
    xp = backend.xp_of(grad)
    n, c = shape[:2]
    need = ctx.needs_input_grad
    gv, axis_g = _spatial_view(grad)
    if axis_g != axis:                                         # match the forward's layout (one copy)
        gv = (xp.ascontiguousarray(grad.transpose(0, 2, 3, 1)).reshape(n, -1, c) if axis == 2
              else xp.ascontiguousarray(grad).reshape(n, c, -1))
    sub = "ncs" if axis == 1 else "nsc"
    per_c = (lambda a: a[:, :, None]) if axis == 1 else (lambda a: a[:, None, :])
    per_channel = (lambda p: p[:, None]) if axis == 1 else (lambda p: p)
    threads = parallel.threads_for(v)
    sum_g = parallel.buffer(xp, (n, c), grad.dtype, threads)
    sum_g_xhat = parallel.buffer(xp, (n, c), grad.dtype, threads)
    gx = parallel.buffer(xp, v.shape, grad.dtype, threads, like=v) if need[0] else None
    w = weight if weight is not None else 1
    group_mean = _group_averager(xp, c, g, count, v.dtype)
    dtype = grad.dtype

    def chunk(a, b):                                           # samples a..b-1
        rows = lambda arr: parallel.part(arr, a, b)   # noqa: E731
        r = rows(rstd)
        d = rows(v) - per_c(rows(mean))                        # x - mean_g, recomputed (not saved: memory)
        ga = rows(gv)
        rw = per_c((r * w).astype(dtype, copy=False))          # rstd * weight, (n, C) broadcastable
        if silu:
            # y = GroupNorm(x), recomputed; dL/dy = dL/dout s (1 + y (1 - s)) with s = sigmoid(y)
            y = d * rw
            if bias is not None:
                y += per_channel(bias)
            s = xp.multiply(y, dtype.type(0.5))
            xp.tanh(s, out=s)
            s *= dtype.type(0.5)
            s += dtype.type(0.5)
            dy = xp.subtract(1, s)
            dy *= y
            dy += 1
            dy *= s
            dy *= ga
            ga = dy
            del y, s
        sg = parallel.into(sum_g, a, b, xp.einsum(sub + "->nc", ga))   # sum over positions of dL/dy, (n, C)
        sgx = xp.einsum(f"{sub},{sub}->nc", ga, d)
        sgx *= r                                               # sum over positions of dL/dy * x_hat
        sgx = parallel.into(sum_g_xhat, a, b, sgx)
        if not need[0]:
            return sg, sgx, None
        # dL/dx = rstd (gh - mean_g(gh) - x_hat mean_g(gh x_hat)), gh = dL/dy * weight
        m1 = (sg * w) @ group_mean                                                # mean_g(gh), (n, C)
        m2 = (sgx * w) @ group_mean                                               # mean_g(gh x_hat)
        d *= per_c((-m2 * r * r).astype(dtype, copy=False))                       # - rstd x_hat mean_g(gh x_hat)
        d -= per_c((m1 * r).astype(dtype, copy=False))                            # - rstd mean_g(gh)
        out = xp.multiply(ga, rw, out=rows(gx))                                   # + rstd gh
        out += d
        return sg, sgx, out

    parts = parallel.parallel_for(n, chunk, threads)
    if sum_g is None:
        sum_g, sum_g_xhat, gx = parts[0]
    grads = [None]
    if weight is not None:
        grads.append(sum_g_xhat.sum(axis=0) if need[1] else None)      # dL/dweight = sum dL/dy x_hat
    if len(need) > len(grads):
        grads.append(sum_g.sum(axis=0) if need[len(grads)] else None)  # dL/dbias = sum dL/dy
    if need[0]:
        grads[0] = _from_spatial_view(gx, shape, axis)
    return tuple(grads)


class GroupNorm(Function):
    """y = (x - mean_g) / sqrt(var_g + eps) * weight + bias; statistics per group of C/G channels and all positions.

    Works on a (N, C, S) or (N, S, C) view, whichever the storage allows without a copy.
    Statistics are per-(n, c) sums (einsum, no temporaries) combined per group;
    the variance is two-pass (of x - mean), so a large mean does not cancel it away.
    Saves x (shared with whatever else saves it), mean and rstd; backward recomputes x - mean.
    """

    @staticmethod
    def forward(ctx, x, *affine, num_groups, eps, has_weight, has_bias):
        return _group_norm_forward(ctx, x, affine, num_groups, eps, has_weight, has_bias, silu=False)

    @staticmethod
    def backward(ctx, grad):
        return _group_norm_backward(ctx, grad, silu=False)


class GroupNormSiLU(Function):
    """silu(group_norm(x)) as one op, as every residual block and the output head apply them.

    Saves what GroupNorm saves (x, mean, rstd) and no more: backward recomputes the normalised
    y from them (two elementwise passes) for SiLU's derivative. The pair as two ops would also
    keep y alive for SiLU's backward, one activation per norm in training; fused, SiLU also
    runs in place on the norm's output in training, not only under no_grad.
    """

    @staticmethod
    def forward(ctx, x, *affine, num_groups, eps, has_weight, has_bias):
        return _group_norm_forward(ctx, x, affine, num_groups, eps, has_weight, has_bias, silu=True)

    @staticmethod
    def backward(ctx, grad):
        return _group_norm_backward(ctx, grad, silu=True)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    """Group normalisation (Wu & He 2018) of x (N, C, ...) with optional per-channel weight and bias (C,).

    silu=True returns silu(group_norm(x)) from one fused op (GroupNormSiLU), which saves one activation.
    """
    c = x.shape[1]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels cannot be split into {num_groups} groups")
    affine = tuple(p for p in (weight, bias) if p is not None)
    op = GroupNormSiLU if silu else GroupNorm
    return op.apply(x, *affine, num_groups=num_groups, eps=eps,
                    has_weight=weight is not None, has_bias=bias is not None)


# ---------------------------------------------------------------- dropout


class Dropout(Function):
    """y = x * mask / (1 - p), mask a fixed 0/1 array."""

    @staticmethod
    def forward(ctx, x, mask, p):
        scale = mask.astype(x.dtype) * x.dtype.type(1 / (1 - p))  # (mask / (1 - p)), kept for backward
        ctx.save_for_backward(scale)
        return x * scale

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved
        return grad * scale, None  # dy/dx = mask / (1 - p)


def dropout(x, p, training, generator=None, mask=None):
    """Zero each entry with probability p and scale the rest by 1/(1-p); the identity when not training.

    `mask` (0/1 or bool, x's shape) fixes the kept entries (tests); otherwise it is drawn on x's
    device by `generator.keep_mask` (a backend.Generator; default backend.default_generator()):
    no mask is copied from the host, and a seed gives the same masks on numpy and cupy.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1); got {p}")
    if not training or p == 0:
        return x
    if mask is None:
        generator = generator or backend.default_generator()
        mask = generator.keep_mask(x.shape, p, like=x.data if isinstance(x, Tensor) else x)
    elif isinstance(mask, Tensor):
        mask = mask.data
    if tuple(mask.shape) != tuple(x.shape):
        raise ValueError(f"dropout mask has shape {tuple(mask.shape)} but the input has shape {tuple(x.shape)}")
    return Dropout.apply(x, mask, p=p)


# ---------------------------------------------------------------- upsampling


class UpsampleNearest2d(Function):
    """(N, C, H, W) -> (N, C, sH, sW), each pixel repeated in an s x s block; keeps x's memory layout."""

    @staticmethod
    def forward(ctx, x, scale):
        xp = backend.xp_of(x)
        n, c, h, w = x.shape
        ctx.scale = scale
        if _is_channels_last(x):                                  # repeat whole C-vectors: (N, H, s, W, s, C)
            wide = xp.broadcast_to(x.transpose(0, 2, 3, 1)[:, :, None, :, None], (n, h, scale, w, scale, c))
            return wide.reshape(n, h * scale, w * scale, c).transpose(0, 3, 1, 2)   # the one copy
        wide = xp.broadcast_to(x[:, :, :, None, :, None], (n, c, h, scale, w, scale))
        return wide.reshape(n, c, h * scale, w * scale)           # the one copy

    @staticmethod
    def backward(ctx, grad):
        n, c, hs, ws = grad.shape
        s = ctx.scale
        # dL/dx = sum of dL/dy over each s x s block
        if _is_channels_last(grad):
            g = grad.transpose(0, 2, 3, 1).reshape(n, hs // s, s, ws // s, s, c).sum(axis=(2, 4))
            return g.transpose(0, 3, 1, 2)
        return grad.reshape(n, c, hs // s, s, ws // s, s).sum(axis=(3, 5))


def upsample_nearest2d(x, scale_factor=2):
    """Nearest-neighbour upsampling by an integer factor, as torch's F.interpolate(mode="nearest")."""
    if int(scale_factor) != scale_factor or scale_factor < 1:
        raise ValueError(f"upsample_nearest2d needs a positive integer scale_factor; got {scale_factor}")
    return UpsampleNearest2d.apply(x, scale=int(scale_factor))


# ---------------------------------------------------------------- attention


def attention_reference(q, k, v):
    """Dot-product attention as its definition, softmax(q k^T / sqrt(C)) v on (N, L, C), with
    primitives: what the fused Attention below computes (it also scales q instead of the scores)."""
    scores = q @ ops.transpose(k, 0, 2, 1) * (q.shape[-1] ** -0.5)   # (N, L, L)
    return ops.softmax(scores, axis=-1) @ v


class Attention(Function):
    """out = softmax(q k^T / sqrt(C)) v on (N, L, C); the (N, L, L) probabilities are saved for backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        xp = backend.xp_of(q)
        n, l, c = q.shape
        threads = parallel.threads_for(q, size=n * l * l, macs=n * l * l * (c + v.shape[-1]))   # (N, L, L) scores
        qs = parallel.buffer(xp, q.shape, q.dtype, threads)
        p = parallel.buffer(xp, (n, l, l), xp.result_type(q, k), threads)
        out = parallel.buffer(xp, (n, l, v.shape[-1]), xp.result_type(q, k, v), threads)

        def chunk(a, b):                                         # images a..b-1
            qa = xp.multiply(parallel.part(q, a, b), q.dtype.type(c ** -0.5), out=parallel.part(qs, a, b))  # scale q, not the scores
            pa = xp.matmul(qa, parallel.part(k, a, b).swapaxes(-1, -2), out=parallel.part(p, a, b))  # (n, L, L) scores
            pa -= pa.max(axis=-1, keepdims=True)                 # shift by the max: exp never overflows
            xp.exp(pa, out=pa)
            pa /= pa.sum(axis=-1, keepdims=True)                 # softmax probabilities P
            oa = xp.matmul(pa, parallel.part(v, a, b), out=parallel.part(out, a, b))             # (n, L, C)
            return qa, pa, oa

        parts = parallel.parallel_for(n, chunk, threads)
        if out is None:
            qs, p, out = parts[0]
        ctx.save_for_backward(qs, k, v, p, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        qs, k, v, p, out = ctx.saved
        xp = backend.xp_of(grad)
        grad = xp.ascontiguousarray(grad)                        # a broadcast (zero-stride) grad would miss BLAS
        need = ctx.needs_input_grad
        scale = qs.dtype.type(qs.shape[-1] ** -0.5)
        threads = parallel.threads_for(p, macs=p.size * (2 * qs.shape[-1] + 2 * v.shape[-1]))
        grad_q = parallel.buffer(xp, qs.shape, grad.dtype, threads) if need[0] else None
        grad_k = parallel.buffer(xp, k.shape, grad.dtype, threads) if need[1] else None
        grad_v = parallel.buffer(xp, v.shape, grad.dtype, threads) if need[2] else None

        def chunk(a, b):                                         # images a..b-1
            g, pa = parallel.part(grad, a, b), parallel.part(p, a, b)
            gq = gk = gv = None
            if need[2]:
                gv = xp.matmul(pa.swapaxes(-1, -2), g, out=parallel.part(grad_v, a, b))   # dL/dv = P^T dL/dout
            if need[0] or need[1]:
                # dL/dS = P * (dL/dP - rowsum(dL/dP * P)), and rowsum(dL/dP * P) = rowsum(dL/dout * out)
                ds = g @ parallel.part(v, a, b).swapaxes(-1, -2)                     # dL/dP, (n, L, L)
                ds -= (g * parallel.part(out, a, b)).sum(axis=-1, keepdims=True)
                ds *= pa
            if need[0]:
                gq = xp.matmul(ds, parallel.part(k, a, b), out=parallel.part(grad_q, a, b))   # dL/dq = dL/dS k / sqrt(C)
                gq *= scale
            if need[1]:
                gk = xp.matmul(ds.swapaxes(-1, -2), parallel.part(qs, a, b), out=parallel.part(grad_k, a, b))   # dL/dk
            return gq, gk, gv

        parts = parallel.parallel_for(grad.shape[0], chunk, threads)
        if threads <= 1:                                         # one chunk: it allocated the gradients
            grad_q, grad_k, grad_v = parts[0]
        return grad_q, grad_k, grad_v


def attention(q, k, v):
    """Single-head dot-product attention softmax(q k^T / sqrt(C)) v (Vaswani et al. 2017, Eq. 1).

    q, k, v: (N, L, C) with L = H*W positions. For a conv2d output h (N, C, H, W), which has
    channels-last strides, `h.transpose(0, 2, 3, 1).reshape(N, H*W, C)` is a free view, and so
    is the way back; the matmuls read transposed operands directly (no copies).
    """
    if q.shape != k.shape or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"attention needs q, k of one shape (N, L, C) and v (N, L, Cv); "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    return Attention.apply(q, k, v)


# ---------------------------------------------------------------- timestep embedding


def timestep_embedding(t, dim, flip_sin_to_cos=False, freq_shift=1):
    """Sinusoidal embedding (N,) -> (N, dim) float32, as get_timestep_embedding in the original DDPM code.

    half = dim // 2, freq_i = exp(-i ln(10000) / (half - freq_shift)), [sin(t freq), cos(t freq)],
    zero-padded by one column when dim is odd. Computed in float64 and cast (the
    original computes in float32; the values agree to float32 rounding of t * freq).
    The defaults are the original's; diffusers' UNet2DModel exposes both choices as config
    fields (`flip_sin_to_cos=True` puts cos first, `freq_shift=0` divides by half), so
    models trained with other settings embed t exactly as they were trained.
    """
    half = dim // 2
    if half - freq_shift <= 0 or half < 2:
        raise ValueError(f"timestep_embedding needs dim >= 4 (its frequencies divide by dim // 2 - freq_shift); "
                         f"got dim={dim}, freq_shift={freq_shift}")
    t = t.data if isinstance(t, Tensor) else t
    xp = backend.xp()
    if not backend.is_array(t) or backend.xp_of(t) is not xp:
        t = backend.to_active(backend.to_numpy(t))               # ints, lists or the other backend's array
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects timesteps of shape (N,); got {t.shape}")
    freqs = xp.exp(xp.arange(half, dtype=xp.float64) * (-math.log(10000) / (half - freq_shift)))  # (half,)
    args = t.astype(xp.float64)[:, None] * freqs[None, :]                                # (N, half)
    parts = [xp.cos(args), xp.sin(args)] if flip_sin_to_cos else [xp.sin(args), xp.cos(args)]
    emb = xp.concatenate(parts, axis=1)
    if dim % 2:
        emb = xp.concatenate([emb, xp.zeros((emb.shape[0], 1), dtype=emb.dtype)], axis=1)
    return Tensor(emb.astype(backend.DTYPE))
