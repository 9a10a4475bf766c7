"""Tensor and the autograd engine: graph walking, accumulation, no_grad, errors, dtype policy."""
import sys

import numpy as np
import pytest

import minidiff
from minidiff import ops
from minidiff.tensor import Function, Tensor, no_grad


def test_a_10000_op_chain_backpropagates_without_recursion():
    assert sys.getrecursionlimit() < 10_000
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, np.full(2, 1.0001 ** 10_000), rtol=1e-9)


def test_reused_tensor_accumulates_both_terms():
    x = Tensor(np.array([3.0]), requires_grad=True)
    (x * x + x).sum().backward()  # d(x^2 + x)/dx = 2x + 1
    np.testing.assert_allclose(x.grad, [7.0])


def test_diamond_graph_visits_each_node_once():
    x = Tensor(np.array([2.0]), requires_grad=True)
    a = x * 3.0
    b = a.exp() + a * a  # a used twice, x reached through both
    b.sum().backward()
    np.testing.assert_allclose(x.grad, 3 * np.exp(6.0) + 2 * 6.0 * 3)


def test_broadcast_gradients_reduce_to_the_input_shape():
    bias = Tensor(np.zeros((1, 3)), requires_grad=True)
    x = Tensor(np.ones((4, 2, 3)))
    (x + bias).sum().backward()
    assert bias.grad.shape == (1, 3)
    np.testing.assert_array_equal(bias.grad, np.full((1, 3), 8.0))


def test_leaf_gradients_accumulate_across_backward_calls():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [5.0, 5.0])
    x.zero_grad()
    assert x.grad is None


def test_second_backward_needs_retain_graph():
    x = Tensor(np.array([1.0]), requires_grad=True)
    y = (x.exp() * 2.0).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 4 * np.exp(1.0))
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_explicit_output_gradient():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * x).backward(np.array([1.0, 10.0]))
    np.testing.assert_array_equal(x.grad, [2.0, 40.0])


def test_no_grad_records_nothing():
    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = x * 2.0
        assert not minidiff.is_grad_enabled()
    assert minidiff.is_grad_enabled()
    assert not y.requires_grad and y._parents == ()
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_detach_cuts_the_graph():
    x = Tensor(np.ones(2), requires_grad=True)
    y = (x * 2.0).detach() * x
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 2.0])


def test_backward_on_a_non_scalar_names_the_shape():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"\(2, 3\)"):
        (x * 2.0).backward()


def test_backward_with_a_mismatched_gradient_names_both_shapes():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)"):
        (x * 2.0).backward(np.ones((3, 2)))


@pytest.mark.parametrize("data, fragment", [("abc", "str"), (None, "NoneType"), ({"a": 1}, "dict"),
                                            (["a", "b"], "numeric"), (np.array(["x"]), "numeric"),
                                            (np.array([1 + 2j]), "complex"), ([[1.0], [2.0, 3.0]], "ragged")])
def test_non_numeric_data_is_rejected_by_type(data, fragment):
    with pytest.raises((TypeError, ValueError), match=fragment):
        Tensor(data)


class TestDtypePolicy:
    def test_python_numbers_and_lists_become_float32(self):
        assert Tensor(1.5).dtype == np.float32
        assert Tensor([1, 2, 3]).dtype == np.float32
        assert Tensor([[1.0, 2.0]]).dtype == np.float32

    def test_arrays_keep_their_float_dtype_and_float16_widens(self):
        assert Tensor(np.ones(2, dtype=np.float64)).dtype == np.float64
        assert Tensor(np.ones(2, dtype=np.float32)).dtype == np.float32
        assert Tensor(np.ones(2, dtype=np.float16)).dtype == np.float32

    def test_integer_arrays_stay_integer_and_cannot_require_grad(self):
        t = Tensor(np.arange(3))
        assert t.dtype.kind == "i"
        with pytest.raises(TypeError, match="floating"):
            Tensor(np.arange(3), requires_grad=True)

    def test_python_scalars_never_promote(self):
        x = Tensor(np.ones(2, dtype=np.float32), requires_grad=True)
        y = (x * 2.0 + 1.0) / 3.0 - 0.5
        assert (y ** 2).dtype == np.float32
        y.sum().backward()
        assert x.grad.dtype == np.float32

    def test_mixing_float32_and_float64_gives_float64(self):
        a = Tensor(np.ones(2, dtype=np.float32))
        b = Tensor(np.ones(2, dtype=np.float64))
        assert (a + b).dtype == np.float64 and (a * b).dtype == np.float64

    def test_numpy_scalars_keep_their_dtype(self):
        assert Tensor(np.float32(0.1)).dtype == np.float32 and Tensor(np.float64(0.1)).shape == ()

    def test_explicit_dtype(self):
        assert Tensor([1.0], dtype=np.float64).dtype == np.float64


def test_custom_function_only_gets_inputs_that_need_gradients():
    calls = {}

    class Scale(Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return a * b

        @staticmethod
        def backward(ctx, grad):
            calls["needs"] = ctx.needs_input_grad
            a, b = ctx.saved
            return grad * b, grad * a

    x = Tensor(np.ones(2), requires_grad=True)
    Scale.apply(x, Tensor(np.full(2, 3.0))).sum().backward()
    assert calls["needs"] == (True, False)
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])


def test_item_and_repr():
    t = Tensor([[2.5]])
    assert t.item() == 2.5 and "shape=(1, 1)" in repr(t)
    with pytest.raises(ValueError, match="one element"):
        Tensor([1.0, 2.0]).item()


def test_intermediate_gradients_are_not_kept():
    x = Tensor(np.ones(2), requires_grad=True)
    h = x * 2.0
    ops.sum(h * h).backward()
    assert h.grad is None and x.grad is not None


def test_leaf_gradients_are_writable_and_never_shared():
    a = Tensor(np.ones(3), requires_grad=True)
    b = Tensor(np.ones(3), requires_grad=True)
    (a + b).sum().backward()  # add hands the same upstream array to both inputs
    a.grad *= 0.5  # an optimizer clipping in place must not touch b's gradient
    np.testing.assert_array_equal(b.grad, [1.0, 1.0, 1.0])
    c = Tensor(np.ones((2, 2)), requires_grad=True)
    c.sum().backward()  # sum's backward is a broadcast view
    c.grad *= 2.0
    np.testing.assert_array_equal(c.grad, np.full((2, 2), 2.0))


def test_backward_moves_a_host_gradient_to_a_device_tensor(standin):
    from minidiff import backend
    x = Tensor(standin.asarray(np.ones(3, np.float32)), requires_grad=True)
    (x * 2.0).backward(grad=np.array([1.0, 2.0, 3.0], np.float32))
    assert isinstance(x.grad, standin.ndarray)
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [2.0, 4.0, 6.0])
