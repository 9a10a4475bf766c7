"""Kernels of optim.Adam.step and optim.EMA.update: the same updates on one flat buffer of all parameters.

What they change against the math (optim.py, a loop over parameter tensors):
- FlatParameters lays every parameter's values and gradients end to end in two flat arrays
  (p.data and p.grad are views), so a step is a handful of array operations however many
  tensors the model has, and an MPI all-reduce is one call;
- the clipping scale s is folded into Adam's moment coefficients, (1 - b1) s g and
  (1 - b2) s^2 g^2, so no scaled copy of the gradient is made;
- the dozen elementwise passes go over CACHE_BLOCK-long pieces, so each piece is read from the
  core's cache, not memory, and the pieces run on the thread pool (elementwise: same bits).
tests/test_kernels.py holds both to the per-parameter math.
May import: backend, kernels.pool.
"""
import math

from .. import backend
from . import pool


class FlatParameters:
    """Parameters whose values and gradients live in two flat contiguous 1-D arrays.

    `data` holds every parameter's values end to end (p.data is data[lo:hi].reshape(p.shape),
    a view) and `grad` their gradients in the same layout: backward() writes a leaf's
    gradient straight into its view (Tensor.grad_into). `slices[i]` is (lo, hi) of params[i].

    Building one adopts the parameters: their data is copied in and p.data rebound to
    the view (updates are in place from then on). Use `FlatParameters.of(params)`: it
    returns the buffer the parameters already share, so an optimizer and an EMA of the
    same model work on one buffer. All parameters must share one dtype and backend.
    """

    def __init__(self, params):
        self.params = list(params)
        if not self.params:
            raise ValueError("FlatParameters got an empty parameter list")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("FlatParameters: a parameter appears twice in the list")
        kinds = sorted({(backend.xp_of(p.data).__name__, str(p.data.dtype)) for p in self.params})
        if len(kinds) > 1:
            raise ValueError(f"FlatParameters needs parameters of one dtype and backend; got "
                             f"{', '.join(f'{d} on {x}' for x, d in kinds)}: cast them (or use one optimizer per kind)")
        ref = self.params[0].data
        xp = backend.xp_of(ref)
        self.slices, lo = [], 0
        for p in self.params:
            self.slices.append((lo, lo + p.size))
            lo += p.size
        self.size = lo
        self.data = xp.empty(lo, dtype=ref.dtype)
        self.grad = xp.zeros(lo, dtype=ref.dtype)
        self._data_views = self.views(self.data)
        self._grad_views = self.views(self.grad)
        for p, view in zip(self.params, self._data_views):
            view[...] = p.data
            p.data = view
        self.adopt()

    @classmethod
    def of(cls, params):
        """The FlatParameters that `params` (same objects, same order) already share, else a new one."""
        params = list(params)
        flat = getattr(params[0], "_flat", None) if params else None
        if flat is not None and len(flat.params) == len(params) and all(a is b for a, b in zip(flat.params, params)):
            return flat.adopt()
        return cls(params)

    def views(self, flat):
        """Per-parameter views (shaped like each parameter) of a flat array laid out like `data`."""
        return [flat[lo:hi].reshape(p.shape) for p, (lo, hi) in zip(self.params, self.slices)]

    def adopt(self):
        """Make sure every p.data is its view of `data` again (copying in a rebound array); returns self.

        Costs Python attribute checks only when nothing was rebound.
        """
        for p, view, gview in zip(self.params, self._data_views, self._grad_views):
            if p.data is not view:  # rebound by the user, or adopted by another buffer since
                view[...] = p.data
                p.data = view
            p._flat, p.grad_into = self, gview
        return self

    def gather_grads(self):
        """Put every p.grad into `grad` and return the (lo, hi) runs of parameters that have one.

        backward() already wrote into the views, so usually nothing is copied; a .grad set
        by hand is copied in (and p.grad rebound to the view). Parameters without a
        gradient get zeros in `grad` and keep p.grad None. One run (0, size) when every
        parameter has a gradient: the common case, which needs no per-parameter array work.
        """
        self.adopt()
        runs, lo = [], None
        for p, gview, (start, stop) in zip(self.params, self._grad_views, self.slices):
            if p.grad is None:
                gview[...] = 0
                if lo is not None:
                    runs.append((lo, start))
                    lo = None
                continue
            if p.grad is not gview:
                gview[...] = p.grad
                p.grad = gview
            if lo is None:
                lo = start
        if lo is not None:
            runs.append((lo, self.size))
        return runs

    def grad_norm(self, runs):
        """sqrt(sum of squared gradient entries) over `runs`, as a 0-d array (no sync): one BLAS dot per run."""
        xp = backend.xp_of(self.grad)
        total = None
        for lo, hi in runs:
            g = self.grad[lo:hi]
            total = xp.vdot(g, g) if total is None else total + xp.vdot(g, g)
        return xp.sqrt(total)


CACHE_BLOCK = 1 << 16  # elements: five float32 arrays of this length (1.3 MB) stay in a core's L2 cache


def in_cache_blocks(update, *arrays):
    """update(*pieces) on consecutive CACHE_BLOCK-long pieces of matching 1-D arrays (whole on a GPU)."""
    n = len(arrays[0])
    if backend.xp_of(arrays[0]) is not backend.host or n <= CACHE_BLOCK:
        update(*arrays)
        return
    for s in range(0, n, CACHE_BLOCK):
        update(*(a[s:s + CACHE_BLOCK] for a in arrays))


def _on_pool(update, *arrays, lo=0, hi=None):
    """update(*pieces) over arrays[lo:hi] in chunks on the pool, each chunk in cache blocks (elementwise)."""
    hi = len(arrays[0]) if hi is None else hi

    def chunk(a, b):
        in_cache_blocks(update, *(pool.part(arr, lo + a, lo + b) for arr in arrays))
        return ()

    pool.split(backend.xp_of(arrays[0]), hi - lo, chunk, pool.threads_for(arrays[0][lo:hi]))


def _adam_update_(p, g, m, v, buf, *, b1, b2, c1, c2, step_size, inv_sqrt_bc2, eps, decay):
    """One Adam step on matching 1-D arrays, in place (p, m, v; `buf` is scratch), elementwise."""
    xp = backend.xp_of(p)
    xp.multiply(g, c1, out=buf)
    m *= b1
    m += buf  # m = b1 m + (1 - b1) s g
    xp.multiply(g, g, out=buf)
    buf *= c2
    v *= b2
    v += buf  # v = b2 v + (1 - b2) s^2 g^2
    if decay != 1.0:
        p *= decay  # decoupled: shrinks p, not the gradient
    xp.sqrt(v, out=buf)
    buf *= inv_sqrt_bc2
    buf += eps  # sqrt(v_hat) + eps
    xp.divide(m, buf, out=buf)
    buf *= step_size
    p -= buf  # p -= lr_t m_hat / (sqrt(v_hat) + eps)


def adam_step(flat, exp_avg, exp_avg_sq, buf, *, t, lr, b1, b2, eps, weight_decay, grad_clip, clip_scale):
    """Kernel of optim.Adam.step's update: every parameter with a gradient, from the flat buffers
    (`exp_avg`, `exp_avg_sq`, `buf` laid out like flat.data). Returns the pre-clip norm, a 0-d array."""
    runs = flat.gather_grads()
    norm = flat.grad_norm(runs)
    c1, c2 = 1.0 - b1, 1.0 - b2
    if grad_clip is not None:  # 0-d arrays, so clipping costs no sync and no copy of g
        s = clip_scale(norm, grad_clip).astype(flat.grad.dtype)
        c1, c2 = s * c1, (s * s) * c2
    update = dict(b1=b1, b2=b2, c1=c1, c2=c2, eps=eps,
                  step_size=lr / (1.0 - b1 ** t),  # Python floats: a float32 array never promotes
                  inv_sqrt_bc2=1.0 / math.sqrt(1.0 - b2 ** t), decay=1.0 - lr * weight_decay)
    for lo, hi in runs:
        _on_pool(lambda *pieces: _adam_update_(*pieces, **update),
                 flat.data, flat.grad, exp_avg, exp_avg_sq, buf, lo=lo, hi=hi)
    return norm


def _ema_update_(shadow, p, buf, rate):
    """shadow -= rate (shadow - p) on matching 1-D arrays, in place (rate = 1 - decay)."""
    backend.xp_of(shadow).subtract(shadow, p, out=buf)
    buf *= rate
    shadow -= buf


def ema_update(shadow, data, buf, rate):
    """Kernel of optim.EMA.update: shadow -= rate (shadow - data) over the flat buffers, in place."""
    _on_pool(lambda *pieces: _ema_update_(*pieces, rate), shadow, data, buf)
