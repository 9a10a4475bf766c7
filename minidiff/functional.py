"""The functional ops of the U-Net, with PyTorch's names and conventions: `from minidiff import functional as F`.

conv2d (conv.py), linear, group_norm, silu, softmax, dropout, upsample_nearest2d, attention
and the sinusoidal timestep_embedding of Ho et al. 2020 (arXiv:2006.11239), App. B, as in the
original DDPM code. Each op is its plain whole-batch math: forward, and a hand-written backward
whose derivative its comment states. Where an op is also built from primitives
(silu_reference, group_norm_reference, attention_reference, directly above it), that is its
definition, and tests/test_functional.py holds the hand-written backward to it.
Each op reaches its kernel (`minidiff.kernels`: chunks on the thread pool, fused passes,
channels-last layouts) at one dispatch point, `if kernels.enabled()`.
May import: backend, tensor, ops, conv, kernels.
"""
import math

from . import backend, kernels, ops
from .conv import conv2d  # noqa: F401  (re-exported: F.conv2d)
from .kernels import dense, elementwise, norm
from .ops import sigmoid_of, softmax  # noqa: F401  (re-exported: F.softmax)
from .tensor import Function, Tensor

__all__ = ["conv2d", "linear", "group_norm", "silu", "softmax", "dropout",
           "upsample_nearest2d", "attention", "timestep_embedding",
           "relu", "max_pool2d", "avg_pool2d", "resize_bilinear"]


# ---------------------------------------------------------------- linear


class Linear(Function):
    """y = x W^T + b: x (..., in), weight (out, in), bias (out,) -> (..., out)."""

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        x2 = x.reshape(-1, x.shape[-1])                          # (M, in): every leading axis is a row
        out = x2 @ weight.T
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved
        g2 = grad.reshape(-1, weight.shape[0])                   # (M, out)
        grad_x = (g2 @ weight).reshape(ctx.x_shape)              # dL/dx = dL/dy W
        grad_w = g2.T @ x2                                       # dL/dW = dL/dy^T x
        grad_b = g2.sum(axis=0)                                  # dL/db = sum over rows of dL/dy
        return (grad_x, grad_w, grad_b)[:len(ctx.needs_input_grad)]


def linear(x, weight, bias=None):
    """x W^T + b with weight shaped (out, in), as torch.nn.functional.linear."""
    op = dense.Linear if kernels.enabled() else Linear         # the dispatch point: same result
    return op.apply(x, weight) if bias is None else op.apply(x, weight, bias)


# ---------------------------------------------------------------- silu


def silu_reference(x):
    """SiLU ("swish") as its definition, x sigmoid(x), with primitives: what SiLU below computes."""
    return x * ops.sigmoid(x)


class SiLU(Function):
    """y = x sigmoid(x) (the paper's "swish"). Only x is saved, as PyTorch does: backward recomputes sigmoid."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * sigmoid_of(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        s = sigmoid_of(x)
        return grad * s * (1 + x * (1 - s))                      # dy/dx = s + x s (1 - s), s = sigmoid(x)


def silu(x, inplace=False):
    """x * sigmoid(x), elementwise. inplace=True lets the kernel write the result into x's array (as torch's
    inplace=True), which it does only when x needs no gradient; pass it only for a temporary x."""
    if kernels.enabled():                                        # the dispatch point: same result
        return elementwise.SiLU.apply(x, inplace=inplace)
    return SiLU.apply(x)


# ---------------------------------------------------------------- group norm


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group normalisation (Wu & He 2018) as its definition, with primitives: what GroupNorm below
    computes. Each sample's channels split into groups; each group is shifted to mean 0 and scaled
    to variance 1 over its channels and positions; then a per-channel affine map y = x_hat * weight + bias."""
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


class GroupNorm(Function):
    """y = x_hat * weight + bias, x_hat = (x - mean_g) / sqrt(var_g + eps), with the mean and variance of
    each group of C/G channels over all its positions, per sample. Saves x_hat and 1/sqrt(var_g + eps)."""

    @staticmethod
    def forward(ctx, x, *affine, num_groups, eps, has_weight, has_bias):
        n, c = x.shape[:2]
        g = x.reshape(n, num_groups, -1)                           # (N, G, C/G * H * W)
        d = g - g.mean(axis=2, keepdims=True)
        rstd = 1 / backend.xp_of(x).sqrt((d * d).mean(axis=2, keepdims=True) + x.dtype.type(eps))   # (N, G, 1)
        x_hat = (d * rstd).reshape(x.shape)
        per_channel = (1, c) + (1,) * (x.ndim - 2)
        weight = affine[0].reshape(per_channel) if has_weight else None
        y = x_hat if weight is None else x_hat * weight
        if has_bias:
            y = y + affine[-1].reshape(per_channel)
        ctx.save_for_backward(x_hat, rstd, weight)
        ctx.num_groups, ctx.has_weight, ctx.has_bias = num_groups, has_weight, has_bias
        return y

    @staticmethod
    def backward(ctx, grad):
        x_hat, rstd, weight = ctx.saved
        n, c = x_hat.shape[:2]
        axes = (0,) + tuple(range(2, x_hat.ndim))                  # every axis but the channels
        gh = grad if weight is None else grad * weight             # dL/dx_hat
        gh_g, x_hat_g = gh.reshape(n, ctx.num_groups, -1), x_hat.reshape(n, ctx.num_groups, -1)
        # dL/dx = rstd (gh - mean_g(gh) - x_hat mean_g(gh x_hat)): x_hat's Jacobian, per group
        grad_x = rstd * (gh_g - gh_g.mean(axis=2, keepdims=True)
                         - x_hat_g * (gh_g * x_hat_g).mean(axis=2, keepdims=True))
        grads = [grad_x.reshape(x_hat.shape)]
        if ctx.has_weight:
            grads.append((grad * x_hat).sum(axis=axes))            # dL/dweight = sum of dL/dy x_hat
        if ctx.has_bias:
            grads.append(grad.sum(axis=axes))                      # dL/dbias = sum of dL/dy
        return tuple(grads)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    """Group normalisation (Wu & He 2018) of x (N, C, ...) with optional per-channel weight and bias (C,).

    silu=True returns silu(group_norm(x)), as the residual blocks apply them; the kernel computes
    the pair as one op (norm.GroupNormSiLU), which keeps one activation less for backward.
    """
    c = x.shape[1]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels cannot be split into {num_groups} groups")
    affine = tuple(p for p in (weight, bias) if p is not None)
    params = dict(num_groups=num_groups, eps=eps, has_weight=weight is not None, has_bias=bias is not None)
    if kernels.enabled():                                          # the dispatch point: same result
        return (norm.GroupNormSiLU if silu else norm.GroupNorm).apply(x, *affine, **params)
    y = GroupNorm.apply(x, *affine, **params)
    return SiLU.apply(y) if silu else y


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
    """(N, C, H, W) -> (N, C, sH, sW), each pixel repeated in an s x s block."""

    @staticmethod
    def forward(ctx, x, scale):
        n, c, h, w = x.shape
        ctx.scale = scale
        wide = backend.xp_of(x).broadcast_to(x[:, :, :, None, :, None], (n, c, h, scale, w, scale))
        return wide.reshape(n, c, h * scale, w * scale)

    @staticmethod
    def backward(ctx, grad):
        n, c, hs, ws = grad.shape
        s = ctx.scale
        return grad.reshape(n, c, hs // s, s, ws // s, s).sum(axis=(3, 5))   # dL/dx = sum of dL/dy over each block


def upsample_nearest2d(x, scale_factor=2):
    """Nearest-neighbour upsampling by an integer factor, as torch's F.interpolate(mode="nearest")."""
    if int(scale_factor) != scale_factor or scale_factor < 1:
        raise ValueError(f"upsample_nearest2d needs a positive integer scale_factor; got {scale_factor}")
    op = elementwise.UpsampleNearest2d if kernels.enabled() else UpsampleNearest2d   # the dispatch point
    return op.apply(x, scale=int(scale_factor))


# ---------------------------------------------------------------- attention


def attention_reference(q, k, v):
    """Dot-product attention as its definition, softmax(q k^T / sqrt(C)) v on (N, L, C), with
    primitives: what Attention below computes."""
    scores = q @ ops.transpose(k, 0, 2, 1) * (q.shape[-1] ** -0.5)   # (N, L, L)
    return ops.softmax(scores, axis=-1) @ v


class Attention(Function):
    """out = P v with P = softmax(S), S = q k^T / sqrt(C), on (N, L, C); P is saved for backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        xp = backend.xp_of(q)
        scale = q.dtype.type(q.shape[-1] ** -0.5)
        s = q @ k.swapaxes(-1, -2) * scale                         # (N, L, L) scores
        p = xp.exp(s - s.max(axis=-1, keepdims=True))              # shifted by the max: exp never overflows
        p /= p.sum(axis=-1, keepdims=True)                         # softmax over the keys
        ctx.save_for_backward(q, k, v, p)
        return p @ v

    @staticmethod
    def backward(ctx, grad):
        q, k, v, p = ctx.saved
        scale = q.dtype.type(q.shape[-1] ** -0.5)
        grad_v = p.swapaxes(-1, -2) @ grad                         # dL/dv = P^T dL/dout
        grad_p = grad @ v.swapaxes(-1, -2)                         # dL/dP = dL/dout v^T
        grad_s = p * (grad_p - (grad_p * p).sum(axis=-1, keepdims=True))   # softmax: dL/dS = P (dL/dP - rowsum(dL/dP P))
        grad_q = grad_s @ k * scale                                # dL/dq = dL/dS k / sqrt(C)
        grad_k = grad_s.swapaxes(-1, -2) @ q * scale               # dL/dk = dL/dS^T q / sqrt(C)
        return grad_q, grad_k, grad_v


def attention(q, k, v):
    """Single-head dot-product attention softmax(q k^T / sqrt(C)) v (Vaswani et al. 2017, Eq. 1).

    q, k, v: (N, L, C) with L = H*W positions. For a conv2d output h (N, C, H, W),
    `h.transpose(0, 2, 3, 1).reshape(N, H*W, C)` puts the positions in rows.
    """
    if q.shape != k.shape or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"attention needs q, k of one shape (N, L, C) and v (N, L, Cv); "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    op = dense.Attention if kernels.enabled() else Attention       # the dispatch point: same result
    return op.apply(q, k, v)


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


# ---------------------------------------------------------------- pooling and resizing (Inception, FID)


def relu(x):
    """max(x, 0); its gradient is 1 where x > 0, else 0 (ops.maximum's backward)."""
    return ops.maximum(x, 0.0)


def _windows(shape, kernel, stride, pads):
    """(Ho, Wo) and the slices of the padded input under each of the kh*kw kernel offsets."""
    from .conv import output_size
    (kh, kw), (sh, sw) = kernel, stride
    ho, wo = output_size(shape[2], shape[3], kh, kw, stride, pads)
    offsets = [(slice(di, di + sh * ho, sh), slice(dj, dj + sw * wo, sw)) for di in range(kh) for dj in range(kw)]
    return (ho, wo), offsets


class MaxPool2d(Function):
    """y = max of each kh x kw window of x padded with -inf (PyTorch's max_pool2d)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, pads):
        xp = backend.xp_of(x)
        (pt, pb, pl, pr) = pads
        xpad = xp.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=-xp.inf) if any(pads) else x
        _, offsets = _windows(x.shape, kernel, stride, pads)
        best = xpad[(..., *offsets[0])].copy()
        for rows, cols in offsets[1:]:
            xp.maximum(best, xpad[..., rows, cols], out=best)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(xpad, best)
        ctx.geometry = x.shape, xpad.shape, offsets, pads
        return best

    @staticmethod
    def backward(ctx, grad):
        xpad, best = ctx.saved
        x_shape, pad_shape, offsets, (pt, _, pl, _) = ctx.geometry
        xp = backend.xp_of(grad)
        gpad = xp.zeros(pad_shape, dtype=grad.dtype)
        unclaimed = xp.ones(best.shape, dtype=bool)
        for rows, cols in offsets:   # dL/dx = dL/dy at the one input each window chose: its first maximum, as PyTorch
            chosen = unclaimed & (xpad[..., rows, cols] == best)
            gpad[..., rows, cols] += xp.where(chosen, grad, 0)
            unclaimed &= ~chosen
        return gpad[..., pt:pt + x_shape[2], pl:pl + x_shape[3]]


class AvgPool2d(Function):
    """y = mean of each kh x kw window of zero-padded x; with count_include_pad=False the padded
    zeros are left out of the count (the FID Inception's pooling, as TensorFlow's)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, pads, count_include_pad):
        xp = backend.xp_of(x)
        (pt, pb, pl, pr) = pads
        xpad = xp.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        _, offsets = _windows(x.shape, kernel, stride, pads)
        if count_include_pad:
            count = float(len(offsets))
        else:                                          # how many real pixels each window covers
            ones = xp.pad(xp.ones(x.shape[2:], dtype=x.dtype), ((pt, pb), (pl, pr)))
            count = sum(ones[rows, cols] for rows, cols in offsets)
        total = xpad[(..., *offsets[0])].copy()
        for rows, cols in offsets[1:]:
            total += xpad[..., rows, cols]
        total /= count
        ctx.count, ctx.geometry = count, (x.shape, xpad.shape, offsets, pads)
        return total

    @staticmethod
    def backward(ctx, grad):
        x_shape, pad_shape, offsets, (pt, _, pl, _) = ctx.geometry
        xp = backend.xp_of(grad)
        g = grad / ctx.count
        gpad = xp.zeros(pad_shape, dtype=grad.dtype)
        for rows, cols in offsets:                     # dL/dx = sum over the windows holding x of dL/dy / count
            gpad[..., rows, cols] += g
        return gpad[..., pt:pt + x_shape[2], pl:pl + x_shape[3]]


def _pool_args(kernel_size, stride, padding):
    from .conv import normalize_padding, normalize_stride
    kernel = normalize_stride(kernel_size)
    stride = kernel if stride is None else normalize_stride(stride)
    pads = normalize_padding(padding)
    if max(pads[0], pads[1]) > kernel[0] // 2 or max(pads[2], pads[3]) > kernel[1] // 2:
        raise ValueError(f"pooling padding {padding} must be at most half the kernel {kernel_size}")
    return kernel, stride, pads


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """PyTorch's F.max_pool2d (stride defaults to the kernel size)."""
    kernel, stride, pads = _pool_args(kernel_size, stride, padding)
    return MaxPool2d.apply(x, kernel=kernel, stride=stride, pads=pads)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """PyTorch's F.avg_pool2d (stride defaults to the kernel size)."""
    kernel, stride, pads = _pool_args(kernel_size, stride, padding)
    return AvgPool2d.apply(x, kernel=kernel, stride=stride, pads=pads, count_include_pad=count_include_pad)


def bilinear_matrix(size_in, size_out, dtype="float64"):
    """(size_out, size_in) rows of bilinear weights, PyTorch's F.interpolate(mode="bilinear",
    align_corners=False): output pixel i reads the input at (i + 0.5) * size_in / size_out - 0.5,
    clamped at 0, between its two neighbours (the last one repeated at the border). No antialiasing."""
    host = backend.host
    src = host.maximum((host.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    i0 = host.floor(src).astype(host.int64)
    i1 = host.minimum(i0 + 1, size_in - 1)
    frac = src - i0
    m = host.zeros((size_out, size_in))
    host.add.at(m, (host.arange(size_out), i0), 1.0 - frac)
    host.add.at(m, (host.arange(size_out), i1), frac)
    return m.astype(dtype)


class ResizeBilinear(Function):
    """y = R_h x R_w^T per image and channel: bilinear resizing is linear, one matrix per axis."""

    @staticmethod
    def forward(ctx, x, size):
        xp = backend.xp_of(x)
        rh = xp.asarray(bilinear_matrix(x.shape[2], size[0], x.dtype))
        rw = xp.asarray(bilinear_matrix(x.shape[3], size[1], x.dtype))
        ctx.save_for_backward(rh, rw)
        return xp.matmul(xp.matmul(rh, x), rw.T)

    @staticmethod
    def backward(ctx, grad):
        rh, rw = ctx.saved
        xp = backend.xp_of(grad)
        return xp.matmul(xp.matmul(rh.T, grad), rw)   # dL/dx = R_h^T dL/dy R_w


def resize_bilinear(x, size):
    """(N, C, H, W) -> (N, C, *size), as F.interpolate(x, size, mode="bilinear", align_corners=False)."""
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if x.shape[2:] == size:
        return x
    return ResizeBilinear.apply(x, size=size)
