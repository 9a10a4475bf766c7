"""Adam/AdamW with linear warmup and global-norm clipping, and the parameter EMA.

The paper's optimisation (Ho et al. 2020, Appendix B): Adam at lr 2e-4 (1e-4 for
the large LSUN models), linear warmup over 5000 steps, gradients clipped to global
norm 1.0, and an exponential moving average of the parameters with decay 0.9999.
Updates are in place on `param.data` and keep its dtype (float32 moments for
float32 parameters). State dicts are flat {str: array} so checkpoints can be
written with safetensors. May import: backend, tensor.
"""
import contextlib
import math

from . import backend


def _like(value, ref):
    """`value` (numpy or cupy) as an array of `ref`'s backend and dtype (a fresh copy)."""
    xp = backend.xp_of(ref)
    if xp is backend.host:
        value = backend.to_numpy(value)  # a cupy array cannot go straight into numpy
    return xp.array(value, dtype=ref.dtype, copy=True)


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


class _Scratch:
    """One flat work array per (backend, dtype), as large as the largest parameter seen.

    Views of it serve every parameter in turn: allocating a fresh full-size
    temporary per parameter and step costs page faults on the host and
    allocations on the GPU.
    """

    def __init__(self):
        self._buffers = {}

    def get(self, like):
        xp = backend.xp_of(like)
        key = (xp.__name__, like.dtype.str)
        buf = self._buffers.get(key)
        if buf is None or buf.size < like.size:
            buf = self._buffers[key] = xp.empty(like.size, dtype=like.dtype)
        return buf[:like.size].reshape(like.shape)


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
        # First and second moments, same shape, dtype and backend as each parameter.
        self.exp_avg = [backend.xp_of(p.data).zeros_like(p.data) for p in self.params]
        self.exp_avg_sq = [backend.xp_of(p.data).zeros_like(p.data) for p in self.params]
        self._scratch = _Scratch()

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

        The returned float() is a GPU sync point: the caller may log it every step,
        but on cupy it waits for the step to finish.
        """
        params = [p for p in self.params if p.grad is not None]
        norm = global_grad_norm(params)
        if norm is None:
            return 0.0
        scale = None if self.grad_clip is None else _clip_scale(norm, self.grad_clip)
        self.step_count += 1
        t = self.step_count
        lr = self.current_lr(t)
        b1, b2 = self.betas
        step_size = lr / (1.0 - b1 ** t)  # Python floats: a float32 array never promotes
        inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - b2 ** t)
        c1, c2 = 1.0 - b1, 1.0 - b2  # clipping folds into these: (1 - b1) s g and (1 - b2) s^2 g^2
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            g = p.grad
            if g is None:
                continue
            xp = backend.xp_of(p.data)
            if scale is not None:  # 0-d arrays, so clipping costs no sync and no copy of g
                s = scale.astype(g.dtype)
                c1, c2 = s * (1.0 - b1), (s * s) * (1.0 - b2)
            buf = self._scratch.get(p.data)  # reused, so a step allocates no large temporaries
            xp.multiply(g, c1, out=buf)
            m *= b1
            m += buf  # m = b1 m + (1 - b1) g
            xp.multiply(g, g, out=buf)
            buf *= c2
            v *= b2
            v += buf  # v = b2 v + (1 - b2) g^2
            if self.weight_decay > 0:
                p.data *= 1.0 - lr * self.weight_decay  # decoupled: shrinks p, not the gradient
            xp.sqrt(v, out=buf)
            buf *= inv_sqrt_bc2
            buf += self.eps  # sqrt(v_hat) + eps
            xp.divide(m, buf, out=buf)
            buf *= step_size
            p.data -= buf  # p -= lr_t m_hat / (sqrt(v_hat) + eps)
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
        for i, p in enumerate(self.params):
            self.exp_avg[i] = _like(state[f"exp_avg.{i}"], p.data)
            self.exp_avg_sq[i] = _like(state[f"exp_avg_sq.{i}"], p.data)


class EMA:
    """Exponential moving average of a module's parameters (not its buffers):
    shadow = decay * shadow + (1 - decay) * param after every update (Appendix B: decay 0.9999).

    Sample with `with ema.swapped(model): ...`; the live weights come back afterwards.
    """

    def __init__(self, module, decay=0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1]; got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {name: p.data.copy() for name, p in module.named_parameters()}
        self._scratch = _Scratch()

    def _params(self, module):
        params = dict(module.named_parameters())
        if params.keys() != self.shadow.keys():
            raise ValueError(f"EMA: the module's parameters do not match the averaged ones: "
                             f"missing {sorted(self.shadow.keys() - params.keys())}, "
                             f"unexpected {sorted(params.keys() - self.shadow.keys())}")
        return params

    def update(self, module):
        """shadow -= (1 - decay) (shadow - param), in place (the same as the formula above)."""
        rate = 1.0 - self.decay
        for name, p in self._params(module).items():
            s, buf = self.shadow[name], self._scratch.get(p.data)
            backend.xp_of(s).subtract(s, p.data, out=buf)
            buf *= rate
            s -= buf
        self.num_updates += 1

    def copy_to(self, module):
        """Overwrite the module's parameters with the averages (in place)."""
        for name, p in self._params(module).items():
            p.data[...] = self.shadow[name]

    @contextlib.contextmanager
    def swapped(self, module):
        """Put the averaged weights into `module` for the block, then restore the live ones."""
        params = self._params(module)
        live = {name: p.data.copy() for name, p in params.items()}
        self.copy_to(module)
        try:
            yield module
        finally:
            for name, p in params.items():
                p.data[...] = live[name]

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
        for name, s in self.shadow.items():
            self.shadow[name] = _like(state[f"shadow.{name}"], s)
