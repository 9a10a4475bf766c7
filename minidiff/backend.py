"""Array backend: the one module in minidiff that imports numpy and cupy.

Code that *creates* arrays asks `xp()` for the active module; code that *computes*
on existing arrays asks them (`xp_of(a)`), so an op never mixes backends. `host`
is numpy itself, for float64 schedule math and file I/O only.
Randomness comes from `Generator`, a seeded stream drawn on the host (PCG64) and
moved to the active backend, so a seed gives the same numbers on numpy and cupy.
"""
import os

import numpy as host  # float64 coefficients, file I/O, host-side random draws

try:  # CuPy is optional: pip install "minidiff[gpu]"
    import cupy
except Exception:  # ImportError, or a broken CUDA install that fails at import
    cupy = None

DTYPE = host.float32  # default dtype of data, activations and parameters
GPU_INSTALL_HINT = 'pip install "minidiff[gpu]"'
_active = host


class BackendError(RuntimeError):
    """Raised when the requested array backend cannot be used here."""


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device."""
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CUDARuntimeError when the driver is missing or no device is visible
        return False


def use_backend(name):
    """Make "numpy" or "cupy" the module that new arrays and tensors are created with."""
    global _active
    if name == "numpy":
        _active = host
    elif name == "cupy":
        if cupy is None:
            raise BackendError(f'backend "cupy" needs CuPy, which is not installed: {GPU_INSTALL_HINT}')
        if not gpu_available():
            raise BackendError('backend "cupy" needs a visible NVIDIA GPU, and CUDA reports none '
                               '(check nvidia-smi and CUDA_VISIBLE_DEVICES); use --backend numpy here')
        _active = cupy
    else:
        raise ValueError(f'unknown backend {name!r}: use "numpy" or "cupy"')


def backend_name():
    """The name of the active backend: "numpy" or "cupy"."""
    return "numpy" if _active is host else "cupy"


def xp():
    """The active array module. Call it each time: a copy taken at import would go stale."""
    return _active


def xp_of(*arrays):
    """numpy or cupy, whichever owns `arrays` (the cupy.get_array_module idiom)."""
    return host if cupy is None else cupy.get_array_module(*arrays)


def is_array(a):
    """True for a numpy or cupy ndarray."""
    return isinstance(a, host.ndarray) or (cupy is not None and isinstance(a, cupy.ndarray))


def to_numpy(a):
    """A host copy of `a` (no copy for numpy arrays). On cupy this waits for the GPU."""
    if cupy is not None and isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    return host.asarray(a)


def to_active(a, dtype=None):
    """`a` as an array of the active backend (a host-to-device copy on cupy)."""
    return _active.asarray(a, dtype=dtype)


class Generator:
    """A seeded random stream: drawn on the host with PCG64, returned on the active backend.

    Drawing on the host makes a seed mean the same numbers on numpy and cupy, and
    lets the state be saved in a checkpoint as plain integers (no pickle).
    """

    def __init__(self, seed=None):
        self.seed = seed
        self._rng = host.random.Generator(host.random.PCG64(seed))

    def normal(self, shape, dtype=DTYPE):
        """Standard normal draws of `shape`, as `dtype` on the active backend."""
        return to_active(self._rng.standard_normal(shape, dtype=host.float64).astype(dtype))

    def uniform(self, shape, low=0.0, high=1.0, dtype=DTYPE):
        """Uniform draws in [low, high)."""
        return to_active(self._rng.uniform(low, high, shape).astype(dtype))

    def integers(self, low, high, shape):
        """Integers in [low, high) as int64 on the active backend."""
        return to_active(self._rng.integers(low, high, shape, dtype=host.int64))

    def permutation(self, n):
        """A random permutation of range(n) as a host int64 array (used for indexing data)."""
        return self._rng.permutation(n)

    def host_rng(self):
        """The underlying numpy Generator, for host-side draws (initialisation, data order)."""
        return self._rng

    def get_state(self):
        """The stream's state as JSON-able plain data."""
        return self._rng.bit_generator.state

    def set_state(self, state):
        """Restore a state returned by get_state()."""
        self._rng.bit_generator.state = state


_default_generator = Generator(None)


def manual_seed(seed):
    """Reseed the default generator used when no explicit Generator is passed; returns it."""
    global _default_generator
    _default_generator = Generator(seed)
    return _default_generator


def default_generator():
    """The generator that functions use when they are not given one."""
    return _default_generator


def set_default_generator(generator):
    """Make `generator` the default one (distributed training installs a per-rank view of it)."""
    global _default_generator
    _default_generator = generator
    return generator


use_backend(os.environ.get("MINIDIFF_BACKEND", "numpy"))
