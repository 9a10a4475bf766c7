"""Adam/AdamW with linear warmup and global-norm clipping, and the parameter EMA.

The paper's optimisation (Ho et al. 2020, Appendix B): Adam at lr 2e-4 (1e-4 for
the large LSUN models), linear warmup over 5000 steps, gradients clipped to global
norm 1.0, and an exponential moving average of the parameters with decay 0.9999.
Updates are in place on `param.data` and keep its dtype (float32 moments for
float32 parameters). Adam and the EMA work on one flat contiguous buffer of all the
parameters (FlatParameters: p.data and p.grad are views into it), so a step is a
handful of array operations whatever the number of parameter tensors. State dicts
stay per parameter and flat {str: array} so checkpoints can be written with
safetensors. The flat updates run in chunks on the thread pool (parallel.py); they are
elementwise, so any chunking gives the same bits. May import: backend, tensor, parallel.
"""
import contextlib
import functools
import math

from . import backend, parallel


def _scalar(value, dtype="float64"):
    """A Python number as a 0-d host array, the form a safetensors file can hold."""
    return backend.host.asarray(value, dtype=dtype)


def _number(a):
    """A one-element array as a Python number (safetensors stores a 0-d array as shape (1,))."""
    return backend.to_numpy(a).reshape(()).item()


def global_grad_norm(params):
    """sqrt(sum of squared gradient entries over all params), as a 0-d array (no sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    xp = backend.xp_of(grads[0])
    total = sum(xp.vdot(g.ravel(), g.ravel()) for g in grads)  # one BLAS dot per parameter
    return xp.sqrt(xp.asarray(total))


def _clip_scale(norm, max_norm):
    """max_norm / max(norm, max_norm) as a 0-d array, as tf.clip_by_global_norm computes it.

    An array, not a float, so clipping never waits for the GPU; below max_norm it is
    exactly 1. Gradients are scaled out of place: backward() may hand one array to
    two leaves, so an in-place scale could hit it twice.
    """
    xp = backend.xp_of(norm)
    return max_norm / xp.maximum(norm, max_norm)


def clip_grad_norm_(params, max_norm):
    """Rescale the gradients of `params` to global norm at most `max_norm` (each p.grad becomes a scaled copy).

    Returns the norm before clipping as a Python float; float() is a GPU sync point.
    """
    params = list(params)
    if max_norm <= 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be positive; got {max_norm}")
    norm = global_grad_norm(params)
    if norm is None:
        return 0.0
    scale = _clip_scale(norm, float(max_norm))
    for p in params:
        if p.grad is not None:
            p.grad = p.grad * scale.astype(p.grad.dtype)
    return float(norm)  # GPU sync


class FlatParameters:
    """Parameters whose values and gradients live in two flat contiguous 1-D arrays.

    `data` holds every parameter's values end to end (p.data is data[lo:hi].reshape(p.shape),
    a view) and `grad` their gradients in the same layout: backward() writes a leaf's
    gradient straight into its view (Tensor.grad_into), so Adam, the EMA, gradient
    clipping and an all-reduce each touch one array with a handful of operations,
    however many parameter tensors the model has. `slices[i]` is (lo, hi) of params[i].

    Building one adopts the parameters: their data is copied in and p.data rebound to
    the view (updates are in place from then on). Use `FlatParameters.of(params)`: it
    returns the buffer the parameters already share, so an optimizer and an EMA of the
    same model work on one buffer. (Two buffers over overlapping parameter lists stay
    correct, adopt() copies the values across, but each switch costs a copy per parameter.)
    All parameters must share one dtype and backend.
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

    def grad_norm(self, runs=None):
        """sqrt(sum of squared gradient entries) over `runs` (default: all), as a 0-d array (no sync)."""
        runs = [(0, self.size)] if runs is None else runs
        if not runs:
            return None
        xp = backend.xp_of(self.grad)
        total = None
        for lo, hi in runs:  # one BLAS dot per run: one in all when every parameter has a gradient
            g = self.grad[lo:hi]
            total = xp.vdot(g, g) if total is None else total + xp.vdot(g, g)
        return xp.sqrt(total)

    def clip_grad_norm_(self, max_norm):
        """Scale `grad` in place to global norm at most `max_norm`; returns the pre-clip norm (a float: a sync)."""
        if max_norm <= 0:
            raise ValueError(f"clip_grad_norm_: max_norm must be positive; got {max_norm}")
        runs = self.gather_grads()
        norm = self.grad_norm(runs)
        if norm is None:
            return 0.0
        self.grad *= _clip_scale(norm, float(max_norm)).astype(self.grad.dtype)
        return float(norm)  # GPU sync


CACHE_BLOCK = 1 << 16  # elements: five float32 arrays of this length (1.3 MB) stay in a core's L2 cache


def in_cache_blocks(update, *arrays):
    """update(*pieces) on consecutive CACHE_BLOCK-long pieces of matching 1-D arrays (whole on a GPU).

    Adam's dozen elementwise passes then read each piece from cache, not memory: on the 35.7M
    parameters of the CIFAR-10 model each pass over the flat buffers is 143 MB of memory traffic.
    """
    n = len(arrays[0])
    if backend.xp_of(arrays[0]) is not backend.host or n <= CACHE_BLOCK:
        update(*arrays)
        return
    for s in range(0, n, CACHE_BLOCK):
        update(*(a[s:s + CACHE_BLOCK] for a in arrays))


def adam_update_(p, g, m, v, buf, *, b1, b2, c1, c2, step_size, inv_sqrt_bc2, eps, decay):
    """One Adam step on matching 1-D arrays, in place (p, m, v; `buf` is scratch).

    Elementwise only, so any slicing of the flat buffers into chunks gives the same bits.
    c1 = (1 - b1) s and c2 = (1 - b2) s^2 fold a clipping scale s in; `decay` is
    1 - lr_t weight_decay (1.0: none); step_size = lr_t / (1 - b1^t).
    """
    xp = backend.xp_of(p)
    xp.multiply(g, c1, out=buf)
    m *= b1
    m += buf  # m = b1 m + (1 - b1) g
    xp.multiply(g, g, out=buf)
    buf *= c2
    v *= b2
    v += buf  # v = b2 v + (1 - b2) g^2
    if decay != 1.0:
        p *= decay  # decoupled: shrinks p, not the gradient
    xp.sqrt(v, out=buf)
    buf *= inv_sqrt_bc2
    buf += eps  # sqrt(v_hat) + eps
    xp.divide(m, buf, out=buf)
    buf *= step_size
    p -= buf  # p -= lr_t m_hat / (sqrt(v_hat) + eps)


def ema_update_(shadow, p, buf, rate):
    """shadow -= rate (shadow - p) on matching 1-D arrays, in place (rate = 1 - decay)."""
    backend.xp_of(shadow).subtract(shadow, p, out=buf)
    buf *= rate
    shadow -= buf


def _assign(view, value):
    """Copy `value` (numpy or cupy) into `view` in place, across backends."""
    xp = backend.xp_of(view)
    view[...] = backend.to_numpy(value) if xp is backend.host else xp.asarray(value)


class Adam:
    """Adam (Kingma & Ba 2015) with PyTorch's update form, optional decoupled weight decay
    (AdamW, Loshchilov & Hutter 2019), linear warmup and global-norm clipping.

    One step with gradient g at step count t (from 1):
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
        lr_t = lr * min(1, t / warmup_steps)
        p -= lr_t * weight_decay * p                      (only when weight_decay > 0)
        p -= lr_t / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 warmup_steps=0, grad_clip=None):
        self.params = list(params)
        if not self.params:
            raise ValueError("Adam got an empty parameter list")
        if lr < 0 or eps < 0 or weight_decay < 0 or warmup_steps < 0:
            raise ValueError(f"Adam: lr, eps, weight_decay and warmup_steps must be >= 0; "
                             f"got lr={lr}, eps={eps}, weight_decay={weight_decay}, warmup_steps={warmup_steps}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adam: betas must lie in [0, 1); got {betas}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"Adam: grad_clip must be positive or None; got {grad_clip}")
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.weight_decay, self.warmup_steps = float(weight_decay), int(warmup_steps)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.step_count = 0
        # Parameters, gradients and both moments as flat buffers; exp_avg[i] etc. are per-parameter views.
        self.flat = FlatParameters.of(self.params)
        xp = backend.xp_of(self.flat.data)
        self.flat_exp_avg = xp.zeros_like(self.flat.data)
        self.flat_exp_avg_sq = xp.zeros_like(self.flat.data)
        self.exp_avg = self.flat.views(self.flat_exp_avg)
        self.exp_avg_sq = self.flat.views(self.flat_exp_avg_sq)
        self._buf = xp.empty_like(self.flat.data)  # scratch: a step allocates no large temporaries

    def zero_grad(self):
        """Forget the gradients; backward() accumulates into .grad otherwise."""
        for p in self.params:
            p.grad = None

    def current_lr(self, step=None):
        """The warmed-up learning rate of step `step` (counted from 1; default: the next step)."""
        step = self.step_count + 1 if step is None else step
        if self.warmup_steps > 0:
            return self.lr * min(1.0, step / self.warmup_steps)
        return self.lr

    def step(self):
        """Clip, warm up, update every parameter in place; returns the pre-clip gradient norm.

        All parameters are updated by one adam_update_ on the flat buffers (one per run of
        parameters with gradients, when some have none: those are skipped, as in PyTorch).
        The returned float() is a GPU sync point: the caller may log it every step, but on
        cupy it waits for the step to finish.
        """
        flat = self.flat
        runs = flat.gather_grads()
        norm = flat.grad_norm(runs)
        if norm is None:
            return 0.0
        self.step_count += 1
        t = self.step_count
        lr = self.current_lr(t)
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1, 1.0 - b2  # clipping folds into these: (1 - b1) s g and (1 - b2) s^2 g^2
        if self.grad_clip is not None:  # 0-d arrays, so clipping costs no sync and no copy of g
            s = _clip_scale(norm, self.grad_clip).astype(flat.grad.dtype)
            c1, c2 = s * c1, (s * s) * c2
        coefficients = dict(b1=b1, b2=b2, c1=c1, c2=c2, eps=self.eps,
                            step_size=lr / (1.0 - b1 ** t),  # Python floats: a float32 array never promotes
                            inv_sqrt_bc2=1.0 / math.sqrt(1.0 - b2 ** t),
                            decay=1.0 - lr * self.weight_decay)
        for lo, hi in runs:
            def chunk(a, b):  # noqa: B023 (called before the loop moves on)
                a, b = lo + a, lo + b
                in_cache_blocks(functools.partial(adam_update_, **coefficients),
                                *(parallel.part(arr, a, b) for arr in (flat.data, flat.grad, self.flat_exp_avg,
                                                                        self.flat_exp_avg_sq, self._buf)))
            parallel.parallel_for(hi - lo, chunk, parallel.threads_for(flat.data[lo:hi]))
        return float(norm)  # GPU sync

    def state_dict(self):
        """Flat {str: array}: 0-d host arrays for the step and hyperparameters, copies of the moments."""
        state = {
            "step": _scalar(self.step_count, "int64"),
            "lr": _scalar(self.lr), "beta1": _scalar(self.betas[0]), "beta2": _scalar(self.betas[1]),
            "eps": _scalar(self.eps), "weight_decay": _scalar(self.weight_decay),
            "warmup_steps": _scalar(self.warmup_steps, "int64"),
            "grad_clip": _scalar(math.nan if self.grad_clip is None else self.grad_clip),  # NaN: no clipping
        }
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
            state[f"exp_avg.{i}"] = m.copy()
            state[f"exp_avg_sq.{i}"] = v.copy()
        return state

    def load_state_dict(self, state):
        """Restore a state_dict() (from this or an identically shaped parameter list)."""
        expected = {f"{kind}.{i}": p.shape for i, p in enumerate(self.params) for kind in ("exp_avg", "exp_avg_sq")}
        scalars = ("step", "lr", "beta1", "beta2", "eps", "weight_decay", "warmup_steps", "grad_clip")
        missing = [k for k in list(scalars) + list(expected) if k not in state]
        unexpected = [k for k in state if k not in expected and k not in scalars]
        wrong = [f"{k}: {tuple(state[k].shape)} != {expected[k]}" for k in expected
                 if k in state and tuple(state[k].shape) != expected[k]]
        if missing or unexpected or wrong:
            raise ValueError(f"Adam.load_state_dict: missing keys {missing}, unexpected keys {unexpected}, "
                             f"shape mismatches {wrong}")
        value = {k: _number(state[k]) for k in scalars}
        self.step_count = int(value["step"])
        self.lr, self.eps = float(value["lr"]), float(value["eps"])
        self.betas = (float(value["beta1"]), float(value["beta2"]))
        self.weight_decay, self.warmup_steps = float(value["weight_decay"]), int(value["warmup_steps"])
        self.grad_clip = None if math.isnan(value["grad_clip"]) else float(value["grad_clip"])
        for i in range(len(self.params)):  # in place: the views stay views of the flat moments
            _assign(self.exp_avg[i], state[f"exp_avg.{i}"])
            _assign(self.exp_avg_sq[i], state[f"exp_avg_sq.{i}"])


class EMA:
    """Exponential moving average of a module's parameters (not its buffers):
    shadow = decay * shadow + (1 - decay) * param after every update (Appendix B: decay 0.9999).

    The averages are one flat array laid out like the parameters' FlatParameters
    (shared with an Adam over the same model), so an update is three array operations;
    `shadow[name]` are per-parameter views of it.
    Sample with `with ema.swapped(model): ...`; the live weights come back afterwards.
    """

    def __init__(self, module, decay=0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1]; got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        named = list(module.named_parameters())
        self.names = [name for name, _ in named]
        flat = FlatParameters.of([p for _, p in named])
        self.flat_shadow = flat.data.copy()
        self.shadow = dict(zip(self.names, flat.views(self.flat_shadow)))
        self._buf = backend.xp_of(flat.data).empty_like(flat.data)

    def _flat(self, module):
        """The FlatParameters of `module`, after checking its parameters are the averaged ones."""
        named = list(module.named_parameters())
        if [name for name, _ in named] != self.names:
            names = {name for name, _ in named}
            raise ValueError(f"EMA: the module's parameters do not match the averaged ones: "
                             f"missing {sorted(set(self.names) - names)}, "
                             f"unexpected {sorted(names - set(self.names))}")
        return FlatParameters.of([p for _, p in named])

    def update(self, module):
        """shadow -= (1 - decay) (shadow - param), in place (the same as the formula above)."""
        shadow, p, buf = self.flat_shadow, self._flat(module).data, self._buf
        update = functools.partial(ema_update_, rate=1.0 - self.decay)
        parallel.parallel_for(len(shadow), lambda a, b: in_cache_blocks(update, *(parallel.part(arr, a, b) for arr in (shadow, p, buf))),
                              parallel.threads_for(shadow))
        self.num_updates += 1

    def copy_to(self, module):
        """Overwrite the module's parameters with the averages (in place)."""
        self._flat(module).data[...] = self.flat_shadow

    @contextlib.contextmanager
    def swapped(self, module):
        """Put the averaged weights into `module` for the block, then restore the live ones."""
        flat = self._flat(module)
        live = flat.data.copy()
        flat.data[...] = self.flat_shadow
        try:
            yield module
        finally:
            flat.adopt().data[...] = live

    def state_dict(self):
        """Flat {str: array}: "decay", "num_updates" (0-d) and "shadow.<param name>" copies."""
        state = {"decay": _scalar(self.decay), "num_updates": _scalar(self.num_updates, "int64")}
        state.update({f"shadow.{name}": s.copy() for name, s in self.shadow.items()})
        return state

    def load_state_dict(self, state):
        expected = {f"shadow.{name}": s.shape for name, s in self.shadow.items()}
        missing = [k for k in ["decay", "num_updates", *expected] if k not in state]
        unexpected = [k for k in state if k not in expected and k not in ("decay", "num_updates")]
        wrong = [f"{k}: {tuple(state[k].shape)} != {expected[k]}" for k in expected
                 if k in state and tuple(state[k].shape) != expected[k]]
        if missing or unexpected or wrong:
            raise ValueError(f"EMA.load_state_dict: missing keys {missing}, unexpected keys {unexpected}, "
                             f"shape mismatches {wrong}")
        self.decay, self.num_updates = float(_number(state["decay"])), int(_number(state["num_updates"]))
        for name, s in self.shadow.items():  # in place: the views stay views of the flat averages
            _assign(s, state[f"shadow.{name}"])
