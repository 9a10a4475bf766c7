"""2-D convolution as im2col + one matrix product; its backward as two matrix products and col2im.

A convolution is a matrix product in disguise. im2col lays every kh x kw window of the
(zero-padded) input out as one row, so the whole batch's convolution is

    cols (N*Ho*Wo, C*kh*kw) @ W^T (C*kh*kw, O) = out (N*Ho*Wo, O).

Backward is the chain rule through that product: dL/dW = dL/dout^T cols, and dL/dcols =
dL/dout W, which col2im (im2col's adjoint) scatters back onto the pixels each window read.
This is the math; `kernels.conv` computes the same on the CPU with channels-last layouts,
image blocks in cache, Winograd's algorithm and the thread pool (`kernels.enabled()`).
May import: backend, tensor, kernels.
"""
from . import backend, kernels
from .kernels import conv as conv_kernel
from .tensor import Function


def normalize_padding(padding):
    """An int, a pair (ph, pw), or (top, bottom, left, right) -> (top, bottom, left, right)."""
    if isinstance(padding, int):
        pads = (padding,) * 4
    else:
        padding = tuple(int(p) for p in padding)
        if len(padding) == 2:
            pads = (padding[0], padding[0], padding[1], padding[1])
        elif len(padding) == 4:
            pads = padding
        else:
            raise ValueError(f"padding must be an int, (ph, pw) or (top, bottom, left, right); got {padding}")
    if any(p < 0 for p in pads):
        raise ValueError(f"padding must be non-negative; got {pads}")
    return pads


def normalize_stride(stride):
    """An int or a pair -> (sh, sw)."""
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(int(s) for s in stride)
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be positive; got {stride}")
    return sh, sw


def output_size(h, w, kh, kw, stride, pads):
    """(Ho, Wo) of a convolution (floor division, as PyTorch)."""
    (sh, sw), (pt, pb, pl, pr) = stride, pads
    return (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1


def im2col(x, kh, kw, stride=(1, 1), pads=(0, 0, 0, 0)):
    """x (N, C, H, W) -> cols (N*Ho*Wo, C*kh*kw): row (n, i, j) is the window under output pixel (i, j),
    its columns ordered (c, di, dj) as the weight (O, C, kh, kw) flattens."""
    xp = backend.xp_of(x)
    (sh, sw), (pt, pb, pl, pr) = normalize_stride(stride), normalize_padding(pads)
    n, c, h, w = x.shape
    ho, wo = output_size(h, w, kh, kw, (sh, sw), (pt, pb, pl, pr))
    xpad = xp.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    cols = xp.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for di in range(kh):          # one strided slice of the whole batch per kernel offset
        for dj in range(kw):
            cols[:, :, di, dj] = xpad[:, :, di:di + sh * ho:sh, dj:dj + sw * wo:sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * kh * kw)


def col2im(cols, x_shape, kh, kw, stride=(1, 1), pads=(0, 0, 0, 0)):
    """The adjoint of im2col: cols (N*Ho*Wo, C*kh*kw) -> (N, C, H, W), each window's entries added back
    onto the pixels it read (overlapping windows sum)."""
    xp = backend.xp_of(cols)
    (sh, sw), (pt, pb, pl, pr) = normalize_stride(stride), normalize_padding(pads)
    n, c, h, w = x_shape
    ho, wo = output_size(h, w, kh, kw, (sh, sw), (pt, pb, pl, pr))
    cols = cols.reshape(n, ho, wo, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)   # (N, C, kh, kw, Ho, Wo)
    xpad = xp.zeros((n, c, h + pt + pb, w + pl + pr), dtype=cols.dtype)
    for di in range(kh):
        for dj in range(kw):
            xpad[:, :, di:di + sh * ho:sh, dj:dj + sw * wo:sw] += cols[:, :, di, dj]
    return xpad[:, :, pt:pt + h, pl:pl + w]


class Conv2d(Function):
    """out = conv(x, weight) + bias: x (N, C, H, W), weight (O, C, kh, kw), bias (O,) -> (N, O, Ho, Wo)."""

    @staticmethod
    def forward(ctx, x, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0)):
        n, _, h, w = x.shape
        o, c, kh, kw = weight.shape
        ho, wo = output_size(h, w, kh, kw, stride, padding)
        cols = im2col(x, kh, kw, stride, padding)                 # (N*Ho*Wo, C*kh*kw)
        out = cols @ weight.reshape(o, -1).T                      # (N*Ho*Wo, O): the one matrix product
        if bias is not None:
            out += bias
        ctx.save_for_backward(cols, weight)
        ctx.geometry = x.shape, stride, padding
        return out.reshape(n, ho, wo, o).transpose(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        cols, weight = ctx.saved
        x_shape, stride, padding = ctx.geometry
        o, c, kh, kw = weight.shape
        g = grad.transpose(0, 2, 3, 1).reshape(-1, o)             # dL/dout as (N*Ho*Wo, O)
        grad_x = col2im(g @ weight.reshape(o, -1), x_shape, kh, kw, stride, padding)   # dL/dx = col2im(dL/dout W)
        grad_w = (g.T @ cols).reshape(weight.shape)               # dL/dW = dL/dout^T cols
        grad_b = g.sum(axis=0)                                    # dL/db = sum of dL/dout over N, Ho, Wo
        return (grad_x, grad_w, grad_b)[:len(ctx.needs_input_grad)]


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D cross-correlation (PyTorch's conv2d) of x (N, C, H, W) with weight (O, C, kh, kw)."""
    stride, padding = normalize_stride(stride), normalize_padding(padding)
    (n, c, h, w), (o, c_w, kh, kw) = x.shape, weight.shape
    if c != c_w:
        raise ValueError(f"conv2d: input has {c} channels but weight {tuple(weight.shape)} expects {c_w}")
    ho, wo = output_size(h, w, kh, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"conv2d: kernel {kh}x{kw} does not fit input {h}x{w} with padding {padding}")
    op = conv_kernel.Conv2d if kernels.enabled() else Conv2d     # the dispatch point: same result
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return op.apply(*inputs, stride=stride, padding=padding)
