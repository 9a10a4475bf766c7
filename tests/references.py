"""Slow, independent numpy references the tests share: direct definitions, no code of minidiff's own.

Each is written the most literal way (loops over output pixels, float64), so that a test can hold
both the math layer and its kernels to something neither shares code with.
"""
import numpy as np


def normalize_padding(padding):
    """int | (ph, pw) | (top, bottom, left, right) -> (top, bottom, left, right), written out here again."""
    if isinstance(padding, int):
        return (padding,) * 4
    padding = tuple(padding)
    return (padding[0], padding[0], padding[1], padding[1]) if len(padding) == 2 else padding


def conv_reference(x, w, b, stride, padding):
    """Direct float64 cross-correlation: one dot product per output pixel and output channel."""
    pt, pb, pl, pr = normalize_padding(padding)
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    xpad = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    w = np.asarray(w, np.float64)
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


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm in float64, one group of one sample at a time."""
    x = np.asarray(x, np.float64)
    n, c = x.shape[:2]
    out = np.empty_like(x)
    size = c // num_groups
    for i in range(n):
        for g in range(num_groups):
            block = x[i, g * size:(g + 1) * size]
            out[i, g * size:(g + 1) * size] = (block - block.mean()) / np.sqrt(block.var() + eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        out = out * np.reshape(weight, shape)
    if bias is not None:
        out = out + np.reshape(bias, shape)
    return out


def attention_reference(q, k, v):
    """softmax(q k^T / sqrt(C)) v, one query row at a time, in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.empty(q.shape[:2] + v.shape[2:])
    for i in range(q.shape[0]):
        for r in range(q.shape[1]):
            s = k[i] @ q[i, r] / np.sqrt(q.shape[-1])
            p = np.exp(s - s.max())
            out[i, r] = (p / p.sum()) @ v[i]
    return out
