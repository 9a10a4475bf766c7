"""Kernel of conv.Conv2d: the same convolution and gradients, arranged for the CPU's caches and cores.

What it changes against the math op (conv.py), none of which changes what is computed:
- Channels-last inside: the padded input is written once as (N, Hp, Wp, C), its windows are
  read through a strided view and copied as the GEMM operand (N*Ho*Wo, kh*kw*C); the output
  (N*Ho*Wo, O) is returned as an (N, O, Ho, Wo) view with channels-last strides (no transpose copy).
- Forward saves x, not the kh*kw times larger column matrix; backward rebuilds the columns.
- The stride-1 input gradient is the same im2col + GEMM on the gradient with the flipped kernel
  (a transposed convolution), which moves kh*kw times less data than GEMM + col2im.
- Winograd F(2x2, 3x3) (Lavin & Gray 2016) for large stride-1 3x3 convolutions: forward, input
  gradient and weight gradient with 2.25x fewer multiplications.
- Batch chunks on the thread pool (pool.split), and inside a chunk blocks of images whose
  scratch matrices (reused per thread) stay in the core's cache for the GEMM that reads them.
tests/test_kernels_conv.py holds it to conv.Conv2d and to float64 nested loops.
May import: backend, tensor, kernels.pool, kernels.tuning, kernels.dense.
"""
import threading

from .. import backend
from ..tensor import Function
from . import pool, tuning
from .dense import column_sums


def output_size(h, w, kh, kw, stride, pads):
    """(Ho, Wo) of a convolution (floor division, as PyTorch)."""
    (sh, sw), (pt, pb, pl, pr) = stride, pads
    return (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1


def pad_nhwc(x, pads):
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


_workspace = {}  # (module name, dtype, thread, slot) -> one flat buffer reused for every scratch matrix


def scratch(xp, shape, dtype, slot="cols"):
    """A reusable numpy buffer of `shape` for an im2col matrix (or a Winograd operand, per `slot`),
    which never outlives one forward/backward.

    A fresh 10-100 MB array costs page faults on every call; cupy's memory pool already reuses
    memory, so there it allocates.
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


def im2col_nhwc(xpad, kh, kw, stride):
    """Padded xpad (N, Hp, Wp, C) -> (N*Ho*Wo, kh*kw*C) in the scratch workspace (use it before the next
    call), columns ordered (i, j, c). A 1x1 stride-1 kernel needs no copy when xpad is contiguous."""
    n, hp, wp, c = xpad.shape
    if kh == kw == 1 and stride == (1, 1):
        return xpad.reshape(-1, c)
    win = windows(xpad, kh, kw, stride)
    cols = scratch(backend.xp_of(xpad), win.shape, xpad.dtype)
    cols[...] = win                                              # the one im2col copy
    return cols.reshape(-1, kh * kw * c)


# The largest scratch matrix (im2col columns, Winograd's V and M) one block of images may take: a chunk's
# images go through in blocks of this size, so the copy is still in the core's L2 cache when the GEMM reads
# it, and scratch memory stays at this size per thread whatever the batch. Chosen by measurement
# (BENCHMARKS.md, "Speed work, second round").
BLOCK_BYTES = 2 << 20


# The block sizes tuning (kernels/tuning.py) tries: L2 caches run from 512 KiB (AMD EPYC) to 2 MiB (Xeon) per core.
BLOCK_CHOICES = (1 << 19, 2 << 20, 8 << 20)


tuning.on_settled.append(_workspace.clear)   # the scratch of a tried larger block is not kept once tuning ends


def image_blocks(n, bytes_per_image, xp, block=None):
    """Split images 0..n-1 into nearly equal (start, stop) blocks of about `block` (default BLOCK_BYTES) bytes of
    scratch each (between 2/3 and 3/2 of it, at least one image per block; no small tail block); one block on a
    GPU, where CuPy's memory pool reuses memory and every launch costs."""
    if xp is not backend.host or n <= 1:
        return [(0, n)]
    return pool.chunks(n, max(1, round(n * bytes_per_image / (block or BLOCK_BYTES))))


def block_choices(n, bytes_per_image):
    """The BLOCK_CHOICES that split n images differently from each other (the first of each kind): the ones
    worth timing."""
    seen, out = set(), []
    for block in sorted(BLOCK_CHOICES, key=lambda b: b != BLOCK_BYTES):   # the fixed rule's size first
        count = max(1, round(n * bytes_per_image / block))
        if count not in seen:
            seen.add(count)
            out.append(block)
    return tuple(out)


def correlate_im2col(xpad, w2, kh, kw, stride, rows, out, block=None):
    """out (n*Ho*Wo, O) = im2col(xpad) @ w2.T, a block of images at a time (out None: allocated)."""
    xp = backend.xp_of(xpad)
    n = xpad.shape[0]
    blocks = image_blocks(n, rows * w2.shape[1] * xpad.itemsize, xp, block) if kh * kw > 1 else [(0, n)]
    if out is None and len(blocks) > 1:
        out = xp.empty((n * rows, w2.shape[0]), dtype=xp.result_type(xpad, w2))
    for p, q in blocks:                               # a few images at a time: the columns stay in cache
        cols = im2col_nhwc(pool.part(xpad, p, q), kh, kw, stride)          # (n*Ho*Wo, kh*kw*C)
        r = xp.matmul(cols, w2.T, out=pool.part(out, p * rows, q * rows))  # (n*Ho*Wo, O): the GEMM
    return r if out is None else out


# ---------------------------------------------------------------- Winograd F(2x2, 3x3)

# Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks", Sec. 4.1: a 2x2 output tile
# Y = A^T [(G g G^T) * (B^T d B)] A of a 4x4 input tile d and 3x3 kernel g. The elementwise product over
# the 16 tile positions becomes 16 GEMMs (tiles x C) @ (C x O): 16 multiplies per 4 outputs where
# im2col's one GEMM does 36, 2.25x fewer. The transforms are additions on whole strided slices.
WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))   # kernel transform G
USE_WINOGRAD = True  # stride-1 3x3 convolutions on numpy take Winograd (False: im2col + GEMM only)
# Where it pays (BENCHMARKS.md, "Speed work, first round"): the transforms are memory-bound passes, so
# below 64 channels in and out or 16x16 outputs the plain GEMM is as fast or faster.
WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_PIXELS = 64, 256


def winograd_weights(w):
    """U = G g G^T for every (o, c) of a 3x3 kernel w (O, C, 3, 3) -> (16, C, O), the 16 GEMMs' right operands."""
    xp = backend.xp_of(w)
    g = xp.asarray(WINOGRAD_G, dtype=w.dtype)
    o, c = w.shape[:2]
    kron = (g[:, None, :, None] * g[None, :, None, :]).reshape(16, 9)   # G (x) G: U[ab] = sum_ij G[a,i] G[b,j] g[ij]
    u = w.reshape(o * c, 9) @ kron.T                                 # (O*C, 16): one GEMM for every (o, c)
    return xp.ascontiguousarray(u.reshape(o, c, 16).transpose(2, 1, 0))


def winograd_input(xpad):
    """V = B^T d B for every 4x4 tile (stride 2) of xpad (n, 2*th+2, 2*tw+2, C) -> (4, 4, n, th, tw, C),
    the 16 tile positions' left GEMM operands (a scratch buffer: use it before the next call)."""
    xp = backend.xp_of(xpad)
    n, hp, wp, c = xpad.shape
    th, tw = (hp - 2) // 2, (wp - 2) // 2
    # B^T d: the 4 row combinations of every tile, over whole rows (n, th, Wp, C)
    r = scratch(xp, (4, n, th, wp, c), xpad.dtype, "wino_rows")
    d0, d1, d2, d3 = (xpad[:, k:k + 2 * th:2] for k in range(4))   # tile rows k = 0..3
    xp.subtract(d0, d2, out=r[0])
    xp.add(d1, d2, out=r[1])
    xp.subtract(d2, d1, out=r[2])
    xp.subtract(d1, d3, out=r[3])
    # (B^T d) B: the same on the columns -> V (4, 4, n, th, tw, C) = (16 tile positions, tiles, C)
    v = scratch(xp, (4, 4, n, th, tw, c), xpad.dtype, "wino_v")
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
    v = winograd_input(xpad)
    m = scratch(xp, (16, n * th * tw, o), out.dtype, "wino_m")
    xp.matmul(v.reshape(16, -1, c), u, out=m)                         # the 16 GEMMs
    # A^T M: rows (m0 + m1 + m2, m1 - m2 - m3) of every tile column, then the same on columns into Y
    m = m.reshape(4, 4, n, th, tw, o)
    t = scratch(xp, (2, 4, n, th, tw, o), out.dtype, "wino_t")
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


def winograd_correlate(x_nhwc, u, pads, out, block=None):
    """Stride-1 3x3 correlation of x (n, H, W, C) padded by `pads`, into out (n*Ho*Wo, O) (None: allocated), any
    Ho, Wo, a block of images at a time: odd sizes get one more zero row/column, whose output is dropped."""
    xp = backend.xp_of(x_nhwc)
    n, h, w, c = x_nhwc.shape
    pt, pb, pl, pr = pads
    ho, wo = h + pt + pb - 2, w + pl + pr - 2
    he, we, o = ho + ho % 2, wo + wo % 2, u.shape[2]
    if out is None:
        out = xp.empty((n * ho * wo, o), dtype=xp.result_type(x_nhwc, u))
    xpads = pad_nhwc(x_nhwc, (pt, pb + ho % 2, pl, pr + wo % 2))
    for p, q in image_blocks(n, 4 * he * we * max(c, o) * out.itemsize, xp, block):   # V and M: 4x an image's in/out
        xpad = pool.part(xpads, p, q)
        rows = pool.part(out, p * ho * wo, q * ho * wo)
        if ho % 2 == 0 and wo % 2 == 0:
            _winograd_conv(xpad, u, rows)
            continue
        full = xp.empty(((q - p) * he * we, o), dtype=out.dtype)
        _winograd_conv(xpad, u, full)
        rows.reshape(q - p, ho, wo, o)[...] = full.reshape(q - p, he, we, o)[:, :ho, :wo]
    return out


def winograd_tile_grads(x_nhwc, g_nhwo, pads, block=None):
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
    xpads = pad_nhwc(x_nhwc, (pt, pb + ho % 2, pl, pr + wo % 2))
    for p, q in image_blocks(n, 16 * th * tw * max(c, o) * g_nhwo.itemsize, xp, block):
        xpad = pool.part(xpads, p, q)
        g = pool.part(g_nhwo, p, q)
        if ho % 2 or wo % 2:
            g = xp.zeros((q - p, 2 * th, 2 * tw, o), dtype=g_nhwo.dtype)
            g[:, :ho, :wo] = g_nhwo[p:q]
        v = winograd_input(xpad)                                    # (4, 4, n, th, tw, C)
        y = g.reshape(q - p, th, 2, tw, 2, o)                       # dY of output pixel (2a + p, 2b + q)
        # A dY: rows (dY0, dY0 + dY1, dY0 - dY1, dY1) of every tile, then the same on columns into dM
        s = scratch(xp, (2, q - p, th, tw, 2, o), g.dtype, "wino_g")
        xp.add(y[:, :, 0], y[:, :, 1], out=s[0])
        xp.subtract(y[:, :, 0], y[:, :, 1], out=s[1])
        dm = scratch(xp, (4, 4, q - p, th, tw, o), g.dtype, "wino_m")
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
    winograd_weights (with the sign of A's last row that winograd_tile_grads left out)."""
    xp = backend.xp_of(du)
    g = xp.asarray(WINOGRAD_G, dtype=du.dtype)
    sign = xp.asarray((1.0, 1.0, 1.0, -1.0), dtype=du.dtype)
    kron = (g[:, None, :, None] * g[None, :, None, :]).reshape(16, 9)
    kron *= (sign[:, None] * sign[None, :]).reshape(16, 1)
    _, c, o = du.shape
    dw = du.reshape(16, c * o).T @ kron                               # (C*O, 9): one GEMM for every (c, o)
    return xp.ascontiguousarray(dw.reshape(c, o, 3, 3).transpose(1, 0, 2, 3))


def use_winograd(x, weight, stride, pixels):
    """Whether a stride-1 3x3 correlation of x with a weight (O, C, 3, 3) into `pixels` outputs per image pays."""
    o, c, kh, kw = weight.shape
    return (USE_WINOGRAD and kh == kw == 3 and stride == (1, 1) and backend.xp_of(x) is backend.host
            and min(o, c) >= WINOGRAD_MIN_CHANNELS and pixels >= WINOGRAD_MIN_PIXELS)


# ---------------------------------------------------------------- the kernel


def winograd_possible(x, weight, stride):
    """Whether Winograd F(2x2, 3x3) can compute this correlation at all (a 3x3 stride-1 kernel on numpy)."""
    kh, kw = weight.shape[2:]
    return kh == kw == 3 and stride == (1, 1) and backend.xp_of(x) is backend.host


def _thread_choices(x, n, default):
    """One thread or the whole pool, where both are possible (numpy, more than one image and core)."""
    every = pool.get_num_threads()
    if backend.xp_of(x) is not backend.host or n < 2 or every < 2:
        return (default,)
    return (default, 1 if default > 1 else every)


def shape_key(direction, x_shape, weight, stride, padding, dtype, need=None):
    """The tuning cache's key of one convolution call: what its algorithm choice can depend on."""
    key = (f"conv2d.{direction} x={'x'.join(map(str, x_shape))} w={'x'.join(map(str, weight.shape))} "
           f"stride={stride[0]}x{stride[1]} pad={'/'.join(map(str, padding))} {backend.host.dtype(dtype).name}")
    return key if need is None else key + " grads=" + "".join("xwb"[i] for i in range(3) if need[i])


class Conv2d(Function):
    """Kernel of conv.Conv2d: out = conv(x, weight) + bias, x (N, C, H, W), weight (O, C, kh, kw) -> (N, O, Ho, Wo).

    Each direction runs one tuning.Plan: the fixed rules' (tuning off) or the fastest measured one for its shape.
    """

    @staticmethod
    def forward(ctx, x, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0)):
        n = x.shape[0]
        o, c, kh, kw = weight.shape
        ho, wo = output_size(x.shape[2], x.shape[3], kh, kw, stride, padding)
        xp = backend.xp_of(x)
        tuning.check()
        # first: the pool's first use sets BLAS to one thread, which the Winograd transform's GEMM then runs on
        threads = pool.threads_for(x, macs=n * ho * wo * o * c * kh * kw)
        w2 = weight.transpose(0, 2, 3, 1).reshape(o, -1)          # (O, kh*kw*C), columns ordered (i, j, c)
        dtype = xp.result_type(x, weight)
        u = {}                                                    # Winograd's U, made once if a plan needs it

        def run(plan):
            if plan.algo == "winograd" and not u:
                u["u"] = winograd_weights(weight)

            def chunk(a, b, out):                                 # images a..b-1 -> their (rows, O) outputs
                x_nhwc = pool.part(x, a, b).transpose(0, 2, 3, 1)
                if plan.algo == "winograd":                       # Winograd: the same result, 2.25x fewer FLOPs
                    out = winograd_correlate(x_nhwc, u["u"], padding, out, plan.block)
                else:
                    out = correlate_im2col(pad_nhwc(x_nhwc, padding), w2, kh, kw, stride, ho * wo, out, plan.block)
                if bias is not None:
                    out += bias
                return out

            return pool.split(xp, n, chunk, plan.threads, rows=[((n * ho * wo, o), dtype)])

        default = tuning.Plan(algo="winograd" if use_winograd(x, weight, stride, ho * wo) else "im2col",
                              block=BLOCK_BYTES, threads=threads)
        options = [("algo", ("im2col", "winograd") if winograd_possible(x, weight, stride) else ()),
                   ("threads", _thread_choices(x, n, threads)),
                   ("block", block_choices(n, ho * wo * kh * kw * c * x.itemsize) if kh * kw > 1 else ())]
        # training and sampling (no gradient) calls are tuned apart: the ops around them, and so the caches, differ
        direction = "forward" if any(ctx.needs_input_grad) else "inference"
        out = tuning.run(shape_key(direction, x.shape, weight, stride, padding, dtype), default, options, run)
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
        need = tuple(ctx.needs_input_grad) + (False,) * (3 - len(ctx.needs_input_grad))
        g4 = grad.transpose(0, 2, 3, 1)                           # (N, Ho, Wo, O)
        ho, wo = g4.shape[1:3]
        pt, pb, pl, pr = padding
        full = (kh - 1 - pt, kh - 1 - pb, kw - 1 - pl, kw - 1 - pr)   # the transposed conv's padding
        threads = pool.threads_for(grad, macs=grad.size * c * kh * kw)
        plain_1x1 = kh == kw == 1 and stride == (1, 1) and not any(padding)
        transposed = stride == (1, 1) and min(full) >= 0 and not plain_1x1
        flipped = {}                                              # the transposed conv's kernel, as a GEMM or Winograd's U

        def run(plan):
            wino_x = need[0] and transposed and plan.algo == "winograd"
            wino_w = need[1] and plan.wgrad == "winograd"         # dL/dW in the Winograd domain
            if wino_x and "u" not in flipped:
                flipped["u"] = winograd_weights(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))   # (16, O, C)
            elif need[0] and transposed and not wino_x and "w" not in flipped:
                flipped["w"] = weight[:, :, ::-1, ::-1].transpose(1, 2, 3, 0).reshape(c, -1)     # (C, kh*kw*O)

            def chunk(a, b, gx):                                  # images a..b-1 -> (dx rows, dW part, db part)
                g2 = xp.ascontiguousarray(pool.part(g4, a, b).reshape(-1, o))   # (n*Ho*Wo, O); no copy if channels-last
                gw = gb = None
                if wino_w:                                        # dL/dU', 16 GEMMs, no im2col copy
                    gw = winograd_tile_grads(pool.part(x, a, b).transpose(0, 2, 3, 1), g2.reshape(b - a, ho, wo, o),
                                             padding, plan.block)
                elif need[1]:
                    rows = ho * wo
                    blocks = (image_blocks(b - a, rows * kh * kw * c * x.itemsize, xp, plan.block) if kh * kw > 1
                              else [(0, b - a)])
                    xpad = pad_nhwc(pool.part(x, a, b).transpose(0, 2, 3, 1), padding)
                    for p, q in blocks:                           # dL/dW sums the blocks' products
                        cols = im2col_nhwc(pool.part(xpad, p, q), kh, kw, stride)
                        prod = cols.T @ pool.part(g2, p * rows, q * rows)   # dL/dW = cols^T dL/dout, (kh*kw*C, O)
                        gw = prod if gw is None else xp.add(gw, prod, out=gw)
                if need[2]:
                    gb = column_sums(g2)                          # dL/db = sum of dL/dout over N, Ho, Wo
                if need[0]:
                    g_img = g2.reshape(b - a, ho, wo, o)
                    if plain_1x1:
                        gx = xp.matmul(g2, weight.reshape(o, c), out=gx)          # dL/dx = dL/dout W, a plain GEMM
                    elif wino_x:
                        gx = winograd_correlate(g_img, flipped["u"], full, gx, plan.block)
                    elif transposed:                              # dL/dout (padded by k-1-p) * flipped kernel
                        gx = correlate_im2col(pad_nhwc(g_img, full), flipped["w"], kh, kw, (1, 1), h * w, gx, plan.block)
                    else:                                         # dL/dx = col2im(dL/dout W): scatter the windows
                        gx = col2im_nhwc(g2 @ weight.transpose(0, 2, 3, 1).reshape(o, -1), (b - a, h, w, c),
                                         kh, kw, stride, padding).reshape(-1, c)
                return gx, gw, gb

            gx_spec = ((n * h * w, c), grad.dtype) if need[0] else None
            grad_x, grad_w, grad_b = pool.split(xp, n, chunk, plan.threads, rows=[gx_spec], sums=2)
            if need[1]:
                grad_w = (winograd_kernel_grad(grad_w) if wino_w    # dL/dw = G^T dL/dU G, OIHW
                          else xp.ascontiguousarray(grad_w.reshape(kh, kw, c, o).transpose(3, 2, 0, 1)))
            if need[0]:
                grad_x = grad_x.reshape(n, h, w, c).transpose(0, 3, 1, 2)   # channels-last strides
            return grad_x, grad_w, grad_b

        wino = winograd_possible(grad, weight, stride)
        default = tuning.Plan(algo="winograd" if need[0] and transposed and use_winograd(grad, weight, stride, h * w)
                              else "im2col",
                              wgrad="winograd" if need[1] and use_winograd(grad, weight, stride, ho * wo) else "im2col",
                              block=BLOCK_BYTES, threads=threads)
        options = [("algo", ("im2col", "winograd") if wino and need[0] and transposed else ()),
                   ("wgrad", ("im2col", "winograd") if wino and need[1] else ()),
                   ("threads", _thread_choices(grad, n, threads)),
                   ("block", block_choices(n, ho * wo * kh * kw * max(c, o) * grad.itemsize) if kh * kw > 1 else ())]
        key = shape_key("backward", x_shape, weight, stride, padding, grad.dtype, need)
        return tuning.run(key, default, options, run)[:len(ctx.needs_input_grad)]


def col2im_nhwc(cols, x_shape, kh, kw, stride, pads):
    """The adjoint of the channels-last im2col: cols (n*Ho*Wo, kh*kw*C) -> (n, H, W, C), summing overlapping
    windows; one strided `+=` per kernel offset, without repeated indices (exact on numpy and cupy)."""
    (sh, sw), (pt, pb, pl, pr) = stride, pads
    n, h, w, c = x_shape
    ho, wo = output_size(h, w, kh, kw, stride, pads)
    xp = backend.xp_of(cols)
    cols = cols.reshape(n, ho, wo, kh, kw, c)
    gpad = xp.zeros((n, h + pt + pb, w + pl + pr, c), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            gpad[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += cols[:, :, :, i, j]
    return xp.ascontiguousarray(gpad[:, pt:pt + h, pl:pl + w])
