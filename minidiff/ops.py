"""The primitive differentiable ops: one Function each, forward and hand-written backward.

The closed set: add sub mul div neg pow matmul | exp log sqrt tanh sigmoid abs |
sum mean max | reshape transpose getitem concatenate stack pad | softmax log_softmax,
plus where, maximum and clip for losses. Every backward states its derivative in
one comment line; `unbroadcast` sums a gradient back to an input's shape.
May import: backend, tensor, kernels. The Tensor operators are bound in the table at the bottom.
"""
from . import backend, kernels
from .kernels import elementwise
from .tensor import Function, Tensor


def unbroadcast(grad, shape):
    """Sum `grad` down to `shape`: broadcasting copies values, so its adjoint adds them up."""
    if grad.shape == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1)
    return grad.sum(axis=axes, keepdims=False).reshape(shape) if axes else grad.reshape(shape)


def _shape(a):
    return getattr(a, "shape", ())


# ---------------------------------------------------------------- elementwise binary


class Add(Function):
    """a + b, broadcasting as numpy does."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = _shape(a), _shape(b)
        if kernels.enabled():                              # the dispatch point: the same sum, in batch chunks
            return elementwise.add(a, b)
        return a + b

    @staticmethod
    def backward(ctx, grad):
        sa, sb = ctx.shapes  # d(a+b)/da = 1, d(a+b)/db = 1
        return unbroadcast(grad, sa), unbroadcast(grad, sb)


def add(a, b):
    return Add.apply(a, b)


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = _shape(a), _shape(b)
        return a - b

    @staticmethod
    def backward(ctx, grad):
        sa, sb = ctx.shapes  # d(a-b)/da = 1, d(a-b)/db = -1
        return unbroadcast(grad, sa), unbroadcast(-grad, sb) if ctx.needs_input_grad[1] else None


def sub(a, b):
    return Sub.apply(a, b)


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved  # d(ab)/da = b, d(ab)/db = a
        ga = unbroadcast(grad * b, _shape(a)) if ctx.needs_input_grad[0] else None
        gb = unbroadcast(grad * a, _shape(b)) if ctx.needs_input_grad[1] else None
        return ga, gb


def mul(a, b):
    return Mul.apply(a, b)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved  # d(a/b)/da = 1/b, d(a/b)/db = -a/b^2
        ga = unbroadcast(grad / b, _shape(a)) if ctx.needs_input_grad[0] else None
        gb = unbroadcast(-grad * a / (b * b), _shape(b)) if ctx.needs_input_grad[1] else None
        return ga, gb


def div(a, b):
    return Div.apply(a, b)


class Pow(Function):
    """a ** p for a constant exponent p (a Python number)."""

    @staticmethod
    def forward(ctx, a, p):
        ctx.save_for_backward(a)
        ctx.p = p
        return a ** p

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        p = ctx.p  # d(a^p)/da = p a^(p-1)
        return (grad * (2 * a) if p == 2 else grad * p * a ** (p - 1)), None


def pow(a, p):
    """a ** p for a constant Python exponent p."""
    if isinstance(p, Tensor):
        raise TypeError("pow supports a constant (Python number) exponent; use exp(p * log(a)) for a tensor exponent")
    return Pow.apply(a, p)


class Maximum(Function):
    @staticmethod
    def forward(ctx, a, b):
        xp = backend.xp_of(*(x for x in (a, b) if backend.is_array(x)))
        ctx.save_for_backward(a, b)
        return xp.maximum(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved  # d max(a,b)/da = [a >= b] (ties go to a), d/db = [a < b]
        mask = a >= b
        ga = unbroadcast(grad * mask, _shape(a)) if ctx.needs_input_grad[0] else None
        gb = unbroadcast(grad * ~mask, _shape(b)) if ctx.needs_input_grad[1] else None
        return ga, gb


def maximum(a, b):
    return Maximum.apply(a, b)


class Where(Function):
    """cond ? a : b with a boolean array `cond` (not differentiated)."""

    @staticmethod
    def forward(ctx, cond, a, b):
        xp = backend.xp_of(cond)
        ctx.save_for_backward(cond)
        ctx.shapes = _shape(a), _shape(b)
        return xp.where(cond, a, b)

    @staticmethod
    def backward(ctx, grad):
        (cond,) = ctx.saved  # d/da = [cond], d/db = [not cond]
        zero = grad.dtype.type(0)
        backend_xp = backend.xp_of(grad)
        ga = unbroadcast(backend_xp.where(cond, grad, zero), ctx.shapes[0]) if ctx.needs_input_grad[1] else None
        gb = unbroadcast(backend_xp.where(cond, zero, grad), ctx.shapes[1]) if ctx.needs_input_grad[2] else None
        return None, ga, gb


def where(cond, a, b):
    """Elementwise cond ? a : b; gradients flow to a and b, never to cond."""
    cond = cond.data if isinstance(cond, Tensor) else cond
    return Where.apply(cond, a, b)


class MatMul(Function):
    """C = A @ B on stacks of matrices: (..., n, k) @ (..., k, m) -> (..., n, m)."""

    @staticmethod
    def forward(ctx, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul needs operands with at least 2 dimensions; got shapes {a.shape} and {b.shape}")
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul shape mismatch: {a.shape} @ {b.shape} (inner sizes {a.shape[-1]} != {b.shape[-2]})")
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        ga = unbroadcast(grad @ b.swapaxes(-1, -2), a.shape) if ctx.needs_input_grad[0] else None  # dL/dA = dL/dC B^T
        gb = unbroadcast(a.swapaxes(-1, -2) @ grad, b.shape) if ctx.needs_input_grad[1] else None  # dL/dB = A^T dL/dC
        return ga, gb


def matmul(a, b):
    return MatMul.apply(a, b)


# ---------------------------------------------------------------- elementwise unary


class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, grad):
        return -grad  # d(-a)/da = -1


def neg(a):
    return Neg.apply(a)


class Exp(Function):
    @staticmethod
    def forward(ctx, a):
        out = backend.xp_of(a).exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return grad * out  # d exp(a)/da = exp(a)


def exp(a):
    return Exp.apply(a)


class Log(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return backend.xp_of(a).log(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return grad / a  # d log(a)/da = 1/a


def log(a):
    return Log.apply(a)


class Sqrt(Function):
    @staticmethod
    def forward(ctx, a):
        out = backend.xp_of(a).sqrt(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return grad / (2 * out)  # d sqrt(a)/da = 1 / (2 sqrt(a))


def sqrt(a):
    return Sqrt.apply(a)


class Tanh(Function):
    @staticmethod
    def forward(ctx, a):
        out = backend.xp_of(a).tanh(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return grad * (1 - out * out)  # d tanh(a)/da = 1 - tanh(a)^2


def tanh(a):
    return Tanh.apply(a)


def sigmoid_of(a):
    """sigmoid(a) = 1 / (1 + exp(-a)) of an array, computed as (1 + tanh(a/2)) / 2: equal, and exp never overflows."""
    return 0.5 * (backend.xp_of(a).tanh(0.5 * a) + 1)


class Sigmoid(Function):
    @staticmethod
    def forward(ctx, a):
        out = sigmoid_of(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return grad * out * (1 - out)  # d sigmoid(a)/da = sigmoid(a) (1 - sigmoid(a))


def sigmoid(a):
    return Sigmoid.apply(a)


class Abs(Function):
    @staticmethod
    def forward(ctx, a):
        xp = backend.xp_of(a)
        ctx.save_for_backward(a)
        return xp.abs(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return grad * backend.xp_of(a).sign(a)  # d|a|/da = sign(a) (0 at 0)


def abs(a):  # noqa: A001 - mirrors numpy's name
    return Abs.apply(a)


class Clip(Function):
    @staticmethod
    def forward(ctx, a, lo=None, hi=None):
        ctx.save_for_backward(a)
        ctx.bounds = lo, hi
        return backend.xp_of(a).clip(a, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        lo, hi = ctx.bounds
        inside = (a >= (lo if lo is not None else -float("inf"))) & (a <= (hi if hi is not None else float("inf")))
        return grad * inside  # d clip(a)/da = 1 inside [lo, hi], 0 outside


def clip(a, lo=None, hi=None):
    return Clip.apply(a, lo=lo, hi=hi)


# ---------------------------------------------------------------- reductions


def _norm_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(a % ndim)
    return tuple(sorted(set(out)))


def _expand_reduced(grad, shape, axes, keepdims):
    """Reshape a reduced gradient so that it broadcasts against the input `shape`."""
    if not keepdims:
        grad = grad.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape)))
    return grad


class Sum(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        ctx.shape, ctx.axes, ctx.keepdims = a.shape, _norm_axes(axis, a.ndim), keepdims
        return a.sum(axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        xp = backend.xp_of(grad)  # d sum(a)/da_i = 1: copy grad along the reduced axes
        return xp.broadcast_to(_expand_reduced(grad, ctx.shape, ctx.axes, ctx.keepdims), ctx.shape)


def sum(a, axis=None, keepdims=False):  # noqa: A001
    return Sum.apply(a, axis=axis, keepdims=keepdims)


class Mean(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        ctx.shape, ctx.axes, ctx.keepdims = a.shape, _norm_axes(axis, a.ndim), keepdims
        ctx.count = 1
        for i in ctx.axes:
            ctx.count *= a.shape[i]
        return a.mean(axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        xp = backend.xp_of(grad)  # d mean(a)/da_i = 1/n over the n reduced entries
        g = _expand_reduced(grad, ctx.shape, ctx.axes, ctx.keepdims) / ctx.count
        return xp.broadcast_to(g, ctx.shape)


def mean(a, axis=None, keepdims=False):
    return Mean.apply(a, axis=axis, keepdims=keepdims)


class Max(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        axes = _norm_axes(axis, a.ndim)
        out = a.max(axis=axes, keepdims=True)
        ctx.save_for_backward(a, out)
        ctx.axes, ctx.keepdims = axes, keepdims
        return out if keepdims else out.reshape(tuple(n for i, n in enumerate(a.shape) if i not in axes))

    @staticmethod
    def backward(ctx, grad):
        a, out = ctx.saved  # d max(a)/da_i = [a_i is the max] / (number of tied maxima)
        mask = (a == out).astype(grad.dtype)
        mask /= mask.sum(axis=ctx.axes, keepdims=True)
        return mask * _expand_reduced(grad, a.shape, ctx.axes, ctx.keepdims)


def max(a, axis=None, keepdims=False):  # noqa: A001
    return Max.apply(a, axis=axis, keepdims=keepdims)


# ---------------------------------------------------------------- shape and movement


class Reshape(Function):
    @staticmethod
    def forward(ctx, a, shape):
        ctx.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"cannot reshape a tensor of shape {a.shape} ({a.size} elements) to {shape}") from None

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape)  # reshape only moves entries: its adjoint reshapes back


def reshape(a, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape.apply(a, shape=shape)


class Transpose(Function):
    @staticmethod
    def forward(ctx, a, axes):
        if axes is None:
            axes = tuple(reversed(range(a.ndim)))
        if sorted(a_ % a.ndim for a_ in axes) != list(range(a.ndim)):
            raise ValueError(f"transpose axes {axes} are not a permutation of the {a.ndim} axes of shape {a.shape}")
        ctx.axes = tuple(a_ % a.ndim for a_ in axes)
        return a.transpose(ctx.axes)

    @staticmethod
    def backward(ctx, grad):
        inverse = [0] * len(ctx.axes)  # a permutation's adjoint is its inverse permutation
        for i, a in enumerate(ctx.axes):
            inverse[a] = i
        return grad.transpose(inverse)


def transpose(a, *axes):
    """Permute axes (all reversed when none are given), like numpy.transpose."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return Transpose.apply(a, axes=axes or None)


permute = transpose


class GetItem(Function):
    """Basic indexing and slicing, and integer-array (gather) indexing."""

    @staticmethod
    def forward(ctx, a, index):
        ctx.shape, ctx.dtype, ctx.index = a.shape, a.dtype, index
        return a[index]

    @staticmethod
    def backward(ctx, grad):
        xp = backend.xp_of(grad)  # d a[idx]/da scatters grad back to the picked entries
        out = xp.zeros(ctx.shape, dtype=grad.dtype)
        xp.add.at(out, ctx.index, grad)  # add.at: repeated indices accumulate (cupy-safe too)
        return out


def getitem(a, index):
    def on_device(i):  # host index arrays go to a's backend once: the backward's add.at needs them there too
        i = i.data if isinstance(i, Tensor) else i
        if isinstance(a, Tensor) and backend.is_array(i) and backend.xp_of(i) is not backend.xp_of(a.data):
            return backend.xp_of(a.data).asarray(backend.to_numpy(i))
        return i
    index = tuple(on_device(i) for i in index) if isinstance(index, tuple) else on_device(index)
    return GetItem.apply(a, index=index)


class Concatenate(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        xp = backend.xp_of(*arrays)
        ctx.axis = axis
        ctx.sizes = [a.shape[axis] for a in arrays]
        return xp.concatenate(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        xp = backend.xp_of(grad)  # concat's adjoint splits grad back into the pieces
        cuts = []
        total = 0
        for n in ctx.sizes[:-1]:
            total += n
            cuts.append(total)
        return tuple(xp.split(grad, cuts, axis=ctx.axis))


def concatenate(tensors, axis=0):
    return Concatenate.apply(*tensors, axis=axis)


class Stack(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        ctx.axis = axis
        return backend.xp_of(*arrays).stack(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        xp = backend.xp_of(grad)  # stack's adjoint unstacks grad along the new axis
        return tuple(xp.moveaxis(grad, ctx.axis, 0))


def stack(tensors, axis=0):
    return Stack.apply(*tensors, axis=axis)


class Pad(Function):
    """Constant padding: pad_width as numpy's ((before, after), ...) for every axis."""

    @staticmethod
    def forward(ctx, a, pad_width, value=0.0):
        pad_width = tuple((int(b), int(e)) for b, e in pad_width)
        if len(pad_width) != a.ndim or any(b < 0 or e < 0 for b, e in pad_width):
            raise ValueError(f"pad_width must give non-negative (before, after) for each of the {a.ndim} axes "
                             f"of shape {a.shape}; got {pad_width}")
        ctx.slices = tuple(slice(b, b + n) for (b, _), n in zip(pad_width, a.shape))
        return backend.xp_of(a).pad(a, pad_width, mode="constant", constant_values=value)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.slices]  # padding adds constants: its adjoint crops back to the input


def pad(a, pad_width, value=0.0):
    return Pad.apply(a, pad_width=pad_width, value=value)


# ---------------------------------------------------------------- softmax


class Softmax(Function):
    @staticmethod
    def forward(ctx, a, axis=-1):
        xp = backend.xp_of(a)
        e = xp.exp(a - a.max(axis=axis, keepdims=True))  # shift by the max: exp never overflows
        out = e / e.sum(axis=axis, keepdims=True)
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved  # dL/da = s * (g - sum(g * s)): the softmax Jacobian diag(s) - s s^T applied to g
        return s * (grad - (grad * s).sum(axis=ctx.axis, keepdims=True))


def softmax(a, axis=-1):
    return Softmax.apply(a, axis=axis)


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, a, axis=-1):
        xp = backend.xp_of(a)
        shifted = a - a.max(axis=axis, keepdims=True)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved  # dL/da = g - softmax(a) * sum(g)
        xp = backend.xp_of(out)
        return grad - xp.exp(out) * grad.sum(axis=ctx.axis, keepdims=True)


def log_softmax(a, axis=-1):
    return LogSoftmax.apply(a, axis=axis)


# ---------------------------------------------------------------- Tensor operator table
# Bound here, one line each, so that tensor.py never imports ops.py and `grep __matmul__` finds it.

Tensor.__add__ = add
Tensor.__radd__ = lambda self, other: add(other, self)
Tensor.__sub__ = sub
Tensor.__rsub__ = lambda self, other: sub(other, self)
Tensor.__mul__ = mul
Tensor.__rmul__ = lambda self, other: mul(other, self)
Tensor.__truediv__ = div
Tensor.__rtruediv__ = lambda self, other: div(other, self)
Tensor.__neg__ = neg
Tensor.__pow__ = pow
Tensor.__matmul__ = matmul
Tensor.__rmatmul__ = lambda self, other: matmul(other, self)
Tensor.__getitem__ = getitem
Tensor.exp = exp
Tensor.log = log
Tensor.sqrt = sqrt
Tensor.tanh = tanh
Tensor.sigmoid = sigmoid
Tensor.abs = abs
Tensor.clip = clip
Tensor.sum = sum
Tensor.mean = mean
Tensor.max = max
Tensor.reshape = reshape
Tensor.transpose = transpose
Tensor.permute = transpose
Tensor.T = property(lambda self: transpose(self))
Tensor.softmax = softmax
Tensor.log_softmax = log_softmax
