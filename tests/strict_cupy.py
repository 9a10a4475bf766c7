"""A strict CuPy stand-in on NumPy, so every CuPy code path of minidiff runs without a GPU.

It behaves like CuPy where CuPy is strict, and is stricter where being so costs nothing:
- device arrays are `ndarray`, a wrapper of a NumPy array whose `__array__` raises TypeError
  (CuPy refuses implicit conversion: `numpy.asarray(device)`, `np.testing` on device data);
- any operation mixing a host `numpy.ndarray` with a device array raises TypeError (operators,
  module functions, ufuncs, `__array_function__`, setitem); only `array`/`asarray`/`asanyarray`
  (and `ndarray.set`) take host arrays, and that is counted as a host->device copy;
- reductions and scalar indexing return 0-d device arrays, never NumPy scalars;
- a type with `__array_ufunc__ = None` (minidiff's Tensor) gets the operator (NotImplemented),
  as CuPy's operator dispatch does;
- only names that exist in CuPy: where CuPy is installed (it imports without a GPU), every
  attribute of the module, its namespaces (`lib.stride_tricks`, `random`, ...), `ndarray` and
  `ufunc` is checked against the real `dir()`, and a missing one raises AttributeError naming
  it. Without CuPy the stand-in still runs, without that check (`NAMES_CHECKED` says which).

Everything is counted in `counts`: "ops" (every module function, ufunc, array method or
operator call that returns a device array, in-place operators included: the issue's proxy
for a kernel launch), "writes" (calls that only write device data in place and return
nothing: setitem, fill, ufunc.at; kernels too, counted apart), "h2d_bytes" and "d2h_bytes"
(host<->device copies), "syncs" (values read back). `by_name` breaks them down by name and,
with TRACK_SITES, `by_site` by the line of minidiff that asked. `reset()` zeroes them.

Test-only: `install()` makes this module the `cupy` that `import cupy` finds (before
minidiff.backend is imported); tests/conftest.py and tests/standin_launch.py call it.
"""
import collections
import sys
import types

import numpy

NAMES = None            # {"cupy": set, "cupy.ndarray": set, "cupy.ufunc": set, "cupy.lib": set, ...} or None
NAMES_CHECKED = False   # True once the names came from a real CuPy
REAL_CUPY_VERSION = None
counts = collections.Counter()
by_name = collections.Counter()
by_site = collections.Counter()  # "minidiff/x.py:line" -> ops, filled only while TRACK_SITES is True
TRACK_SITES = False
_DEVICE_COUNT = 1


def reset():
    """Zero the counters."""
    counts.clear()
    by_name.clear()
    by_site.clear()


def snapshot():
    """The counters as a plain dict (ops, writes, h2d_bytes, d2h_bytes, syncs)."""
    return {k: int(counts[k]) for k in ("ops", "writes", "h2d_bytes", "d2h_bytes", "syncs")}


# ---------------------------------------------------------------- names from the real CuPy


def load_real_names():
    """dir() of the real CuPy's module, namespaces, ndarray and ufunc; None where CuPy is not installed."""
    global NAMES, NAMES_CHECKED, REAL_CUPY_VERSION
    ours = sys.modules.get("cupy")
    if ours is not None and getattr(ours, "_IS_STRICT_STANDIN", False):
        del sys.modules["cupy"]  # let the import below find the real package
    try:
        import cupy as real
    except ImportError:
        real = None
    finally:
        if ours is not None:
            sys.modules["cupy"] = ours
    if real is None or getattr(real, "_IS_STRICT_STANDIN", False):
        return None
    names = {"cupy": set(dir(real)), "cupy.ndarray": set(dir(real.ndarray)), "cupy.ufunc": set(dir(real.ufunc))}
    for sub in ("lib", "lib.stride_tricks", "random", "linalg", "fft", "cuda", "cuda.runtime"):
        obj = real
        for part in sub.split("."):
            obj = getattr(obj, part)
        names[f"cupy.{sub}"] = set(dir(obj))
    NAMES, NAMES_CHECKED, REAL_CUPY_VERSION = names, True, real.__version__
    # Forget the real package: its lazily loaded parts (cupyx, ...) would later import `cupy` and
    # find the stand-in (hypothesis touches every module in sys.modules).
    for mod in [m for m in sys.modules if m.split(".")[0] in ("cupy", "cupyx", "cupy_backends")]:
        if sys.modules[mod] is not ours:
            del sys.modules[mod]
    return names


def _check(space, name):
    if NAMES is not None and space in NAMES and name not in NAMES[space]:
        raise AttributeError(f"{space} has no attribute {name!r}: the real CuPy {REAL_CUPY_VERSION} lacks it "
                             f"(strict CuPy stand-in)")


# ---------------------------------------------------------------- wrapping


class _MemoryPointer:
    """What `ndarray.data` is on CuPy: a device pointer, not an array (so code that takes it for one fails)."""

    def __init__(self, nbytes):
        self.mem, self.ptr, self.nbytes = None, 0, nbytes


def _is_host(x):
    return isinstance(x, numpy.ndarray)


def _refuse_host(where):
    raise TypeError(f"{where}: a host numpy.ndarray cannot be mixed with a cupy array; move it with "
                    f"cupy.asarray() first (strict CuPy stand-in; CuPy raises TypeError here too)")


def _unwrap(x, where):
    """Device arrays -> their NumPy array; host arrays refused; containers walked; anything else as is."""
    if isinstance(x, ndarray):
        return x._a
    if _is_host(x):
        _refuse_host(where)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, where) for v in x)
    return x


def _contains_device(x):
    if isinstance(x, ndarray):
        return True
    if isinstance(x, (list, tuple)):
        return any(_contains_device(v) for v in x)
    return False


def _wrap(x, keep=()):
    """NumPy results -> device arrays (0-d for NumPy scalars); `keep` maps id(np array) -> its wrapper."""
    if isinstance(x, numpy.ndarray):
        for w in keep:
            if w._a is x:
                return w
        out = ndarray.__new__(ndarray)
        out._a = x
        return out
    if isinstance(x, numpy.generic):
        out = ndarray.__new__(ndarray)
        out._a = numpy.asarray(x)
        return out
    if isinstance(x, tuple):
        return tuple(_wrap(v, keep) for v in x)
    if isinstance(x, list):
        return [_wrap(v, keep) for v in x]
    return x


def _site():
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "minidiff" in path and "strict_cupy" not in path:
            return f"{path.rsplit('minidiff', 1)[-1].lstrip('/')}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _result(name, value, keep=(), inplace=False):
    """Wrap a result and count it: one operation when it returns device data, one write when it
    only wrote device data in place (setitem, fill, ufunc.at: kernels too, counted apart)."""
    wrapped = _wrap(value, keep)
    if _contains_device(wrapped):
        counts["ops"] += 1
        by_name[name] += 1
        if TRACK_SITES:
            by_site[_site()] += 1
    elif inplace:
        counts["writes"] += 1
        by_name[name] += 1
    return wrapped


def _wrappers(args, kwargs):
    found = [a for a in args if isinstance(a, ndarray)]
    found += [v for v in kwargs.values() if isinstance(v, ndarray)]
    for a in args:
        if isinstance(a, (list, tuple)):
            found += [v for v in a if isinstance(v, ndarray)]
    return found


def _call(name, fn, args, kwargs):
    """Run a NumPy function on unwrapped device arguments (host arrays refused) and wrap the result."""
    keep = _wrappers(args, kwargs)
    result = fn(*_unwrap(list(args), f"cupy.{name}"), **{k: _unwrap(v, f"cupy.{name}") for k, v in kwargs.items()})
    return _result(name, result, keep, inplace=result is None and bool(keep))


def _h2d(value, dtype=None, copy=True, **kwargs):
    """A host value (array, list or scalar) as a device array: counted as host->device bytes."""
    if isinstance(value, ndarray):
        a = value._a.astype(dtype) if dtype is not None and value._a.dtype != dtype else value._a
        if a is value._a and not copy:
            return value  # cupy.asarray of a device array of the right dtype: no kernel, the same object
        return _result("array", a.copy() if copy and a is value._a else a)
    if _contains_device(value):
        raise TypeError("cupy.array: a list holding cupy arrays is not supported; use cupy.stack (strict stand-in)")
    a = numpy.array(value, dtype=dtype, copy=True, **kwargs)
    counts["h2d_bytes"] += a.nbytes
    return _result("array", a)


def _d2h(a):
    counts["d2h_bytes"] += a.nbytes
    counts["syncs"] += 1
    return a


# ---------------------------------------------------------------- the device array


_BINARY = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift",
           "rshift", "divmod")
_COMPARE = ("eq", "ne", "lt", "le", "gt", "ge")


class ndarray:
    """A device array: a NumPy array that refuses to meet host arrays or to become one implicitly."""

    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, shape, dtype=float, order="C"):
        self._a = numpy.empty(shape, dtype=dtype, order=order)

    # --- what CuPy refuses
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly. (strict CuPy stand-in)")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if any(_is_host(x) for x in inputs) or any(_is_host(x) for x in kwargs.get("out", ()) or ()):
            _refuse_host(f"numpy.{ufunc.__name__}")
        return _call(ufunc.__name__, getattr(ufunc, method) if method != "__call__" else ufunc, inputs, kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        return _call(func.__name__, func, args, kwargs)

    # --- attributes: explicit where CuPy differs from NumPy, the rest checked against CuPy's names
    @property
    def data(self):
        return _MemoryPointer(self._a.nbytes)

    @property
    def shape(self):
        return self._a.shape

    @shape.setter
    def shape(self, value):
        self._a.shape = value

    @property
    def dtype(self):
        return self._a.dtype

    @property
    def ndim(self):
        return self._a.ndim

    @property
    def size(self):
        return self._a.size

    @property
    def nbytes(self):
        return self._a.nbytes

    @property
    def itemsize(self):
        return self._a.itemsize

    @property
    def strides(self):
        return self._a.strides

    @property
    def flags(self):
        return self._a.flags

    @property
    def base(self):
        return None if self._a.base is None else _wrap(self._a.base) if isinstance(self._a.base, numpy.ndarray) \
            else self  # a view of a non-array buffer: not None, which is all callers ask

    @property
    def T(self):
        return _result("T", self._a.T)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        _check("cupy.ndarray", name)
        value = getattr(self._a, name)
        if callable(value):
            def method(*args, **kwargs):
                return _call(f"ndarray.{name}", value, args, kwargs)
            return method
        return _wrap(value)

    # --- host copies, explicit
    def get(self, stream=None, order="C", out=None, blocking=True):
        return _d2h(self._a.copy())

    def set(self, arr, stream=None):
        if not _is_host(arr):
            raise TypeError(f"ndarray.set takes a numpy.ndarray; got {type(arr).__name__}")
        counts["h2d_bytes"] += arr.nbytes
        self._a[...] = arr

    def item(self, *args):
        _d2h(self._a)
        return self._a.item(*args)

    def tolist(self):
        return _d2h(self._a).tolist()

    def __float__(self):
        return float(_d2h(self._a))

    def __int__(self):
        return int(_d2h(self._a))

    def __complex__(self):
        return complex(_d2h(self._a))

    def __bool__(self):
        return bool(_d2h(self._a))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        return repr(self._a).replace("array(", "array(", 1)

    __str__ = __repr__

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    # --- indexing: device or Python indices; a host index array is an implicit copy, counted
    def _key(self, key):
        def one(k):
            if isinstance(k, ndarray):
                return k._a
            if _is_host(k) or isinstance(k, list):
                a = numpy.asarray(k)
                counts["h2d_bytes"] += a.nbytes
                return a
            return k
        return tuple(one(k) for k in key) if isinstance(key, tuple) else one(key)

    def __getitem__(self, key):
        return _result("getitem", self._a[self._key(key)])

    def __setitem__(self, key, value):
        if _is_host(value):
            raise TypeError("cupy.ndarray.__setitem__: the value is a host numpy.ndarray; move it with "
                            "cupy.asarray() first (strict CuPy stand-in)")
        self._a[self._key(key)] = value._a if isinstance(value, ndarray) else value
        _result("setitem", None, inplace=True)


def _operand(other, where):
    if isinstance(other, ndarray):
        return other._a
    if _is_host(other):
        _refuse_host(where)
    if isinstance(other, (bool, int, float, complex, numpy.generic)):
        return other
    raise TypeError(f"{where}: unsupported operand type {type(other).__name__} (strict CuPy stand-in)")


def _defers(other):
    return not isinstance(other, ndarray) and getattr(type(other), "__array_ufunc__", False) is None


def _make_binary(dunder):
    def op(self, other):
        if _defers(other):
            return NotImplemented
        result = getattr(self._a, dunder)(_operand(other, f"cupy.ndarray.{dunder}"))
        if result is NotImplemented:
            return result
        if dunder.startswith("__i"):  # in place: NumPy returned self._a, and so the operator returns self
            return _result(dunder, result, (self,))
        return _result(dunder, result, (self,))
    op.__name__ = dunder
    return op


for _name in _BINARY:
    inplace = (f"__i{_name}__",) if _name not in ("divmod", "matmul") else ()  # CuPy has no __imatmul__, __idivmod__
    for _dunder in (f"__{_name}__", f"__r{_name}__") + inplace:
        setattr(ndarray, _dunder, _make_binary(_dunder))
for _name in _COMPARE:
    setattr(ndarray, f"__{_name}__", _make_binary(f"__{_name}__"))
for _dunder in ("__neg__", "__pos__", "__abs__", "__invert__"):
    setattr(ndarray, _dunder, (lambda d: lambda self: _result(d, getattr(self._a, d)(), (self,)))(_dunder))
ndarray.__hash__ = None
ndarray.__module__ = "cupy"  # minidiff tells backends apart by type(a).__module__


# ---------------------------------------------------------------- ufuncs and namespaces


class ufunc:
    """A NumPy ufunc behind CuPy's ufunc interface (at, reduce, outer, ... as CuPy has them)."""

    def __init__(self, np_ufunc):
        self._u = np_ufunc
        self.__name__ = self.name = np_ufunc.__name__
        self.nin, self.nout, self.nargs = np_ufunc.nin, np_ufunc.nout, np_ufunc.nargs

    def __call__(self, *args, **kwargs):
        return _call(self.name, self._u, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        _check("cupy.ufunc", name)
        value = getattr(self._u, name)
        if not callable(value):
            return value
        return lambda *args, **kwargs: _call(f"{self.name}.{name}", value, args, kwargs)

    def __repr__(self):
        return f"<ufunc 'cupy.{self.name}' (strict stand-in)>"


def _resolve(space, np_obj, name):
    """The stand-in's version of `np_obj.name`: ufuncs and functions wrapped, types and constants as is."""
    _check(space, name)
    try:
        value = getattr(np_obj, name)
    except AttributeError:
        raise AttributeError(f"{space}.{name} is not emulated by the strict CuPy stand-in") from None
    if isinstance(value, numpy.ufunc):
        return ufunc(value)
    if isinstance(value, types.ModuleType):
        return Namespace(f"{space}.{name}", value)
    if isinstance(value, type) or not callable(value):
        return value  # dtypes (cupy.float32 is numpy.float32), finfo, constants
    def function(*args, **kwargs):
        return _call(name if space == "cupy" else f"{space[5:]}.{name}", value, args, kwargs)
    function.__name__ = name
    return function


class Namespace:
    """A CuPy submodule (lib, lib.stride_tricks, linalg, fft, random) over NumPy's, names checked."""

    def __init__(self, space, np_module):
        self._space, self._np = space, np_module

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _resolve(self._space, self._np, name)
        setattr(self, name, value)
        return value


# ---------------------------------------------------------------- the module's own names


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, blocking=False):
    return _h2d(obj, dtype=dtype, copy=copy, order=order, ndmin=ndmin)


def asarray(a, dtype=None, order=None, blocking=False):
    return _h2d(a, dtype=dtype, copy=False, order=order)


asanyarray = asarray


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """A host copy of a device array (host arrays pass through, as in CuPy)."""
    if isinstance(a, ndarray):
        return _d2h(numpy.array(a._a, order=order, copy=True))
    return numpy.asarray(a, order=order)


def get_array_module(*args):
    """This module when any argument is a device array, else numpy (CuPy's idiom)."""
    return _SELF if any(isinstance(a, ndarray) for a in args) else numpy


def is_available():
    return _DEVICE_COUNT > 0


class _Runtime:
    class CUDARuntimeError(RuntimeError):
        pass

    @staticmethod
    def getDeviceCount():
        return _DEVICE_COUNT

    @staticmethod
    def deviceSynchronize():
        counts["syncs"] += 1

    @staticmethod
    def runtimeGetVersion():
        return 0  # no CUDA runtime behind the stand-in


class _Device:
    def __init__(self, device=0):
        self.id = device
        self.compute_capability = "90"

    def synchronize(self):
        counts["syncs"] += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Stream:
    def synchronize(self):
        counts["syncs"] += 1


cuda = types.SimpleNamespace(runtime=_Runtime, Device=_Device, Stream=types.SimpleNamespace(null=_Stream()),
                             CUDARuntimeError=_Runtime.CUDARuntimeError)


class _Pool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


_POOL = _Pool()


def get_default_memory_pool():
    return _POOL


def get_default_pinned_memory_pool():
    return _POOL


_IS_STRICT_STANDIN = True
_SELF = sys.modules[__name__]
__version__ = "0.0-strict-standin"
lib = Namespace("cupy.lib", numpy.lib)
lib.stride_tricks = Namespace("cupy.lib.stride_tricks", numpy.lib.stride_tricks)
random = Namespace("cupy.random", numpy.random)
linalg = Namespace("cupy.linalg", numpy.linalg)
fft = Namespace("cupy.fft", numpy.fft)

# Public names defined above; each must exist in the real CuPy (checked by check_own_names()).
OWN = ("ndarray", "ufunc", "array", "asarray", "asanyarray", "asnumpy", "get_array_module", "is_available", "cuda",
       "get_default_memory_pool", "get_default_pinned_memory_pool", "lib", "random", "linalg", "fft")
_NDARRAY_OWN = ("data", "shape", "dtype", "ndim", "size", "nbytes", "itemsize", "strides", "flags", "base", "T",
                "get", "set", "item", "tolist")


def check_own_names():
    """Names the stand-in defines itself that the real CuPy lacks (empty when all is well or unchecked)."""
    if NAMES is None:
        return []
    missing = [f"cupy.{n}" for n in OWN if n not in NAMES["cupy"]]
    missing += [f"cupy.ndarray.{n}" for n in _NDARRAY_OWN if n not in NAMES["cupy.ndarray"]]
    missing += [f"cupy.ndarray.{n}" for n in vars(ndarray) if n.startswith("__") and n.endswith("__")
                and n not in NAMES["cupy.ndarray"] and n not in ("__slots__", "__dict__", "__weakref__", "_a",
                                                                 "__getattr__",  # how the rest are checked
                                                                 "__module__", "__qualname__", "__firstlineno__",
                                                                 "__static_attributes__")]
    missing += [f"cupy.cuda.runtime.{n}" for n in ("getDeviceCount", "CUDARuntimeError", "deviceSynchronize",
                                                   "runtimeGetVersion")
                if n not in NAMES["cupy.cuda.runtime"]]
    return missing


def __getattr__(name):
    """Every other name: NumPy's, if the real CuPy has it too."""
    if name.startswith("__"):
        raise AttributeError(name)
    value = _resolve("cupy", numpy, name)
    globals()[name] = value  # checked once
    return value


def install(device_count=1):
    """Make `import cupy` give this module (call before minidiff.backend is imported); returns it."""
    global _DEVICE_COUNT
    _DEVICE_COUNT = device_count
    if NAMES is None:
        load_real_names()
    sys.modules["cupy"] = _SELF
    return _SELF
