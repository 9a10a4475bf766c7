"""Array backend: the one module in minidiff that imports numpy and cupy.

Code that *creates* arrays asks `xp()` for the active module; code that *computes*
on existing arrays asks them (`xp_of(a)`), so an op never mixes backends. `host`
is numpy itself, for float64 schedule math and file I/O only.
Randomness comes from `Generator`, a seeded stream drawn on the host (PCG64) and
moved to the array's backend, so a seed gives the same numbers on numpy and cupy;
`Generator.keep_mask` draws on the device instead (see there).

The default backend is MINIDIFF_BACKEND ("numpy" when unset), read by `default_name()`.
An unusable MINIDIFF_BACKEND does not break `import minidiff`: the error is kept and
raised, unchanged, by the first `xp()`, `to_active()` or `backend_name()` (or by
`use_backend(default_name())`, as the CLI does), unless `use_backend` chose a backend first.
"""
import os
import sys

import numpy as host  # float64 coefficients, file I/O, host-side random draws
from numpy.lib import format as npy_format  # .npy headers, read before any array data (data's bounded readers)

try:  # CuPy is optional: pip install "minidiff[gpu]"
    import cupy
    CUPY_IMPORT_ERROR = None
except ModuleNotFoundError as err:
    cupy = None
    # Only a missing `cupy` itself means "not installed"; a missing dependency is a broken install.
    CUPY_IMPORT_ERROR = None if err.name == "cupy" else f"{type(err).__name__}: {err}"
except Exception as err:  # ImportError/OSError from missing CUDA libraries, a wheel for another CUDA, ...
    cupy = None
    CUPY_IMPORT_ERROR = f"{type(err).__name__}: {err}"

DTYPE = host.float32  # default dtype of data, activations and parameters
GPU_INSTALL_HINT = ('in the minidiff checkout pip install -e ".[gpu]" (CUDA 12; ".[gpu-cuda13]" for CUDA 13), '
                    'or from a wheel pip install "minidiff[gpu]"')
NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"  # present while the NVIDIA kernel driver is loaded (Linux)
NAMES = ("numpy", "cupy")
_active = host
_pending_error = None  # an unusable MINIDIFF_BACKEND, raised at first use (see the module docstring)


class BackendError(RuntimeError):
    """Raised when the requested array backend cannot be used here."""


def default_name():
    """The default backend: MINIDIFF_BACKEND if set (read now, not at import), else "numpy"."""
    return os.environ.get("MINIDIFF_BACKEND", "numpy") or "numpy"


def gpu_status():
    """(True, "") when CuPy imports and sees a CUDA device, else (False, why not) in words."""
    if cupy is None:
        if CUPY_IMPORT_ERROR:
            return False, (f"CuPy is installed but failed to import ({CUPY_IMPORT_ERROR}): a broken install, "
                           f"a CuPy wheel for another CUDA version, or missing CUDA libraries; "
                           f"check with python -c 'import cupy'")
        return False, f"CuPy is not installed: {GPU_INSTALL_HINT}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as err:  # no driver, a driver too old, no device visible
        if "InsufficientDriver" in str(err) and not nvidia_driver_loaded():
            # CUDA says "insufficient" when there is no driver at all: upgrading is not the advice then
            return False, ("no NVIDIA driver is loaded on this machine, so CuPy cannot reach a GPU; on a machine "
                           "with an NVIDIA GPU install its driver (nvidia-smi then lists the GPU), else use "
                           "--backend numpy")
        if "InsufficientDriver" in str(err):
            return False, (f"the NVIDIA driver is older than the CUDA this CuPy was built for ({err}): upgrade the "
                           f"driver, or install the CuPy of the driver's CUDA version (nvidia-smi, top right): "
                           f"{GPU_INSTALL_HINT}")
        return False, f"CUDA reports no usable GPU ({err}); check nvidia-smi and CUDA_VISIBLE_DEVICES"
    if count < 1:
        return False, "CUDA sees no GPU; check nvidia-smi and CUDA_VISIBLE_DEVICES"
    return True, ""


def nvidia_driver_loaded():
    """Whether an NVIDIA kernel driver is loaded (Linux: its /proc file; elsewhere assumed, as we cannot tell)."""
    return os.path.exists(NVIDIA_DRIVER_FILE) or not sys.platform.startswith("linux")


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device (other errors propagate)."""
    return gpu_status()[0]


def use_backend(name):
    """Make "numpy" or "cupy" the module that new arrays and tensors are created with."""
    global _active, _pending_error
    if name == "numpy":
        _active = host
    elif name == "cupy":
        ok, why = gpu_status()
        if not ok:
            raise BackendError(f'backend "cupy" cannot run here: {why}. Use the numpy backend on this machine')
        _active = cupy
    else:
        raise ValueError(f'unknown backend {name!r}: use "numpy" or "cupy"')
    _pending_error = None


def backend_name():
    """The name of the active backend: "numpy" or "cupy"."""
    if _pending_error is not None:
        raise _pending_error
    return "numpy" if _active is host else "cupy"


def xp():
    """The active array module. Call it each time: a copy taken at import would go stale."""
    if _pending_error is not None:
        raise _pending_error
    return _active


def xp_of(*arrays):
    """numpy or cupy, whichever owns `arrays` (cupy.get_array_module's rule: cupy if any is a cupy array).

    Written out rather than calling get_array_module: it runs several times per op, and the
    isinstance loop costs a fraction of that call (BENCHMARKS.md, "Speed work, second round").
    """
    if cupy is not None:
        device_array = cupy.ndarray
        for a in arrays:
            if isinstance(a, device_array):
                return cupy
    return host


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
    return to_backend(a, xp(), dtype)


def to_backend(a, module, dtype=None):
    """`a` (host or device data) as an array of `module` (numpy or cupy), crossing via the host if needed."""
    if module is host:
        a = to_numpy(a)
    elif cupy is not None and not isinstance(a, cupy.ndarray):
        a = host.asarray(a)  # lists and numpy scalars: one host array, then one copy to the device
    return module.asarray(a, dtype=dtype)


def to_backend_of(a, ref, dtype=None):
    """`a` as an array on the backend of the array `ref` (moved only when it lives elsewhere)."""
    return to_backend(a, xp_of(ref), dtype)


# SplitMix64 (Steele, Lea & Flood 2014): the stream's increment and finaliser constants.
_GAMMA, _MIX1, _MIX2 = host.uint64(0x9E3779B97F4A7C15), host.uint64(0xBF58476D1CE4E5B9), host.uint64(0x94D049BB133111EB)
_S30, _S27, _S40 = host.uint64(30), host.uint64(27), host.uint64(40)  # uint64 shifts: NumPy 1.x would promote an int


class Generator:
    """A seeded random stream: drawn on the host with PCG64, returned on the array's backend.

    Drawing on the host makes a seed mean the same numbers on numpy and cupy, and
    lets the state be saved in a checkpoint as plain integers (no pickle). Results go
    to the backend of `like` when given, else to the active one.

    `keep_mask` is the exception, for per-step masks too large to copy to a GPU every
    step: one 64-bit key comes from the host stream, and the mask is computed on the
    device from it by integer arithmetic, so it too is identical on numpy and cupy and
    its state is still the host stream's.
    """

    def __init__(self, seed=None):
        self.seed = seed
        self._rng = host.random.Generator(host.random.PCG64(seed))

    def _put(self, a, like):
        return to_active(a) if like is None else to_backend_of(a, like)

    def normal(self, shape, dtype=DTYPE, like=None):
        """Standard normal draws of `shape`, as `dtype` on `like`'s backend (default: the active one)."""
        return self._put(self._rng.standard_normal(shape, dtype=host.float64).astype(dtype), like)

    def uniform(self, shape, low=0.0, high=1.0, dtype=DTYPE, like=None):
        """Uniform draws in [low, high)."""
        return self._put(self._rng.uniform(low, high, shape).astype(dtype), like)

    def integers(self, low, high, shape, like=None):
        """Integers in [low, high) as int64."""
        return self._put(self._rng.integers(low, high, shape, dtype=host.int64), like)

    def keep_mask(self, shape, p, like=None, first=0):
        """A bool array of `shape`, each entry True with probability 1 - p (independently), drawn on the device.

        Entry i is the top 24 bits of SplitMix64's output number first + i of a stream whose start
        is one uint64 drawn from this generator, compared with round(p 2^24): P(True) = 1 - p up to
        2^-25. Counter-based, so no device state is kept (and `first` picks any slice of a larger
        mask); integer ops, so bit-identical on numpy and cupy. About a dozen array operations and
        no host-to-device copy.
        """
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"keep_mask: p must lie in [0, 1]; got {p}")
        module = xp() if like is None else xp_of(like)
        key = host.uint64(self._rng.integers(0, 2 ** 64, dtype=host.uint64))
        z = module.arange(first, first + int(host.prod(shape, dtype=host.int64)), dtype=host.uint64)
        z *= _GAMMA
        z += key               # the stream's state number i: key + (i + 1) gamma, less one gamma
        z ^= z >> _S30
        z *= _MIX1
        z ^= z >> _S27
        z *= _MIX2             # SplitMix64's last step, z ^= z >> 31, leaves the top 33 bits alone
        return (z >> _S40 >= host.uint64(round(p * 2 ** 24))).reshape(shape)

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


try:
    use_backend(default_name())
except (BackendError, ValueError) as err:  # kept for the first use: `minidiff --help` still works
    _pending_error = type(err)(f"MINIDIFF_BACKEND={default_name()}: {err}")
