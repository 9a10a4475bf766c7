"""The functional ops of the U-Net (issue 3), PyTorch names and conventions: `from minidiff import functional as F`.

conv2d (conv.py), linear, group_norm (fused backward), silu, softmax, dropout,
upsample_nearest2d, attention (fused backward) and the sinusoidal timestep_embedding
of Ho et al. 2020 (arXiv:2006.11239), App. B, as in the original DDPM code.
Fused ops compute their statistics once in forward and reuse them in backward;
tests/test_functional.py checks each against autograd of its composite.
SiLU, group_norm and attention run per batch chunk on the thread pool (parallel.py);
each chunk is the plain code on a slice of the batch.
May import: backend, tensor, parallel, ops, conv.
"""
import math

from . import backend, parallel
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
        out = xp.empty((x2.shape[0], weight.shape[0]), dtype=xp.result_type(x, weight))

        def chunk(a, b):                                     # rows a..b-1
            xp.matmul(x2[a:b], weight.T, out=out[a:b])       # (m, out)
            if bias is not None:
                out[a:b] += bias

        parallel.parallel_for(len(x2), chunk, parallel.threads_for(x2, out))
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
        grad_x = xp.empty((len(g2), weight.shape[1]), dtype=g2.dtype) if need[0] else None

        def chunk(a, b):                                     # rows a..b-1 -> (dW part, db part)
            if need[0]:
                xp.matmul(g2[a:b], weight, out=grad_x[a:b])  # dL/dx = dL/dy W
            gw = g2[a:b].T @ x2[a:b] if need[1] else None    # dL/dW = dL/dy^T x
            gb = g2[a:b].sum(axis=0) if len(need) > 2 and need[2] else None   # dL/db = sum_rows dL/dy
            return gw, gb

        parts = parallel.parallel_for(len(g2), chunk, parallel.threads_for(g2, grad_x if need[0] else g2))
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


class SiLU(Function):
    """y = x sigmoid(x) (the paper's "swish"). Only x is saved (as PyTorch does): backward
    recomputes sigmoid, which costs three elementwise passes and saves one activation per call."""

    @staticmethod
    def forward(ctx, x, inplace=False):
        xp = backend.xp_of(x)
        ctx.save_for_backward(x)
        shape, x = x.shape, (x if x.ndim else x.reshape(1))  # chunks slice the first axis
        # in place only when no backward will need x (sampling under no_grad): one activation less to allocate
        y = x if inplace and not ctx.needs_input_grad[0] else xp.empty_like(x)   # x's layout (channels-last stays)

        def chunk(a, b):
            half = x[a:b] * x.dtype.type(0.5)
            ya = y[a:b]
            xp.tanh(half, out=ya)                            # sigmoid(x) = (tanh(x/2) + 1) / 2: no overflow
            ya += 1
            ya *= half                                       # y = x/2 (1 + tanh(x/2)) = x sigmoid(x)

        parallel.parallel_for(x.shape[0], chunk, parallel.threads_for(x))
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        xp = backend.xp_of(x)
        shape, x = x.shape, (x if x.ndim else x.reshape(1))
        grad = xp.broadcast_to(grad, shape).reshape(x.shape)
        out = xp.empty_like(x)

        def chunk(a, b):
            xa = x[a:b]
            s = xa * x.dtype.type(0.5)
            xp.tanh(s, out=s)
            s *= x.dtype.type(0.5)
            s += x.dtype.type(0.5)                           # s = sigmoid(x), recomputed
            # dy/dx = s + x s (1 - s) = s (1 + x (1 - s))
            d = out[a:b]
            xp.subtract(1, s, out=d)
            d *= xa
            d += 1
            d *= s
            d *= grad[a:b]

        parallel.parallel_for(x.shape[0], chunk, parallel.threads_for(x, grad))
        return out.reshape(shape)


def silu(x, inplace=False):
    """x * sigmoid(x), elementwise. inplace=True may write the result into x's array (as torch's
    inplace=True), which it does only when x needs no gradient; pass it only for a temporary x."""
    return SiLU.apply(x, inplace=inplace)


# ---------------------------------------------------------------- group norm


def _is_channels_last(x):
    """True when the (N, C, H, W) array x is stored as (N, H, W, C), as conv2d returns it."""
    return x.ndim == 4 and not x.flags.c_contiguous and x.transpose(0, 2, 3, 1).flags.c_contiguous


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


class GroupNorm(Function):
    """y = (x - mean_g) / sqrt(var_g + eps) * weight + bias; statistics per group of C/G channels and all positions.

    Works on a (N, C, S) or (N, S, C) view, whichever the storage allows without a copy.
    Statistics are per-(n, c) sums (einsum, no temporaries) combined per group;
    the variance is two-pass (of x - mean), so a large mean does not cancel it away.
    Saves x (shared with whatever else saves it), mean and rstd; backward recomputes x - mean.
    """

    @staticmethod
    def forward(ctx, x, *affine, num_groups, eps, has_weight, has_bias):
        xp = backend.xp_of(x)
        v, axis = _spatial_view(x)
        n, c, g = x.shape[0], x.shape[1], num_groups
        sub = "ncs" if axis == 1 else "nsc"
        count = v.size // (n * g)                                  # entries per group
        per_c = (lambda a: a[:, :, None]) if axis == 1 else (lambda a: a[:, None, :])   # (n, C) -> broadcastable
        out = xp.empty_like(v)
        mean = xp.empty((n, c), dtype=x.dtype)
        rstd = xp.empty((n, c), dtype=x.dtype)

        def group_mean(per_channel_sum):                           # (n, C) sums -> (n, C) group means
            m = per_channel_sum.reshape(len(per_channel_sum), g, -1).sum(axis=2, keepdims=True) / count
            return xp.broadcast_to(m, (len(m), g, c // g)).reshape(-1, c)

        def chunk(a, b):                                           # samples a..b-1: statistics are per sample
            va = v[a:b]
            mean[a:b] = group_mean(xp.einsum(sub + "->nc", va))
            d = out[a:b]
            xp.subtract(va, per_c(mean[a:b]), out=d)               # x - mean_g, written where the output goes
            rstd[a:b] = 1 / xp.sqrt(group_mean(xp.einsum(f"{sub},{sub}->nc", d, d)) + x.dtype.type(eps))
            scale = rstd[a:b] * affine[0] if has_weight else rstd[a:b]   # y = d * scale + bias
            d *= per_c(scale.astype(x.dtype, copy=False))
            if has_bias:
                d += per_c(affine[-1][None, :])

        parallel.parallel_for(n, chunk, parallel.threads_for(x))
        ctx.save_for_backward(v, mean, rstd, affine[0] if has_weight else None)
        ctx.geometry = x.shape, axis, g, count
        return _from_spatial_view(out, x.shape, axis)

    @staticmethod
    def backward(ctx, grad):
        v, mean, rstd, weight = ctx.saved
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
        sum_g = xp.empty((n, c), dtype=grad.dtype)
        sum_g_xhat = xp.empty((n, c), dtype=grad.dtype)
        gx = xp.empty_like(v) if need[0] else None
        w = weight if weight is not None else 1

        def chunk(a, b):                                           # samples a..b-1
            d = v[a:b] - per_c(mean[a:b])                          # x - mean_g, recomputed (not saved: memory)
            ga = gv[a:b]
            sg = sum_g[a:b] = xp.einsum(sub + "->nc", ga)          # sum over positions of dL/dy, (n, C)
            sgx = sum_g_xhat[a:b] = xp.einsum(f"{sub},{sub}->nc", ga, d) * rstd[a:b]   # sum of dL/dy * x_hat
            if gx is None:
                return
            # dL/dx = rstd (gh - mean_g(gh) - x_hat mean_g(gh x_hat)), gh = dL/dy * weight
            r, k = rstd[a:b], b - a
            m1 = (sg * w).reshape(k, g, -1).sum(axis=2, keepdims=True) / count        # mean_g(gh), (n, G, 1)
            m2 = (sgx * w).reshape(k, g, -1).sum(axis=2, keepdims=True) / count       # mean_g(gh x_hat)
            expand = lambda m: xp.broadcast_to(m, (k, g, c // g)).reshape(k, c)       # noqa: E731
            dtype = grad.dtype
            d *= per_c((-expand(m2) * r * r).astype(dtype, copy=False))               # - rstd x_hat mean_g(gh x_hat)
            d -= per_c((expand(m1) * r).astype(dtype, copy=False))                    # - rstd mean_g(gh)
            out = gx[a:b]
            xp.multiply(ga, per_c((r * w).astype(dtype, copy=False)), out=out)        # + rstd gh
            out += d

        parallel.parallel_for(n, chunk, parallel.threads_for(v))
        grads = [None]
        if weight is not None:
            grads.append(sum_g_xhat.sum(axis=0) if need[1] else None)      # dL/dweight = sum dL/dy x_hat
        if len(need) > len(grads):
            grads.append(sum_g.sum(axis=0) if need[len(grads)] else None)  # dL/dbias = sum dL/dy
        if need[0]:
            grads[0] = _from_spatial_view(gx, shape, axis)
        return tuple(grads)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group normalisation (Wu & He 2018) of x (N, C, ...) with optional per-channel weight and bias (C,)."""
    c = x.shape[1]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels cannot be split into {num_groups} groups")
    affine = tuple(p for p in (weight, bias) if p is not None)
    return GroupNorm.apply(x, *affine, num_groups=num_groups, eps=eps,
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

    `mask` (0/1 or bool, x's shape) fixes the kept entries (tests); otherwise it is drawn from
    `generator` (a backend.Generator; default backend.default_generator()).
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1); got {p}")
    if not training or p == 0:
        return x
    if mask is None:
        generator = generator or backend.default_generator()
        mask = generator.uniform(x.shape, dtype=x.dtype) >= x.dtype.type(p)
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


class Attention(Function):
    """out = softmax(q k^T / sqrt(C)) v on (N, L, C); the (N, L, L) probabilities are saved for backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        xp = backend.xp_of(q)
        n, l, c = q.shape
        qs = xp.empty(q.shape, dtype=q.dtype)
        p = xp.empty((n, l, l), dtype=xp.result_type(q, k))
        out = xp.empty((n, l, v.shape[-1]), dtype=xp.result_type(p, v))

        def chunk(a, b):                                         # images a..b-1
            xp.multiply(q[a:b], q.dtype.type(c ** -0.5), out=qs[a:b])   # scale q (n, L, C), not the scores
            pa = p[a:b]
            xp.matmul(qs[a:b], k[a:b].swapaxes(-1, -2), out=pa)  # (n, L, L) scores
            pa -= pa.max(axis=-1, keepdims=True)                 # shift by the max: exp never overflows
            xp.exp(pa, out=pa)
            pa /= pa.sum(axis=-1, keepdims=True)                 # softmax probabilities P
            xp.matmul(pa, v[a:b], out=out[a:b])                  # (n, L, C)

        parallel.parallel_for(n, chunk, parallel.threads_for(p))
        ctx.save_for_backward(qs, k, v, p, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        qs, k, v, p, out = ctx.saved
        xp = backend.xp_of(grad)
        grad = xp.ascontiguousarray(grad)                        # a broadcast (zero-stride) grad would miss BLAS
        need = ctx.needs_input_grad
        scale = qs.dtype.type(qs.shape[-1] ** -0.5)
        grad_q = xp.empty(qs.shape, dtype=grad.dtype) if need[0] else None
        grad_k = xp.empty(k.shape, dtype=grad.dtype) if need[1] else None
        grad_v = xp.empty(v.shape, dtype=grad.dtype) if need[2] else None

        def chunk(a, b):                                         # images a..b-1
            g = grad[a:b]
            if need[2]:
                xp.matmul(p[a:b].swapaxes(-1, -2), g, out=grad_v[a:b])   # dL/dv = P^T dL/dout
            if not (need[0] or need[1]):
                return
            # dL/dS = P * (dL/dP - rowsum(dL/dP * P)), and rowsum(dL/dP * P) = rowsum(dL/dout * out)
            ds = g @ v[a:b].swapaxes(-1, -2)                     # dL/dP, (n, L, L)
            ds -= (g * out[a:b]).sum(axis=-1, keepdims=True)
            ds *= p[a:b]
            if need[0]:
                xp.matmul(ds, k[a:b], out=grad_q[a:b])           # dL/dq = dL/dS k / sqrt(C)
                grad_q[a:b] *= scale
            if need[1]:
                xp.matmul(ds.swapaxes(-1, -2), qs[a:b], out=grad_k[a:b])   # dL/dk = dL/dS^T q / sqrt(C)

        parallel.parallel_for(grad.shape[0], chunk, parallel.threads_for(p))
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


def timestep_embedding(t, dim):
    """Sinusoidal embedding (N,) -> (N, dim) float32, as get_timestep_embedding in the original DDPM code.

    half = dim // 2, freq_i = exp(-i ln(10000) / (half - 1)), [sin(t freq), cos(t freq)],
    zero-padded by one column when dim is odd. Computed in float64 and cast (the
    original computes in float32; the values agree to float32 rounding of t * freq).
    """
    half = dim // 2
    if half < 2:
        raise ValueError(f"timestep_embedding needs dim >= 4 (its frequencies divide by dim // 2 - 1); got {dim}")
    t = t.data if isinstance(t, Tensor) else t
    xp = backend.xp()
    if not backend.is_array(t) or backend.xp_of(t) is not xp:
        t = backend.to_active(backend.to_numpy(t))               # ints, lists or the other backend's array
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects timesteps of shape (N,); got {t.shape}")
    freqs = xp.exp(xp.arange(half, dtype=xp.float64) * (-math.log(10000) / (half - 1)))  # (half,)
    args = t.astype(xp.float64)[:, None] * freqs[None, :]                                # (N, half)
    emb = xp.concatenate([xp.sin(args), xp.cos(args)], axis=1)
    if dim % 2:
        emb = xp.concatenate([emb, xp.zeros((emb.shape[0], 1), dtype=emb.dtype)], axis=1)
    return Tensor(emb.astype(backend.DTYPE))
