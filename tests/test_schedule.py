"""Named schedules, validation, respacing, and the identities that tie the coefficient tables together.

Oracles: the formulas written out independently here (improved-diffusion's cosine loop, the
one-step recursion of Eq. 2), in float64. Tolerances carry their reason.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.diffusion import GaussianDiffusion
from minidiff.schedule import (NAMES, check_betas, get_named_beta_schedule, respace_betas,
                               space_timesteps)
from strategies import betas_arrays, random_betas

hsettings = settings(deadline=None)


# ---------------------------------------------------------------- the named schedules


def test_linear_is_the_papers_schedule_for_any_length():
    """Ho et al. Sec. 4: beta from 1e-4 to 0.02, linearly, for every T (no improved-diffusion 1000 / T rescaling)."""
    for T in (2, 100, 1000, 4000):
        betas = get_named_beta_schedule("linear", T)
        assert betas.dtype == np.float64 and betas.shape == (T,)
        assert betas[0] == pytest.approx(1e-4, rel=1e-12) and betas[-1] == pytest.approx(0.02, rel=1e-12)
        np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1), rtol=1e-9)


def test_quad_and_sigmoid_follow_their_formulas():
    T = 500
    quad = get_named_beta_schedule("quad", T)
    np.testing.assert_allclose(np.sqrt(quad), np.linspace(0.01, math.sqrt(0.02), T), rtol=1e-12)
    sig = get_named_beta_schedule("sigmoid", T)
    u = np.linspace(-6, 6, T)
    expected = [1e-4 + (0.02 - 1e-4) / (1 + math.exp(-v)) for v in u]
    np.testing.assert_allclose(sig, expected, rtol=1e-12)
    assert np.all(np.diff(sig) > 0) and 1e-4 < sig[0] < sig[-1] < 0.02


@pytest.mark.parametrize("T", [10, 1000, 4000])
def test_cosine_matches_improved_diffusions_loop(T):
    """Nichol & Dhariwal 2021, Eq. 17, as improved-diffusion's betas_for_alpha_bar writes it."""
    def alpha_bar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    np.testing.assert_allclose(get_named_beta_schedule("cosine", T), expected, rtol=1e-9)


def test_cosine_alpha_bar_is_eq_17_until_the_clip():
    """prod(1 - beta) telescopes to f(t / T) / f(0) wherever beta was not clipped at 0.999."""
    T = 1000
    betas = get_named_beta_schedule("cosine", T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    unclipped = np.flatnonzero(np.cumsum(betas >= 0.999) == 0)   # before the first clipped step
    assert unclipped.size > 990
    expected = [f((t + 1) / T) / f(0) for t in unclipped]
    np.testing.assert_allclose(np.cumprod(1 - betas)[unclipped], expected, rtol=1e-9)


@pytest.mark.parametrize("name", ["nope", "Linear", ""])
def test_unknown_names_raise_and_list_the_known_ones(name):
    with pytest.raises(ValueError, match="linear"):
        get_named_beta_schedule(name, 10)


@pytest.mark.parametrize("T,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_lengths_raise(T, error):
    with pytest.raises(error, match="num_timesteps"):
        get_named_beta_schedule("linear", T)


@pytest.mark.parametrize("betas", [[0.1, 0.0], [1.0, 0.1], [0.1, 1.0, 0.2], [0.1, 1.5], [0.1, -0.2],
                                   [0.1, float("nan")], [1.5], [], [[0.1, 0.2]]])
def test_invalid_user_betas_are_rejected(betas):
    with pytest.raises(ValueError, match="beta"):
        check_betas(np.array(betas))
    with pytest.raises(ValueError, match="beta"):
        GaussianDiffusion(np.array(betas))


def test_valid_user_betas_become_float64():
    betas = check_betas([0.1, 0.2])
    assert betas.dtype == np.float64 and betas.tolist() == [0.1, 0.2]
    assert GaussianDiffusion(np.array([0.1, 0.2], dtype=np.float32)).betas.dtype == np.float64


def test_diffusion_rejects_unknown_types_and_a_single_step():
    betas = get_named_beta_schedule("linear", 10)
    for kwargs in ({"model_mean_type": "mu"}, {"model_var_type": "learned"}, {"loss_type": "l1"}):
        with pytest.raises(ValueError, match=list(kwargs)[0]):
            GaussianDiffusion(betas, **kwargs)
    with pytest.raises(ValueError, match="2 timesteps"):
        GaussianDiffusion([0.1])


# ---------------------------------------------------------------- identities (hypothesis)


@hsettings
@given(betas_arrays)
def test_alpha_bar_is_the_running_product_and_decreases_strictly(betas):
    d = GaussianDiffusion(betas)
    running, expected = 1.0, []
    for beta in betas:
        running *= 1.0 - beta
        expected.append(running)
    np.testing.assert_allclose(d.alphas_cumprod, expected, rtol=1e-12)
    assert np.all(np.diff(d.alphas_cumprod) < 0)
    assert d.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_array_equal(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])


@hsettings
@given(betas_arrays)
def test_composing_one_step_transitions_gives_q_xt_given_x0(betas):
    """t steps of q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Eq. 2) compose to Eq. 4.

    Mean coefficient: the product of sqrt(alpha_s); variance: v_t = alpha_t v_{t-1} + beta_t.
    rel=1e-9, not 1e-12: near t = 0 the variance is ~1e-4 and 1 - alpha_bar cancels (DESIGN 8).
    """
    d = GaussianDiffusion(betas)
    coef, var = 1.0, 0.0
    for t, beta in enumerate(betas):
        coef, var = coef * math.sqrt(1 - beta), (1 - beta) * var + beta
        assert coef == pytest.approx(d.sqrt_alphas_cumprod[t], rel=1e-9)
        assert var == pytest.approx(d.sqrt_one_minus_alphas_cumprod[t] ** 2, rel=1e-9)
        assert math.log(var) == pytest.approx(d.log_one_minus_alphas_cumprod[t], rel=1e-9, abs=1e-9)


@hsettings
@given(betas_arrays)
def test_posterior_variance_identity(betas):
    """1 / beta_tilde_t = 1 / (1 - alpha_bar_{t-1}) + alpha_t / beta_t (Eq. 7, as a precision sum), t >= 1."""
    d = GaussianDiffusion(betas)
    t = np.arange(1, d.num_timesteps)
    lhs = 1 / d.posterior_variance[t]
    rhs = 1 / (1 - d.alphas_cumprod[t - 1]) + (1 - betas[t]) / betas[t]
    np.testing.assert_allclose(lhs, rhs, rtol=1e-9)
    assert d.posterior_variance[0] == 0  # x_0 is known exactly given x_1 and x_0
    # The clipped log-variance repeats t = 1's value at t = 0 (original code, improved-diffusion).
    # Compared with the array's own t = 1 entry: np.log and math.log may differ in the last bit.
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]), rtol=1e-12)


@hsettings
@given(betas_arrays)
def test_posterior_mean_coefficients_are_eq_7(betas):
    """mu_tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t."""
    d = GaussianDiffusion(betas)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(d.posterior_mean_coef1, np.sqrt(abar_prev) * betas / (1 - abar), rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef2, np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar), rtol=1e-9)


def test_fixed_large_uses_beta_and_the_clipped_log_variance_at_t0():
    betas = get_named_beta_schedule("linear", 50)
    d = GaussianDiffusion(betas, model_var_type="fixed_large")
    np.testing.assert_array_equal(d.model_variance, betas)
    assert d.model_log_variance[0] == math.log(d.posterior_variance[1])
    np.testing.assert_allclose(d.model_log_variance[1:], np.log(betas[1:]), rtol=1e-14)
    small = GaussianDiffusion(betas)
    np.testing.assert_array_equal(small.model_variance, small.posterior_variance)


# ---------------------------------------------------------------- respacing


def test_space_timesteps_is_evenly_strided_with_both_ends():
    kept = space_timesteps(1000, 50)
    assert kept.shape == (50,) and kept[0] == 0 and kept[-1] == 999
    assert np.all(np.diff(kept) > 0) and set(np.diff(kept)) <= {20, 21}
    np.testing.assert_array_equal(space_timesteps(10, 10), np.arange(10))
    with pytest.raises(ValueError, match="num_steps"):
        space_timesteps(10, 11)


@hsettings
@given(random_betas, st.data())
def test_respaced_betas_keep_alpha_bar_at_the_kept_steps(betas, data):
    """Recomputing betas from the kept alpha_bars leaves q(x_t | x_0) (Eq. 4) unchanged there:
    1 - beta'_i is alpha_bar's ratio across each gap.

    Compared step by step with atol 1e-15: beta' near 1 is stored to one ulp (1.1e-16), so alpha'
    = 1 - beta' is exact only absolutely, and a running product would turn that into a relative error.
    """
    T = betas.size
    kept = space_timesteps(T, data.draw(st.integers(1, T)))
    abar = np.cumprod(1 - betas)
    ratios = abar[kept] / np.append(1.0, abar[kept][:-1])
    if np.any(1.0 - ratios == 1.0):  # a gap too wide for float64: a clear error, not beta = 1
        with pytest.raises(ValueError, match="keep more timesteps"):
            respace_betas(abar, kept)
    else:
        np.testing.assert_allclose(1 - respace_betas(abar, kept), ratios, rtol=1e-12, atol=1e-15)


def test_respacing_every_step_is_the_identity_and_maps_timesteps():
    betas = get_named_beta_schedule("cosine", 100)
    d = GaussianDiffusion(betas)
    np.testing.assert_allclose(d.respaced(100).betas, betas, rtol=1e-9)
    spaced = d.respaced(10)
    assert spaced.num_timesteps == 10
    np.testing.assert_array_equal(spaced.timestep_map, space_timesteps(100, 10))
    # rtol 1e-10: ratios then a running product, a few ulps per step.
    np.testing.assert_allclose(spaced.alphas_cumprod, d.alphas_cumprod[spaced.timestep_map], rtol=1e-10)
    twice = spaced.respaced(4)  # respacing a respaced chain composes the maps
    np.testing.assert_array_equal(twice.timestep_map, spaced.timestep_map[space_timesteps(10, 4)])


@pytest.mark.parametrize("name", NAMES)
def test_every_named_schedule_is_valid_for_tiny_and_long_chains(name):
    for T in (1, 2, 4000):
        betas = get_named_beta_schedule(name, T)
        assert betas.shape == (T,) and np.all((betas > 0) & (betas < 1))
