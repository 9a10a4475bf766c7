"""Elementwise central finite differences in float64: the oracle for every primitive's backward."""
import numpy as np

from minidiff import backend
from minidiff.tensor import Tensor


def check_gradients(fn, *arrays, eps=1e-6, rtol=1e-5, atol=1e-7, seed=0):
    """Assert that autograd's gradient of sum(fn(*inputs) * w) matches finite differences.

    `arrays` are host float64 arrays; they are moved to the active backend, so on cupy the
    same check exercises the GPU code. `w` is a fixed random weighting of the output, so
    every output entry's gradient path is tested, not just their sum.
    """
    xp = backend.xp()
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    inputs = [Tensor(xp.asarray(a), requires_grad=True) for a in arrays]
    out = fn(*inputs)
    w = np.random.default_rng(seed).standard_normal(out.shape)
    (out * Tensor(xp.asarray(w))).sum().backward()

    def loss(values):
        with_values = [Tensor(xp.asarray(v)) for v in values]
        return float((backend.to_numpy(fn(*with_values).data) * w).sum())

    for i, a in enumerate(arrays):
        numeric = np.zeros_like(a)
        for j in range(a.size):  # a test oracle: one pair of forwards per input entry
            plus = [x.copy() for x in arrays]
            minus = [x.copy() for x in arrays]
            plus[i].flat[j] += eps
            minus[i].flat[j] -= eps
            numeric.flat[j] = (loss(plus) - loss(minus)) / (2 * eps)
        analytic = backend.to_numpy(inputs[i].grad)
        assert analytic.shape == a.shape, f"input {i}: grad shape {analytic.shape} != input shape {a.shape}"
        np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol, err_msg=f"gradient of input {i}")
    return out
