"""The strict CuPy stand-in itself: it must refuse what CuPy refuses, or the cupy tests prove nothing."""
import os

import numpy as np
import pytest

import strict_cupy as cp
from minidiff.tensor import Tensor

IN_CI = os.environ.get("CI", "").lower() == "true"


def test_device_arrays_refuse_implicit_conversion_to_numpy():
    a = cp.asarray(np.arange(3.0))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.testing.assert_allclose(a, [0.0, 1.0, 2.0])
    assert np.array_equal(a.get(), [0.0, 1.0, 2.0]) and np.array_equal(cp.asnumpy(a), [0.0, 1.0, 2.0])


def test_mixing_host_and_device_arrays_raises_everywhere():
    a, h = cp.ones(3), np.ones(3)
    for mix in (lambda: a + h, lambda: h + a, lambda: a * h, lambda: cp.add(a, h), lambda: np.add(h, a),
                lambda: cp.where(a > 0, a, h), lambda: cp.concatenate([a, h]), lambda: a.__setitem__(0, h[:1])):
        with pytest.raises(TypeError):
            mix()
    b = cp.zeros(3)
    cp.add.at(b, cp.asarray(np.array([0, 0, 2])), 1.0)  # ufunc.at exists and accumulates repeats
    assert b.get().tolist() == [2.0, 0.0, 1.0]


def test_reductions_give_0d_device_arrays_and_numbers_need_a_sync():
    a = cp.asarray(np.arange(4.0))
    for r in (a.sum(), a.max(), cp.sqrt(cp.vdot(a, a)), a[1]):
        assert isinstance(r, cp.ndarray) and r.shape == ()
    cp.reset()
    assert float(a.sum()) == 6.0 and cp.counts["syncs"] == 1


def test_array_ufunc_none_defers_to_the_other_type_as_cupy_does():
    out = cp.ones(2) * Tensor(cp.ones(2))
    assert isinstance(out, Tensor)


def test_get_array_module_as_strided_and_data_behave_as_in_cupy():
    a = cp.arange(6.0)
    assert cp.get_array_module(a) is cp and cp.get_array_module(np.ones(1)) is np
    w = cp.lib.stride_tricks.as_strided(a, shape=(2, 3), strides=(a.strides[0] * 3, a.strides[0]))
    assert isinstance(w, cp.ndarray) and w.get().tolist() == [[0, 1, 2], [3, 4, 5]]
    assert not isinstance(a.data, (np.ndarray, cp.ndarray))  # a device pointer, as on CuPy


def test_host_to_device_bytes_and_operations_are_counted():
    cp.reset()
    a = cp.asarray(np.zeros(10, np.float32))
    b = a + 1
    b *= 2
    assert cp.counts["h2d_bytes"] == 40 and cp.counts["ops"] == 3
    c = cp.zeros(4)
    c[0] = 1.0
    assert cp.counts["writes"] == 1 and cp.counts["h2d_bytes"] == 40  # a Python scalar is a kernel argument


def test_only_names_that_exist_in_cupy():
    """A real CuPy imports without a GPU; CI installs one, so there the names are always checked."""
    if cp.NAMES is None:
        if IN_CI:
            pytest.fail("CI must install cupy-cuda12x (see .ci/run): without it the stand-in cannot check names")
        pytest.skip("CuPy is not installed here, so the stand-in cannot check names against it "
                    "(pip install cupy-cuda12x: it imports without a GPU)")
    assert cp.check_own_names() == []
    with pytest.raises(AttributeError, match="'errstate'.*real CuPy"):
        cp.errstate  # NumPy has it, CuPy does not
    with pytest.raises(AttributeError, match="'tobytes_missing'|'newbyteorder'"):
        cp.ones(2).newbyteorder()
    with pytest.raises(AttributeError, match="cupy.random"):
        cp.random.Generator_does_not_exist
    assert cp.lib.stride_tricks.as_strided is not None and cp.add.at is not None
