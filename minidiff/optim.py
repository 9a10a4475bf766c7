"""Adam/AdamW with linear warmup and global-norm clipping, and the parameter EMA.

The paper's optimisation (Ho et al. 2020, Appendix B): Adam at lr 2e-4 (1e-4 for
the large LSUN models), linear warmup over 5000 steps, gradients clipped to global
norm 1.0, and an exponential moving average of the parameters with decay 0.9999.
Here each update is its plain math, a loop over the parameter tensors, in place on
`param.data` (float32 moments for float32 parameters). Their kernels (`kernels.optim`,
one dispatch point in `Adam.step` and `EMA.update`) do the same on one flat buffer of all
parameters, which the optimizer and the EMA keep their state in either way (the
per-parameter arrays below are views of it). State dicts stay per parameter and flat
{str: array}, so checkpoints can be written with safetensors.
May import: backend, tensor, kernels.
"""
import contextlib
import math

from . import backend, kernels
from .kernels.optim import FlatParameters, adam_step, ema_update
from .tensor import check_state_keys


def _scalar(value, dtype="float64"):
    """A Python number as a 0-d host array, the form a safetensors file can hold."""
    return backend.host.asarray(value, dtype=dtype)


def _number(a):
    """A one-element array as a Python number (safetensors stores a 0-d array as shape (1,))."""
    return backend.to_numpy(a).reshape(()).item()


def global_grad_norm(params):
    """||g|| = sqrt(sum of squared gradient entries over all params), as a 0-d array (no GPU sync); None without grads."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    xp = backend.xp_of(grads[0])
    return xp.sqrt(xp.asarray(sum(xp.vdot(g.ravel(), g.ravel()) for g in grads)))


def clip_scale(norm, max_norm):
    """s = max_norm / max(||g||, max_norm), the factor that clips g to global norm max_norm (as
    tf.clip_by_global_norm): exactly 1 below it. A 0-d array, so clipping never waits for the GPU."""
    return max_norm / backend.xp_of(norm).maximum(norm, max_norm)


def clip_grad_norm_(params, max_norm):
    """Rescale the gradients of `params` to global norm at most `max_norm` (each p.grad becomes a scaled copy).

    Out of place: backward() may hand one array to two leaves, so an in-place scale could hit it
    twice. Returns the norm before clipping as a Python float; float() is a GPU sync point.
    """
    params = list(params)
    if max_norm <= 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be positive; got {max_norm}")
    norm = global_grad_norm(params)
    if norm is None:
        return 0.0
    scale = clip_scale(norm, float(max_norm))
    for p in params:
        if p.grad is not None:
            p.grad = p.grad * scale.astype(p.grad.dtype)
    return float(norm)  # GPU sync


def adam_update(p, g, m, v, *, t, lr, b1, b2, eps, weight_decay):
    """One Adam step (Kingma & Ba 2015, Algorithm 1, in PyTorch's form) on one parameter, in place."""
    m *= b1
    m += (1 - b1) * g                                    # m = b1 m + (1 - b1) g
    v *= b2
    v += (1 - b2) * g * g                                # v = b2 v + (1 - b2) g^2
    if weight_decay:
        p -= lr * weight_decay * p                       # AdamW: decay p itself, not through the gradient
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)  # bias correction of the zero-initialised moments
    p -= lr * m_hat / (backend.xp_of(p).sqrt(v_hat) + eps)


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
        """Clip, warm up, update every parameter that has a gradient in place (others are skipped, as in
        PyTorch); returns the pre-clip global gradient norm. float() of it is a GPU sync point."""
        if all(p.grad is None for p in self.params):
            return 0.0
        self.step_count += 1
        t, (b1, b2) = self.step_count, self.betas
        hyper = dict(t=t, lr=self.current_lr(t), b1=b1, b2=b2, eps=self.eps, weight_decay=self.weight_decay)
        if kernels.enabled():                    # the dispatch point: the same update on the flat buffers
            return float(adam_step(self.flat, self.flat_exp_avg, self.flat_exp_avg_sq, self._buf,
                                   grad_clip=self.grad_clip, clip_scale=clip_scale, **hyper))
        self.flat.adopt()                        # p.data rebound by hand goes back into the shared buffer
        norm = global_grad_norm(self.params)
        scale = 1 if self.grad_clip is None else clip_scale(norm, self.grad_clip).astype(norm.dtype)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is not None:
                adam_update(p.data, p.grad * scale, m, v, **hyper)   # g clipped to global norm grad_clip
        return float(norm)

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
        check_state_keys("Adam", state, expected, scalars)
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
        """shadow = decay shadow + (1 - decay) param, in place, written shadow -= (1 - decay) (shadow - param)."""
        flat = self._flat(module)
        rate = 1.0 - self.decay
        if kernels.enabled():                    # the dispatch point: the same update on the flat buffers
            ema_update(self.flat_shadow, flat.data, self._buf, rate)
        else:
            for shadow, p in zip(self.shadow.values(), flat.params):
                shadow -= rate * (shadow - p.data)
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
        check_state_keys("EMA", state, expected, ("decay", "num_updates"))
        self.decay, self.num_updates = float(_number(state["decay"])), int(_number(state["num_updates"]))
        for name, s in self.shadow.items():  # in place: the views stay views of the flat averages
            _assign(s, state[f"shadow.{name}"])
