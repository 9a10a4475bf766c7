"""minidiff.testing's gradient checks must catch a wrong backward, not only pass a right one.

Every gradient test of the suite leans on them, so each is shown here failing (an AssertionError,
the contract of numpy.testing) on deliberately broken Functions: a wrong sign, a wrong factor, a
missing gradient, a wrong second input, and one wrong entry among many.
"""
import numpy as np
import pytest

from minidiff.tensor import Function
from minidiff.testing import check_backward, check_gradients


class Cube(Function):
    """x -> x^3, with backward 3 x^2 g times `factor` (1: right)."""

    factor = 1.0

    @classmethod
    def forward(cls, ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @classmethod
    def backward(cls, ctx, grad):
        (x,) = ctx.saved
        return (cls.factor * 3 * x ** 2 * grad,)


class WrongSign(Cube):
    factor = -1.0


class WrongFactor(Cube):
    factor = 2.0   # d(x^3)/dx taken as 6 x^2


class NoGradient(Cube):
    @classmethod
    def backward(cls, ctx, grad):
        return (None,)


class OneWrongEntry(Cube):
    """Right everywhere but the first entry: one perturbed entry of many."""

    @classmethod
    def backward(cls, ctx, grad):
        (g,) = super().backward(ctx, grad)
        g = g.copy()
        g.flat[0] *= 1.01
        return (g,)


class MulSquare(Function):
    """(a, b) -> a b^2, with d/db taken as `b_factor` a b g (2: right)."""

    b_factor = 2.0

    @classmethod
    def forward(cls, ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b ** 2

    @classmethod
    def backward(cls, ctx, grad):
        a, b = ctx.saved
        return b ** 2 * grad, cls.b_factor * a * b * grad


class MulSquareWrongB(MulSquare):
    b_factor = 1.0   # forgot the 2 of d(b^2)/db


def inputs(*shapes):
    rng = np.random.default_rng(0)
    return [rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape) for shape in shapes]


@pytest.mark.parametrize("check", [check_gradients, check_backward])
def test_a_right_backward_passes(check):
    check(Cube.apply, inputs((3, 4)))
    check(MulSquare.apply, inputs((3, 4), (3, 4)))
    check(lambda x: Cube.apply(x).sum(), inputs((5,)))   # a scalar output: cotangent 1


@pytest.mark.parametrize("check", [check_gradients, check_backward])
@pytest.mark.parametrize("wrong", [WrongSign, WrongFactor, NoGradient])
def test_a_wrong_backward_fails(check, wrong):
    with pytest.raises(AssertionError):
        check(wrong.apply, inputs((3, 4)))
    with pytest.raises(AssertionError):
        check(lambda x: wrong.apply(x).sum(), inputs((5,)))


@pytest.mark.parametrize("check", [check_gradients, check_backward])
def test_a_wrong_gradient_of_the_second_input_fails(check):
    with pytest.raises(AssertionError):
        check(MulSquareWrongB.apply, inputs((3, 4), (3, 4)))


def test_check_gradients_names_the_input_and_catches_a_single_wrong_entry():
    """Entry by entry: one gradient entry 1% off among 12 fails, and the message names input 0."""
    with pytest.raises(AssertionError, match=r"gradient of input 0 \(shape \(3, 4\)\)"):
        check_gradients(OneWrongEntry.apply, inputs((3, 4)))
    with pytest.raises(AssertionError, match=r"gradient of input 1"):
        check_gradients(MulSquareWrongB.apply, inputs((3, 4), (3, 4)))
