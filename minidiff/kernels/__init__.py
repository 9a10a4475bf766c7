"""The kernels layer: code that exists only for speed, each kernel standing in for one math op.

The math layer (ops.py, conv.py, functional.py, optim.py) is what a reader opens: each op
written once as plain whole-batch array code, forward and backward. Each op reaches its
kernel through one visible dispatch point, `if kernels.enabled(): ...`, and the kernel
computes the same thing (to float32 rounding; tests/test_kernels*.py hold each one to its op):

| kernel | math op | what it adds |
|---|---|---|
| conv.Conv2d | conv.Conv2d | channels-last im2col in image blocks, scratch buffers, Winograd F(2x2, 3x3) |
| norm.GroupNorm, norm.GroupNormSiLU | functional.GroupNorm, silu(GroupNorm) | einsum statistics, one op for the pair |
| elementwise.SiLU, elementwise.add | functional.SiLU, ops.Add | in place under no_grad, chunks |
| elementwise.UpsampleNearest2d | functional.UpsampleNearest2d | keeps channels-last |
| dense.Linear, dense.Attention | functional.Linear, functional.Attention | row/image chunks, out= |
| optim.adam_step, optim.ema_update | optim.Adam.step, optim.EMA.update | one flat buffer, cache blocks |
| memory.keep_freed_memory | (the allocator) | freed activations reused without page faults |

tuning.py chooses among a kernel's plans (the convolution's algorithm, block size and thread
split) by timing them in the run, when MINIDIFF_TUNING asks it to; off, the fixed rules hold.

pool.py is the thread pool they share; `pool.split` is the one chunking idiom.

The mode: "fast" (the default) uses the kernels; "reference" runs the whole library on the
math layer only, for a learner who sets a breakpoint in the plain convolution during a real
run. MINIDIFF_KERNELS sets it at import; `use_kernels(name)` (also `minidiff.use_kernels`)
switches it.
May import: backend, tensor, kernels.*.
"""
import os

from . import memory

MODES = ("fast", "reference")


class KernelsError(ValueError):
    """An unknown kernels mode (in MINIDIFF_KERNELS or use_kernels)."""


_fast = True
_pending_error = None  # an unknown MINIDIFF_KERNELS, raised at first use (so `minidiff --help` still works)


def use_kernels(name):
    """"fast": the kernels layer (default); "reference": the math layer alone. Returns the previous mode."""
    global _fast, _pending_error
    if name not in MODES:
        raise KernelsError(f"unknown kernels mode {name!r}: use \"fast\" (the kernels, the default) or "
                         f"\"reference\" (the plain math layer only)")
    previous = "fast" if _fast else "reference"
    _fast, _pending_error = name == "fast", None
    if _fast:
        memory.keep_freed_memory()
    return previous


def mode():
    """The current mode: "fast" or "reference"."""
    if _pending_error is not None:
        raise _pending_error
    return "fast" if _fast else "reference"


def enabled():
    """True when ops should run their kernels (the mode is "fast")."""
    if _pending_error is not None:
        raise _pending_error
    return _fast


def default_mode():
    """MINIDIFF_KERNELS, read now ("fast" when unset or empty)."""
    return os.environ.get("MINIDIFF_KERNELS", "").strip() or "fast"


try:
    use_kernels(default_mode())
except KernelsError:
    _pending_error = KernelsError(f"MINIDIFF_KERNELS={default_mode()!r} is not a kernels mode: use \"fast\" "
                                f"(the default) or \"reference\" (the plain math layer only), or unset it")
