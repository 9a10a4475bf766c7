"""Every primitive op: forward against NumPy, backward against float64 finite differences.

Shapes come from hypothesis, including broadcasting and size-1 axes. Each test takes
the `backend_name` fixture, so on a machine with a GPU the same checks run on cupy.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minidiff import backend, ops, testing
from minidiff.tensor import Tensor

small_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)
pairs = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, min_side=1, max_side=3)


def values(shape, seed, low=-2.0, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, shape)


def away_from_zero(shape, seed):
    """Values in +-[0.5, 2]: keeps 1/b, log and |a| away from their singular points and kinks."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)


seeds = st.integers(0, 2**16)


def check_gradients(fn, *arrays):
    """Finite-difference check of every input entry (float64), then the forward output for value checks."""
    testing.check_gradients(fn, arrays)
    return fn(*(Tensor(backend.xp().asarray(a)) for a in arrays))


@pytest.mark.parametrize("op, np_op", [(ops.add, np.add), (ops.sub, np.subtract), (ops.mul, np.multiply),
                                       (lambda a, b: a + b, np.add), (lambda a, b: a * b, np.multiply),
                                       (lambda a, b: a - b, np.subtract)])
@given(shapes=pairs, seed=seeds)
def test_binary_broadcasting(backend_name, op, np_op, shapes, seed):
    a, b = values(shapes.input_shapes[0], seed), values(shapes.input_shapes[1], seed + 1)
    out = check_gradients(op, a, b)
    np.testing.assert_allclose(out.numpy(), np_op(a, b))


@given(shapes=pairs, seed=seeds)
def test_div(backend_name, shapes, seed):
    a, b = values(shapes.input_shapes[0], seed), away_from_zero(shapes.input_shapes[1], seed + 1)
    out = check_gradients(lambda x, y: x / y, a, b)
    np.testing.assert_allclose(out.numpy(), a / b)


@given(shapes=pairs, seed=seeds)
def test_maximum(backend_name, shapes, seed):
    a, b = values(shapes.input_shapes[0], seed), values(shapes.input_shapes[1], seed + 1)
    check_gradients(ops.maximum, a, b)


@given(shape=small_shapes, seed=seeds)
def test_where(backend_name, shape, seed):
    cond = np.random.default_rng(seed).random(shape) > 0.5
    a, b = values(shape, seed), values(shape[-1:], seed + 1)  # b broadcasts
    out = check_gradients(lambda x, y: ops.where(Tensor(backend.to_active(cond)), x, y), a, b)
    np.testing.assert_allclose(out.numpy(), np.where(cond, a, b))


@pytest.mark.parametrize("name, fn, np_fn, domain", [
    ("neg", ops.neg, np.negative, values),
    ("exp", ops.exp, np.exp, values),
    ("log", ops.log, np.log, lambda s, seed: np.abs(away_from_zero(s, seed))),
    ("sqrt", ops.sqrt, np.sqrt, lambda s, seed: np.abs(away_from_zero(s, seed))),
    ("tanh", ops.tanh, np.tanh, values),
    ("sigmoid", ops.sigmoid, lambda x: 1 / (1 + np.exp(-x)), values),
    ("abs", ops.abs, np.abs, away_from_zero),
    ("square", lambda x: x ** 2, np.square, values),
    ("cube", lambda x: ops.pow(x, 3), lambda x: x ** 3, values),
    ("pow -1.5", lambda x: x ** -1.5, lambda x: x ** -1.5, lambda s, seed: np.abs(away_from_zero(s, seed))),
    ("clip", lambda x: ops.clip(x, -1.0, 0.5), lambda x: np.clip(x, -1.0, 0.5),
     lambda s, seed: np.random.default_rng(seed).choice([-1.7, -0.3, 0.2, 1.4], s)),
])
@given(shape=small_shapes, seed=seeds)
def test_unary(backend_name, name, fn, np_fn, domain, shape, seed):
    x = domain(shape, seed)
    out = check_gradients(fn, x)
    np.testing.assert_allclose(out.numpy(), np_fn(x), rtol=1e-12)


@given(batch=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=3),
       n=st.integers(1, 3), k=st.integers(1, 3), m=st.integers(1, 3), seed=seeds)
def test_matmul_batched_broadcasting(backend_name, batch, n, k, m, seed):
    a = values(batch.input_shapes[0] + (n, k), seed)
    b = values(batch.input_shapes[1] + (k, m), seed + 1)
    out = check_gradients(lambda x, y: x @ y, a, b)
    np.testing.assert_allclose(out.numpy(), a @ b, rtol=1e-12)


def axis_choices(ndim):
    return st.one_of(st.none(), st.integers(-ndim, ndim - 1),
                     st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple))


@pytest.mark.parametrize("op, np_op", [(ops.sum, np.sum), (ops.mean, np.mean), (ops.max, np.max)])
@given(shape=small_shapes, seed=seeds, keepdims=st.booleans(), data=st.data())
def test_reductions(backend_name, op, np_op, shape, seed, keepdims, data):
    axis = data.draw(axis_choices(len(shape)))
    x = np.random.default_rng(seed).permutation(np.arange(int(np.prod(shape)), dtype=np.float64)).reshape(shape) / 7
    out = check_gradients(lambda t: op(t, axis=axis, keepdims=keepdims), x)
    np.testing.assert_allclose(out.numpy(), np_op(x, axis=axis, keepdims=keepdims))


def test_max_splits_the_gradient_between_ties(backend_name):
    x = Tensor([[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]], requires_grad=True)
    ops.max(x, axis=1).sum().backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])


@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=3), seed=seeds)
def test_reshape_and_transpose(backend_name, shape, seed):
    x = values(shape, seed)
    perm = tuple(np.random.default_rng(seed).permutation(len(shape)))
    out = check_gradients(lambda t: t.transpose(*perm).reshape(-1, 1) * 1.5, x)
    np.testing.assert_allclose(out.numpy(), x.transpose(perm).reshape(-1, 1) * 1.5)
    check_gradients(lambda t: ops.permute(t, perm), x)
    check_gradients(lambda t: t.T, x)


@pytest.mark.parametrize("index", [
    0, -1, slice(1, 3), slice(None, None, -2), (slice(None), 1), (Ellipsis, slice(0, 1)),
    (None, 2), np.array([0, 2, 2, 1]), (np.array([0, 1, 1]), np.array([2, 0, 0])),
])
def test_getitem(backend_name, index):
    x = values((3, 4), 0)
    out = check_gradients(lambda t: t[index], x)
    np.testing.assert_allclose(out.numpy(), x[index])


@given(shapes=st.lists(st.integers(1, 3), min_size=1, max_size=3), seed=seeds, axis=st.integers(0, 1))
def test_concatenate_and_stack(backend_name, shapes, seed, axis):
    pieces = [values((2, n) if axis == 1 else (n, 2), seed + i) for i, n in enumerate(shapes)]
    out = check_gradients(lambda *ts: ops.concatenate(ts, axis=axis), *pieces)
    np.testing.assert_allclose(out.numpy(), np.concatenate(pieces, axis=axis))
    same = [values((2, 3), seed + i) for i in range(len(shapes))]
    out = check_gradients(lambda *ts: ops.stack(ts, axis=axis), *same)
    np.testing.assert_allclose(out.numpy(), np.stack(same, axis=axis))


@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=3), seed=seeds, data=st.data())
def test_pad(backend_name, shape, seed, data):
    widths = tuple(data.draw(st.tuples(st.integers(0, 2), st.integers(0, 2))) for _ in shape)
    x = values(shape, seed)
    out = check_gradients(lambda t: ops.pad(t, widths, value=0.5), x)
    np.testing.assert_allclose(out.numpy(), np.pad(x, widths, constant_values=0.5))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@given(shape=small_shapes, seed=seeds, data=st.data())
def test_softmax_family(backend_name, op, shape, seed, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = values(shape, seed, -5, 5)
    out = check_gradients(lambda t: getattr(ops, op)(t, axis=axis), x)
    reference = np.exp(x - x.max(axis=axis, keepdims=True))
    reference /= reference.sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(out.numpy(), reference if op == "softmax" else np.log(reference), rtol=1e-10, atol=1e-12)


def test_softmax_does_not_overflow():
    out = ops.softmax(Tensor(np.array([1000.0, 0.0, -1000.0])))
    np.testing.assert_allclose(out.numpy(), [1.0, 0.0, 0.0])


def test_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 3\)"):
        Tensor(np.ones((2, 3))) @ Tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 2\)"):
        ops.reshape(Tensor(np.ones((2, 3))), 4, 2)
    with pytest.raises(ValueError, match="out of range"):
        ops.sum(Tensor(np.ones((2, 3))), axis=2)
    with pytest.raises(ValueError, match="permutation"):
        ops.transpose(Tensor(np.ones((2, 3))), 0, 0)
    with pytest.raises(TypeError, match="constant"):
        Tensor([2.0]) ** Tensor([2.0])


def test_numpy_arrays_on_the_left_defer_to_tensor():
    t = Tensor(np.ones(3), requires_grad=True)
    out = np.full(3, 2.0) * t + np.ones(3)
    assert isinstance(out, Tensor)
    out.sum().backward()
    np.testing.assert_array_equal(t.grad, [2.0, 2.0, 2.0])
