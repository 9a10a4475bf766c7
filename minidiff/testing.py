"""Gradient checks shared by the test suite: finite differences in float64 against autograd.

`check_gradients` perturbs every entry (cheap shapes: primitives, small convs);
`check_backward` perturbs along one random direction (Chainer's check_backward:
one backward and two forwards whatever the size: conv blocks, attention, a U-Net).
A non-scalar output is contracted with a fixed random cotangent, so the whole
Jacobian is exercised. May import: backend, tensor.
"""
from . import backend
from .tensor import Tensor

host = backend.host


def _value_and_cotangent(fn, inputs, seed):
    """fn(*inputs) and a seeded random cotangent of its shape (ones for a scalar)."""
    out = fn(*inputs)
    rng = host.random.default_rng(seed + 1)
    cot = host.ones(out.shape) if out.size == 1 else rng.standard_normal(out.shape)
    return out, cot


def _loss(fn, arrays, cot):
    """sum(fn(arrays) * cot) on the host in float64 (a GPU sync; fine in a test)."""
    xp = backend.xp()
    out = fn(*(Tensor(xp.asarray(a)) for a in arrays))
    return float((backend.to_numpy(out.data).astype(host.float64) * cot).sum())


def _analytic(fn, arrays, seed):
    """Autograd's gradients of sum(fn * cot) for every input, as float64 host arrays."""
    xp = backend.xp()
    inputs = [Tensor(xp.asarray(a), requires_grad=True) for a in arrays]
    out, cot = _value_and_cotangent(fn, inputs, seed)
    out.backward(grad=xp.asarray(cot, dtype=out.dtype))
    grads = [host.zeros(a.shape) if x.grad is None else backend.to_numpy(x.grad).astype(host.float64)
             for x, a in zip(inputs, arrays)]
    return grads, cot


def check_gradients(fn, arrays, eps=1e-6, rtol=1e-5, atol=1e-8, seed=0):
    """Compare autograd with central differences entry by entry.

    fn maps Tensors to a Tensor; `arrays` are float64 host arrays, moved to the
    active backend. Costs two forwards per entry: keep the shapes small. Returns None;
    a mismatch raises numpy.testing's AssertionError naming the input (tests/test_testing.py).
    """
    arrays = [host.asarray(a, dtype=host.float64) for a in arrays]
    analytic, cot = _analytic(fn, arrays, seed)
    for n, (a, grad) in enumerate(zip(arrays, analytic)):
        numeric = host.zeros_like(a)
        for idx in host.ndindex(a.shape):
            moved = [b.copy(order="K") for b in arrays]       # keep each input's memory layout
            moved[n][idx] += eps
            plus = _loss(fn, moved, cot)
            moved[n][idx] -= 2 * eps
            numeric[idx] = (plus - _loss(fn, moved, cot)) / (2 * eps)
        host.testing.assert_allclose(grad, numeric, rtol=rtol, atol=atol,
                                     err_msg=f"gradient of input {n} (shape {a.shape})")


def check_backward(fn, arrays, eps=1e-6, rtol=1e-5, atol=1e-8, seed=0):
    """Compare autograd with a central difference along one random direction (all inputs at once).

    Returns None; a mismatch raises AssertionError. One direction can miss an error orthogonal to
    it only by chance (probability zero for a random direction), but cannot say which input is wrong.
    """
    arrays = [host.asarray(a, dtype=host.float64) for a in arrays]
    rng = host.random.default_rng(seed)
    directions = [rng.standard_normal(a.shape) for a in arrays]
    analytic, cot = _analytic(fn, arrays, seed)
    along = sum(float((g * d).sum()) for g, d in zip(analytic, directions))
    plus = _loss(fn, [a + eps * d for a, d in zip(arrays, directions)], cot)
    minus = _loss(fn, [a - eps * d for a, d in zip(arrays, directions)], cot)
    host.testing.assert_allclose(along, (plus - minus) / (2 * eps), rtol=rtol, atol=atol)
