"""2-D convolution as im2col + one matrix product, and its backward as GEMMs (+ col2im).

Internally channels-last: the padded input is written once as (N, Hp, Wp, C), its
kh*kw windows are read through a strided view, and one copy lays them out as the
GEMM operand (N*Ho*Wo, kh*kw*C). The result (N*Ho*Wo, O) is returned as an
(N, O, Ho, Wo) view with channels-last strides, so no output transpose is copied;
numpy's elementwise ops keep that layout. Backward: dL/dW is one GEMM with the
rebuilt columns; dL/dx is, for stride 1, the same im2col + GEMM on the gradient
with the flipped kernel (measured 1.2-2x faster than GEMM + col2im, which moves
kh*kw times more data), and otherwise GEMM + col2im over the kernel offsets.
The fast path: stride-1 3x3 convolutions of 64+ channels and 16x16+ outputs take
Winograd F(2x2, 3x3) (Lavin & Gray 2016) on the CPU, forward, input gradient and weight
gradient, 2.25x fewer multiplications; the im2col + GEMM above stays the reference it is tested against.
On the CPU each of these runs per batch chunk on the thread pool (parallel.py), with
single-threaded BLAS and a scratch buffer per thread; the weight gradient sums the
chunks' products. With one thread the chunk is the whole batch.
May import: backend, tensor, parallel.
"""
import threading

from . import backend, parallel
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


def _pad_nhwc(x, pads):
    """x (N, H, W, C) -> (N, Hp, Wp, C), zero-padded: x itself when no padding is needed."""
    pt, pb, pl, pr = pads
    if not any(pads):
        return x  # windows() reads any strides: no copy needed
    n, h, w, c = x.shape
    xpad = backend.xp_of(x).empty((n, h + pt + pb, w + pl + pr, c), dtype=x.dtype)
    # zero only the border, then one copy of the interior (which also converts a channels-first layout)
    xpad[:, :pt], xpad[:, pt + h:] = 0, 0
    xpad[:, pt:pt + h, :pl], xpad[:, pt:pt + h, pl + w:] = 0, 0
    xpad[:, pt:pt + h, pl:pl + w] = x
    return xpad


def windows(xpad, kh, kw, stride):
    """Strided view (N, Ho, Wo, kh, kw, C) of the kh x kw windows of xpad (N, Hp, Wp, C); no copy."""
    xp = backend.xp_of(xpad)
    n, hp, wp, c = xpad.shape
    sh, sw = stride
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    s_n, s_h, s_w, s_c = xpad.strides
    return xp.lib.stride_tricks.as_strided(
        xpad, shape=(n, ho, wo, kh, kw, c), strides=(s_n, s_h * sh, s_w * sw, s_h, s_w, s_c))


_workspace = {}  # (module name, dtype, thread) -> one flat buffer reused for every im2col matrix


def _scratch(xp, shape, dtype, slot="cols"):
    """A reusable numpy buffer of `shape` for an im2col matrix (or a Winograd operand, per `slot`),
    which never outlives one forward/backward.

    A fresh 10-100 MB array costs page faults on every call, about half of the
    copy's time on numpy; cupy's memory pool already reuses memory, so it allocates.
    """
    if xp is not backend.host:
        return xp.empty(shape, dtype=dtype)
    size = 1
    for n in shape:
        size *= n
    key = (xp.__name__, xp.dtype(dtype).str, threading.get_ident(), slot)  # per thread: chunks run at once
    buf = _workspace.get(key)
    if buf is None or buf.size < size:
        buf = _workspace[key] = None  # free the old buffer before allocating the larger one
        buf = _workspace[key] = xp.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def _im2col_nhwc(xpad, kh, kw, stride, scratch=False):
    """Padded xpad (N, Hp, Wp, C) -> (N*Ho*Wo, kh*kw*C). A 1x1 stride-1 kernel needs no copy when
    xpad is contiguous; with `scratch` the copy goes to the shared workspace (use it before the next call)."""
    n, hp, wp, c = xpad.shape
    if kh == kw == 1 and stride == (1, 1):
        return xpad.reshape(-1, c)
    win = windows(xpad, kh, kw, stride)
    if not scratch:
        return win.reshape(-1, kh * kw * c)                      # the one im2col copy
    cols = _scratch(backend.xp_of(xpad), win.shape, xpad.dtype)
    cols[...] = win                                              # the one im2col copy
    return cols.reshape(-1, kh * kw * c)


# The largest scratch matrix (im2col columns, Winograd's V and M) one block of images may take: a chunk's
# images go through in blocks of this size, so the copy is still in the core's cache (2 MB of L2 here) when
# the GEMM reads it, and the scratch memory stays at this size per thread whatever the batch (a 96-channel
# 8x8 conv of 64 images would otherwise need a 14 MB column matrix). Measured at 2 threads, forward +
# backward (BENCHMARKS.md): 2 MiB makes the 32x32 Winograd convs 10-20% faster than one block, moves the
# 8x8 ones by -7% to +6%, and beat 0.25, 0.5, 1 and 4 MiB overall.
BLOCK_BYTES = 2 << 20


def image_blocks(n, bytes_per_image, xp):
    """Split images 0..n-1 into nearly equal (start, stop) blocks of about BLOCK_BYTES of scratch each
    (between 2/3 and 3/2 of it, at least one image per block; no small tail block); one block on a GPU,
    where CuPy's memory pool reuses memory and every launch costs."""
    if xp is not backend.host or n <= 1:
        return [(0, n)]
    return parallel.chunks(n, max(1, round(n * bytes_per_image / BLOCK_BYTES)))


def im2col(x, kh, kw, stride=1, padding=0):
    """x (N, C, H, W) -> cols (N*Ho*Wo, kh*kw*C), one row per output pixel, columns ordered (i, j, c)."""
    stride, pads = normalize_stride(stride), normalize_padding(padding)
    return _im2col_nhwc(_pad_nhwc(x.transpose(0, 2, 3, 1), pads), kh, kw, stride)


def col2im(cols, x_shape, kh, kw, stride=1, padding=0):
    """The adjoint of im2col: cols (N*Ho*Wo, kh*kw*C) -> (N, C, H, W), summing overlapping windows.

    Loops over the kh*kw kernel offsets only; each `+=` writes a strided slice
    without repeated indices, so it is exact on numpy and cupy alike.
    """
    stride, pads = normalize_stride(stride), normalize_padding(padding)
    (sh, sw), (pt, pb, pl, pr) = stride, pads
    n, c, h, w = x_shape
    ho, wo = output_size(h, w, kh, kw, stride, pads)
    xp = backend.xp_of(cols)
    cols = cols.reshape(n, ho, wo, kh, kw, c)
    gpad = xp.zeros((n, h + pt + pb, w + pl + pr, c), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            gpad[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += cols[:, :, :, i, j]
    return gpad[:, pt:pt + h, pl:pl + w].transpose(0, 3, 1, 2)  # (N, C, H, W) view, channels-last strides


# ---------------------------------------------------------------- Winograd F(2x2, 3x3), the fast path

# Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks", Sec. 4.1: a 2x2 output tile
# Y = A^T [(G g G^T) * (B^T d B)] A of a 4x4 input tile d and 3x3 kernel g. The elementwise product over
# the 16 tile positions becomes 16 GEMMs (tiles x C) @ (C x O): 16 multiplies per 4 outputs where
# im2col's one GEMM does 36, 2.25x fewer. The transforms are additions on whole strided slices.
WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))   # kernel transform G
USE_WINOGRAD = True  # stride-1 3x3 convolutions on numpy take the fast path (False: the plain im2col + GEMM)
# Where it pays (BENCHMARKS.md, measured per U-Net conv shape at one thread): the transforms are memory-bound
# passes, so below 64 channels in and out or 16x16 outputs the plain GEMM is as fast or faster.
WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_PIXELS = 64, 256


def winograd_weights(w):
    """U = G g G^T for every (o, c) of a 3x3 kernel w (O, C, 3, 3) -> (16, C, O), the 16 GEMMs' right operands."""
    xp = backend.xp_of(w)
    g = xp.asarray(WINOGRAD_G, dtype=w.dtype)
    o, c = w.shape[:2]
    kron = (g[:, None, :, None] * g[None, :, None, :]).reshape(16, 9)   # G (x) G: U[ab] = sum_ij G[a,i] G[b,j] g[ij]
    u = w.reshape(o * c, 9) @ kron.T                                 # (O*C, 16): one GEMM for every (o, c)
    return xp.ascontiguousarray(u.reshape(o, c, 16).transpose(2, 1, 0))


def _winograd_input(xpad):
    """V = B^T d B for every 4x4 tile (stride 2) of xpad (n, 2*th+2, 2*tw+2, C) -> (4, 4, n, th, tw, C),
    the 16 tile positions' left GEMM operands (a scratch buffer: use it before the next call)."""
    xp = backend.xp_of(xpad)
    n, hp, wp, c = xpad.shape
    th, tw = (hp - 2) // 2, (wp - 2) // 2
    # B^T d: the 4 row combinations of every tile, over whole rows (n, th, Wp, C)
    r = _scratch(xp, (4, n, th, wp, c), xpad.dtype, "wino_rows")
    d0, d1, d2, d3 = (xpad[:, k:k + 2 * th:2] for k in range(4))   # tile rows k = 0..3
    xp.subtract(d0, d2, out=r[0])
    xp.add(d1, d2, out=r[1])
    xp.subtract(d2, d1, out=r[2])
    xp.subtract(d1, d3, out=r[3])
    # (B^T d) B: the same on the columns -> V (4, 4, n, th, tw, C) = (16 tile positions, tiles, C)
    v = _scratch(xp, (4, 4, n, th, tw, c), xpad.dtype, "wino_v")
    for i in range(4):
        e0, e1, e2, e3 = (r[i][:, :, k:k + 2 * tw:2] for k in range(4))
        xp.subtract(e0, e2, out=v[i, 0])
        xp.add(e1, e2, out=v[i, 1])
        xp.subtract(e2, e1, out=v[i, 2])
        xp.subtract(e1, e3, out=v[i, 3])
    return v


def _winograd_conv(xpad, u, out):
    """Stride-1 3x3 correlation of xpad (n, Ho+2, Wo+2, C), Ho and Wo even, with U (16, C, O) into out (n*Ho*Wo, O).

    V = B^T d B for every 4x4 tile (stride 2) of xpad, M = V U per tile position, Y = A^T M A.
    """
    xp = backend.xp_of(xpad)
    n, hp, wp, c = xpad.shape
    th, tw, o = (hp - 2) // 2, (wp - 2) // 2, u.shape[2]
    v = _winograd_input(xpad)
    m = _scratch(xp, (16, n * th * tw, o), out.dtype, "wino_m")
    xp.matmul(v.reshape(16, -1, c), u, out=m)                         # the 16 GEMMs
    # A^T M: rows (m0 + m1 + m2, m1 - m2 - m3) of every tile column, then the same on columns into Y
    m = m.reshape(4, 4, n, th, tw, o)
    t = _scratch(xp, (2, 4, n, th, tw, o), out.dtype, "wino_t")
    xp.add(m[0], m[1], out=t[0])
    t[0] += m[2]
    xp.subtract(m[1], m[2], out=t[1])
    t[1] -= m[3]
    y = out.reshape(n, th, 2, tw, 2, o)                              # output pixel (2a + p, 2b + q)
    for p in range(2):
        yp0, yp1 = y[:, :, p, :, 0], y[:, :, p, :, 1]
        xp.add(t[p, 0], t[p, 1], out=yp0)
        yp0 += t[p, 2]
        xp.subtract(t[p, 1], t[p, 2], out=yp1)
        yp1 -= t[p, 3]


def _winograd_correlate(x_nhwc, u, pads, out):
    """Stride-1 3x3 correlation of x (n, H, W, C) padded by `pads`, into out (n*Ho*Wo, O), any Ho, Wo, a block of
    images at a time: odd sizes get one more zero row/column and the extra output row/column is dropped."""
    xp = backend.xp_of(out)
    n, h, w, c = x_nhwc.shape
    pt, pb, pl, pr = pads
    ho, wo = h + pt + pb - 2, w + pl + pr - 2
    he, we, o = ho + ho % 2, wo + wo % 2, out.shape[1]
    xpads = _pad_nhwc(x_nhwc, (pt, pb + ho % 2, pl, pr + wo % 2))
    for p, q in image_blocks(n, 4 * he * we * max(c, o) * out.itemsize, xp):   # V and M: 4x an image's in/out
        xpad = parallel.part(xpads, p, q)
        rows = parallel.part(out, p * ho * wo, q * ho * wo)
        if ho % 2 == 0 and wo % 2 == 0:
            _winograd_conv(xpad, u, rows)
            continue
        full = xp.empty(((q - p) * he * we, o), dtype=out.dtype)
        _winograd_conv(xpad, u, full)
        rows.reshape(q - p, ho, wo, o)[...] = full.reshape(q - p, he, we, o)[:, :ho, :wo]


def _winograd_tile_grads(x_nhwc, g_nhwo, pads):
    """The weight gradient's part of one batch chunk in the Winograd domain: dL/dU' (16, C, O).

    Y = A^T (U * V) A is linear in U, so dL/dU = sum over tiles of V * (A dY A^T), one GEMM
    (C x tiles) @ (tiles x O) per tile position: 16 C T O multiplies where im2col's GEMM does
    36 C T O, and no im2col copy. Here A dY A^T is taken with A's last row as +dY1 (no negation
    pass); `winograd_kernel_grad` puts that sign back. Odd Ho, Wo: the gradient gets a zero
    row/column, as the forward's extra output row/column was dropped. A block of images at a time.
    """
    xp = backend.xp_of(g_nhwo)
    n, ho, wo, o = g_nhwo.shape
    c = x_nhwc.shape[3]
    pt, pb, pl, pr = pads
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    du = None
    xpads = _pad_nhwc(x_nhwc, (pt, pb + ho % 2, pl, pr + wo % 2))
    for p, q in image_blocks(n, 16 * th * tw * max(c, o) * g_nhwo.itemsize, xp):
        xpad = parallel.part(xpads, p, q)
        g = parallel.part(g_nhwo, p, q)
        if ho % 2 or wo % 2:
            g = xp.zeros((q - p, 2 * th, 2 * tw, o), dtype=g_nhwo.dtype)
            g[:, :ho, :wo] = g_nhwo[p:q]
        v = _winograd_input(xpad)                                   # (4, 4, n, th, tw, C)
        y = g.reshape(q - p, th, 2, tw, 2, o)                       # dY of output pixel (2a + p, 2b + q)
        # A dY: rows (dY0, dY0 + dY1, dY0 - dY1, dY1) of every tile, then the same on columns into dM
        s = _scratch(xp, (2, q - p, th, tw, 2, o), g.dtype, "wino_g")
        xp.add(y[:, :, 0], y[:, :, 1], out=s[0])
        xp.subtract(y[:, :, 0], y[:, :, 1], out=s[1])
        dm = _scratch(xp, (4, 4, q - p, th, tw, o), g.dtype, "wino_m")
        for i, r in enumerate((y[:, :, 0], s[0], s[1], y[:, :, 1])):
            r0, r1 = r[:, :, :, 0], r[:, :, :, 1]
            dm[i, 0] = r0
            xp.add(r0, r1, out=dm[i, 1])
            xp.subtract(r0, r1, out=dm[i, 2])
            dm[i, 3] = r1
        t = (q - p) * th * tw
        prod = xp.matmul(v.reshape(16, t, c).transpose(0, 2, 1), dm.reshape(16, t, o))   # the 16 GEMMs, (16, C, O)
        du = prod if du is None else xp.add(du, prod, out=du)
    return du


def winograd_kernel_grad(du):
    """dL/dU' (16, C, O), summed over chunks -> dL/dw (O, C, 3, 3) = G^T dL/dU G per (o, c), the adjoint of
    winograd_weights (with the sign of A's last row that _winograd_tile_grads left out)."""
    xp = backend.xp_of(du)
    g = xp.asarray(WINOGRAD_G, dtype=du.dtype)
    sign = xp.asarray((1.0, 1.0, 1.0, -1.0), dtype=du.dtype)
    kron = (g[:, None, :, None] * g[None, :, None, :]).reshape(16, 9)
    kron *= (sign[:, None] * sign[None, :]).reshape(16, 1)
    _, c, o = du.shape
    dw = du.reshape(16, c * o).T @ kron                               # (C*O, 9): one GEMM for every (c, o)
    return xp.ascontiguousarray(dw.reshape(c, o, 3, 3).transpose(1, 0, 2, 3))


def _use_winograd(x, weight, stride, pixels):
    """The fast path for a stride-1 3x3 correlation of x with a weight (O, C, 3, 3) into `pixels` outputs per image."""
    o, c, kh, kw = weight.shape
    return (USE_WINOGRAD and kh == kw == 3 and stride == (1, 1) and backend.xp_of(x) is backend.host
            and min(o, c) >= WINOGRAD_MIN_CHANNELS and pixels >= WINOGRAD_MIN_PIXELS)


class Conv2d(Function):
    """out = conv(x, weight) + bias: x (N, C, H, W), weight (O, C, kh, kw), bias (O,) -> (N, O, Ho, Wo).

    Forward saves only x itself (often saved by the op that made it as well), not the padded
    copy nor the kh*kw times larger im2col matrix; backward pads and rebuilds the
    columns again (two copies, cheap next to the GEMMs) for the weight gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0)):
        n, c, h, w = x.shape
        o, c_w, kh, kw = weight.shape
        if c != c_w:
            raise ValueError(f"conv2d: input has {c} channels but weight {weight.shape} expects {c_w}")
        ho, wo = output_size(h, w, kh, kw, stride, padding)
        if ho < 1 or wo < 1:
            raise ValueError(f"conv2d: kernel {kh}x{kw} does not fit input {h}x{w} with padding {padding}")
        xp = backend.xp_of(x)
        w2 = weight.transpose(0, 2, 3, 1).reshape(o, -1)          # (O, kh*kw*C), columns ordered (i, j, c)
        threads = parallel.threads_for(x, macs=n * ho * wo * o * c * kh * kw)
        dtype = xp.result_type(x, weight)
        out = parallel.buffer(xp, (n * ho * wo, o), dtype, threads)
        rows = ho * wo                                            # output rows per image
        u = winograd_weights(weight) if _use_winograd(x, weight, stride, ho * wo) else None

        def chunk(a, b):                                          # images a..b-1, on one thread
            res = parallel.part(out, a * rows, b * rows)
            if u is not None:                                     # the fast path: same result, 2.25x fewer FLOPs
                res = xp.empty(((b - a) * rows, o), dtype=dtype) if res is None else res
                _winograd_correlate(parallel.part(x, a, b).transpose(0, 2, 3, 1), u, padding, res)
            else:                                                 # the plain convolution: im2col + one GEMM
                blocks = image_blocks(b - a, rows * w2.shape[1] * x.itemsize, xp) if kh * kw > 1 else [(0, b - a)]
                if res is None and len(blocks) > 1:
                    res = xp.empty(((b - a) * rows, o), dtype=dtype)
                xpad = _pad_nhwc(parallel.part(x, a, b).transpose(0, 2, 3, 1), padding)   # (n, Hp, Wp, C)
                for p, q in blocks:                               # a few images at a time: the columns stay in cache
                    cols = _im2col_nhwc(parallel.part(xpad, p, q), kh, kw, stride, scratch=True)   # (n*Ho*Wo, kh*kw*C)
                    r = xp.matmul(cols, w2.T, out=parallel.part(res, p * rows, q * rows))   # (n*Ho*Wo, O): the GEMM
                res = r if res is None else res
            if bias is not None:
                res += bias
            return res

        parts = parallel.parallel_for(n, chunk, threads)
        out = parts[0] if out is None else out
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.geometry = x.shape, stride, padding
        return out.reshape(n, ho, wo, o).transpose(0, 3, 1, 2)   # (N, O, Ho, Wo) view, channels-last strides

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved
        x_shape, stride, padding = ctx.geometry
        o, c, kh, kw = weight.shape
        n, _, h, w = x_shape
        xp = backend.xp_of(grad)
        need = ctx.needs_input_grad
        g4 = grad.transpose(0, 2, 3, 1)                           # (N, Ho, Wo, O)
        pt, pb, pl, pr = padding
        full = (kh - 1 - pt, kh - 1 - pb, kw - 1 - pl, kw - 1 - pr)
        plain_1x1 = kh == kw == 1 and stride == (1, 1) and not any(padding)
        transposed = stride == (1, 1) and min(full) >= 0
        threads = parallel.threads_for(grad, macs=grad.size * c * kh * kw)
        grad_x = None
        if need[0] and (plain_1x1 or transposed):
            grad_x = parallel.buffer(xp, (n * h * w, c), grad.dtype, threads)   # rows written by the chunks
        w_flip = u_flip = None                                    # the transposed conv's kernel, as a GEMM or Winograd's U
        if need[0] and transposed and _use_winograd(grad, weight, stride, h * w):
            u_flip = winograd_weights(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))   # (16, O, C)
        elif need[0] and transposed and not plain_1x1:
            w_flip = weight[:, :, ::-1, ::-1].transpose(1, 2, 3, 0).reshape(c, -1)   # (C, kh*kw*O)

        ho, wo = g4.shape[1:3]
        wino_w = need[1] and _use_winograd(grad, weight, stride, ho * wo)   # dL/dW in the Winograd domain

        def chunk(a, b):                                          # images a..b-1 -> (dW part, db part, dx part)
            g2 = xp.ascontiguousarray(parallel.part(g4, a, b).reshape(-1, o))     # (n*Ho*Wo, O); no copy if grad is channels-last
            gw = gb = gx = None
            if wino_w:                                            # the fast path: dL/dU', 16 GEMMs, no im2col copy
                gw = _winograd_tile_grads(parallel.part(x, a, b).transpose(0, 2, 3, 1),
                                          g2.reshape(b - a, ho, wo, o), padding)
            elif need[1]:
                rows = ho * wo
                blocks = image_blocks(b - a, rows * kh * kw * c * x.itemsize, xp) if kh * kw > 1 else [(0, b - a)]
                xpad = _pad_nhwc(parallel.part(x, a, b).transpose(0, 2, 3, 1), padding)
                for p, q in blocks:                               # dL/dW sums the blocks' products
                    cols = _im2col_nhwc(parallel.part(xpad, p, q), kh, kw, stride, scratch=True)
                    prod = cols.T @ parallel.part(g2, p * rows, q * rows)   # dL/dW = cols^T dL/dout, (kh*kw*C, O)
                    gw = prod if gw is None else xp.add(gw, prod, out=gw)
                del cols
            if len(need) > 2 and need[2]:
                gb = g2.sum(axis=0)                               # dL/db = sum of dL/dout over N, Ho, Wo
            if need[0]:
                res = parallel.part(grad_x, a * h * w, b * h * w)
                if plain_1x1:
                    gx = xp.matmul(g2, weight.reshape(o, c), out=res)   # dL/dx = dL/dout W, a plain GEMM
                elif u_flip is not None:                          # the same correlation, Winograd's fast path
                    gx = xp.empty(((b - a) * h * w, c), dtype=grad.dtype) if res is None else res
                    _winograd_correlate(g2.reshape(b - a, *g4.shape[1:]), u_flip, full, gx)
                elif transposed:
                    # stride 1: dL/dx = dL/dout (zero-padded by k-1-p) correlated with the flipped, transposed kernel
                    g_img = g2.reshape(b - a, *g4.shape[1:])
                    blocks = image_blocks(b - a, h * w * w_flip.shape[1] * g2.itemsize, xp)
                    if res is None and len(blocks) > 1:
                        res = xp.empty(((b - a) * h * w, c), dtype=grad.dtype)
                    gpad = _pad_nhwc(g_img, full)
                    for p, q in blocks:
                        gcols = _im2col_nhwc(parallel.part(gpad, p, q), kh, kw, (1, 1), scratch=True)
                        gx = xp.matmul(gcols, w_flip.T, out=parallel.part(res, p * h * w, q * h * w))   # (n*H*W, C)
                    gx = gx if res is None else res
                else:
                    # dL/dx = col2im(dL/dout W): scatter each window's gradient back
                    gx = col2im(g2 @ weight.transpose(0, 2, 3, 1).reshape(o, -1), (b - a,) + tuple(x_shape[1:]),
                                kh, kw, stride, padding)
            return gw, gb, gx

        parts = parallel.parallel_for(n, chunk, threads)
        grad_w = grad_b = None
        if need[1]:
            gw = parts[0][0]
            for p in parts[1:]:
                gw += p[0]                                        # the weight gradient sums the chunks' products
            if wino_w:
                grad_w = winograd_kernel_grad(gw)                 # dL/dw = G^T dL/dU G, OIHW
            else:
                grad_w = xp.ascontiguousarray(gw.reshape(kh, kw, c, o).transpose(3, 2, 0, 1))   # OIHW
        if len(need) > 2 and need[2]:
            grad_b = parts[0][1]
            for p in parts[1:]:
                grad_b = grad_b + p[1]
        if need[0]:
            if grad_x is None:                                    # one chunk, or col2im's (N, C, H, W) pieces
                grad_x = parts[0][2] if len(parts) == 1 else xp.concatenate([p[2] for p in parts])
            if grad_x.ndim == 2:
                grad_x = grad_x.reshape(n, h, w, c).transpose(0, 3, 1, 2)   # channels-last strides
        return (grad_x, grad_w, grad_b)[:len(need)]


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D cross-correlation (PyTorch's conv2d) of x (N, C, H, W) with weight (O, C, kh, kw)."""
    params = dict(stride=normalize_stride(stride), padding=normalize_padding(padding))
    if bias is None:
        return Conv2d.apply(x, weight, **params)
    return Conv2d.apply(x, weight, bias, **params)
