"""normal_kl and the discretised Gaussian decoder (Eq. 13), on arrays and on Tensors.

Oracles: the closed form of a Gaussian KL at known values, hand-derived gradients, the
exact normal CDF (math.erf) against the tanh approximation, and the telescoping sum over bins.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.diffusion import GaussianDiffusion
from minidiff.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from minidiff.schedule import get_named_beta_schedule
from minidiff.tensor import Tensor
from strategies import finite_arrays

hsettings = settings(deadline=None)

gaussians = st.tuples(st.floats(-3, 3), st.floats(-4, 4))  # (mean, log-variance)


# ---------------------------------------------------------------- normal_kl


def test_normal_kl_known_value():
    """KL(N(0, 1) || N(1, 4)) = log 2 + (1 + 1) / 8 - 1/2."""
    value = normal_kl(np.array([0.0]), np.array([0.0]), np.array([1.0]), np.array([math.log(4.0)]))
    assert value[0] == pytest.approx(math.log(2.0) + 0.25 - 0.5, rel=1e-12)


@hsettings
@given(gaussians, gaussians)
def test_normal_kl_is_nonnegative_and_zero_only_for_equal_gaussians(p, q):
    (m1, lv1), (m2, lv2) = p, q
    kl = float(normal_kl(np.array(m1), np.array(lv1), np.array(m2), np.array(lv2)))
    same = float(normal_kl(np.array(m1), np.array(lv1), np.array(m1), np.array(lv1)))
    assert kl >= -1e-12 and same == pytest.approx(0.0, abs=1e-12)
    # Second-order lower bound: KL >= (m1-m2)^2 / (2 var2) and KL >= the variance-only term.
    var_only = 0.5 * (lv2 - lv1 + math.exp(lv1 - lv2) - 1)
    assert kl >= var_only - 1e-12 and kl >= 0.5 * (m1 - m2) ** 2 * math.exp(-lv2) - 1e-12
    if abs(m1 - m2) > 1e-3 or abs(lv1 - lv2) > 1e-3:
        assert kl > 0


def test_normal_kl_takes_python_numbers_and_broadcasts():
    mean = np.zeros((2, 3), np.float32)
    logvar = np.full((2, 1), -1.0, np.float32)
    kl = normal_kl(mean, logvar, 0.0, 0.0)
    assert kl.shape == (2, 3) and kl.dtype == np.float32  # numbers never promote float32
    np.testing.assert_allclose(kl, 0.5 * (-1 + 0 - (-1) + math.exp(-1)), rtol=1e-6)  # KL(N(0, e^-1) || N(0, 1))


def test_normal_kl_on_tensors_has_the_right_gradient():
    """d KL / d mean2 = (mean2 - mean1) / var2; d KL / d logvar2 = (1 - var1 / var2 - (m1 - m2)^2 / var2) / 2."""
    rng = np.random.default_rng(0)
    m1, lv1 = rng.standard_normal(5), rng.standard_normal(5)
    m2 = Tensor(rng.standard_normal(5), requires_grad=True)
    lv2 = Tensor(rng.standard_normal(5), requires_grad=True)
    kl = normal_kl(m1, lv1, m2, lv2)
    assert isinstance(kl, Tensor)
    np.testing.assert_allclose(kl.data, normal_kl(m1, lv1, m2.data, lv2.data), rtol=1e-14)
    kl.sum().backward()
    var2 = np.exp(lv2.data)
    np.testing.assert_allclose(m2.grad, (m2.data - m1) / var2, rtol=1e-12)
    np.testing.assert_allclose(lv2.grad, 0.5 * (1 - np.exp(lv1) / var2 - (m1 - m2.data) ** 2 / var2), rtol=1e-10)


# ---------------------------------------------------------------- the discretised decoder


def test_tanh_cdf_is_close_to_the_exact_normal_cdf():
    z = np.linspace(-6, 6, 241)
    exact = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in z])
    np.testing.assert_allclose(approx_standard_normal_cdf(Tensor(z)).data, exact, atol=2e-4)


@hsettings
@given(st.floats(-1.5, 1.5), st.floats(-7, 1), st.sampled_from([256, 16, 2]))
def test_probabilities_of_all_bins_sum_to_one(mean, log_scale, num_bins):
    """The bins tile the real line, so the CDF differences telescope to 1 for any mean and scale.

    atol: each of the num_bins logs is floored at 1e-12, adding at most num_bins * 1e-12.
    """
    x = np.linspace(-1.0, 1.0, num_bins)
    logp = discretized_gaussian_log_likelihood(x, np.full_like(x, mean), np.full_like(x, log_scale), num_bins)
    assert np.all(logp <= 1e-12)
    assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-9)


def test_interior_bins_have_width_two_over_255():
    """For a wide Gaussian, P(bin) ~ density * 2/255; the edge bins hold the tails."""
    x = np.linspace(-1.0, 1.0, 256)
    mean, scale = 0.1, 0.5
    p = np.exp(discretized_gaussian_log_likelihood(x, np.full_like(x, mean), np.full_like(x, math.log(scale))))
    density = np.exp(-0.5 * ((x - mean) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))
    np.testing.assert_allclose(p[1:-1], density[1:-1] * 2 / 255, rtol=2e-2)  # 2%: the tanh CDF's error
    lower_tail = 0.5 * (1 + math.erf((-1 + 1 / 255 - mean) / (scale * math.sqrt(2))))
    assert p[0] == pytest.approx(lower_tail, abs=3e-4)


def test_decoder_on_tensors_is_differentiable_in_the_mean():
    """Central differences in float64 for d/d means of the summed log-likelihood."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, 12) / 127.5 - 1.0  # on the 8-bit grid, edge bins included
    x[:2] = [-1.0, 1.0]
    means, log_scales = rng.uniform(-1, 1, 12), rng.uniform(-4, -1, 12)
    m = Tensor(means.copy(), requires_grad=True)
    discretized_gaussian_log_likelihood(x, m, log_scales).sum().backward()
    h = 1e-6
    numeric = [(discretized_gaussian_log_likelihood(x, means + h * e, log_scales).sum()
                - discretized_gaussian_log_likelihood(x, means - h * e, log_scales).sum()) / (2 * h)
               for e in np.eye(12)]
    np.testing.assert_allclose(m.grad, numeric, rtol=1e-5, atol=1e-7)


@hsettings
@given(finite_arrays((4,), -1, 1))
def test_arrays_in_arrays_out_tensors_in_tensors_out(means):
    x = np.linspace(-1, 1, 4)
    out = discretized_gaussian_log_likelihood(x, means, np.full(4, -2.0))
    assert not isinstance(out, Tensor) and out.shape == (4,)
    as_tensor = discretized_gaussian_log_likelihood(x, Tensor(means), np.full(4, -2.0))
    np.testing.assert_array_equal(as_tensor.data, out)


# ---------------------------------------------------------------- the prior term L_T


@pytest.mark.parametrize("value", [-1.0, 1.0])
def test_prior_term_of_the_linear_schedule_is_about_3e_5_bits_per_dim(value):
    """L_T = KL(q(x_T | x_0) || N(0, I)) ~ alpha_bar_T / (2 ln 2) at x_0 = +-1 (Table 2's L_T ~ 0)."""
    d = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    bpd = d.prior_bpd(np.full((2, 3, 4, 4), value))
    assert bpd.shape == (2,)
    assert 2.5e-5 < bpd[0] < 3.5e-5
    assert bpd[0] == pytest.approx(d.alphas_cumprod[-1] / (2 * math.log(2)), rel=1e-3)
