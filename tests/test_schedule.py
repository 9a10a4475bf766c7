"""Named schedules, validation, respacing, and the identities that tie the coefficient tables together.

Oracles: the formulas written out independently here (improved-diffusion's cosine loop, the
one-step recursion of Eq. 2), in float64. Tolerances carry their reason.
"""
import math
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.diffusion import GaussianDiffusion
from minidiff.schedule import (NAMES, SPACINGS, check_betas, ddim_timesteps, dpm_solver_timesteps,
                               get_named_beta_schedule, karras_sigmas, rescale_zero_terminal_snr, respace_betas,
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
    for kwargs in ({"model_mean_type": "mu"}, {"model_var_type": "learnt"}, {"loss_type": "l1"}):
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


def improved_diffusion_steps(T, n):
    """improved-diffusion's space_timesteps(T, [n]) rule, step by step: a running float sum of the stride,
    each kept step Python's round() of it (half to even)."""
    stride = 1 if n <= 1 else (T - 1) / (n - 1)
    kept, cur = [], 0.0
    for _ in range(n):
        kept.append(round(cur))
        cur += stride
    return kept


@pytest.mark.parametrize("T", [50, 1000])
def test_space_timesteps_keeps_improved_diffusions_steps_for_every_n(T):
    """Ties decide: n = 21 at T = 1000 keeps 499 (the running sum 499.49999...), not round(10 * 49.95) = 500."""
    for n in range(1, T + 1):
        assert space_timesteps(T, n).tolist() == improved_diffusion_steps(T, n), n
    assert 499 in space_timesteps(1000, 21) and 500 not in space_timesteps(1000, 21)
    assert space_timesteps(T, 1).tolist() == [0]   # improved-diffusion keeps step 0 for one step


# ---------------------------------------------------------------- sampler grids (diffusers' spacings)


def exact_trailing(T, n):
    """round(T (n - k) / n) - 1, k = n-1 .. 0, in exact rational arithmetic (Python rounds Fractions half to even)."""
    return [round(Fraction(T * (n - k), n)) - 1 for k in range(n - 1, -1, -1)]


@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_every_spacing_gives_exactly_n_distinct_timesteps_or_refuses(T):
    """DDIM and DPM-Solver++ grids for every n: n distinct increasing steps in 0 .. T-1, equal to the
    spacing's formula; DPM-Solver++'s linspace and leading grids (n + 1 points, one dropped) cannot hold
    n = T steps and say so."""
    for n in range(1, T + 1):
        for spacing in SPACINGS:
            for grid_of, what in ((ddim_timesteps, "DDIM"), (dpm_solver_timesteps, "DPM-Solver++")):
                if grid_of is dpm_solver_timesteps and spacing != "trailing" and n == T:
                    refusal = re.escape(f"{what} with spacing '{spacing}' cannot place {n}")
                    with pytest.raises(ValueError, match=refusal):
                        grid_of(T, n, spacing)
                    continue
                grid = grid_of(T, n, spacing)
                assert grid.dtype == np.int64 and len(grid) == n and np.all(np.diff(grid) > 0), (what, spacing, n)
                assert grid[0] >= 0 and grid[-1] <= T - 1, (what, spacing, n)
        if n % (7 if T <= 1000 else 191) == 0 or n < 5 or n > T - 3:   # the formulas themselves, on a sample of n
            assert ddim_timesteps(T, n, "leading").tolist() == [k * (T // n) for k in range(n)]
            assert ddim_timesteps(T, n, "trailing").tolist() == exact_trailing(T, n)
            assert dpm_solver_timesteps(T, n, "trailing").tolist() == exact_trailing(T, n)
            # linspace is numpy's (diffusers'): within 1/2 of the exact k (T - 1) / (n - 1); float error may
            # decide an exact tie (x.5) either way
            exact = [Fraction(k * (T - 1), max(n - 1, 1)) for k in range(n)]
            assert all(abs(g - e) <= Fraction(1, 2) for g, e in zip(ddim_timesteps(T, n, "linspace"), exact))
            if n < T:
                assert dpm_solver_timesteps(T, n, "leading").tolist() == [k * (T // (n + 1)) for k in range(1, n + 1)]
                exact = [Fraction(k * (T - 1), n) for k in range(1, n + 1)]
                assert all(abs(g - e) <= Fraction(1, 2) for g, e in zip(dpm_solver_timesteps(T, n, "linspace"), exact))


def test_trailing_and_linspace_end_at_the_last_step_and_steps_offset_shifts_leading():
    assert ddim_timesteps(1000, 10, "trailing")[-1] == 999 and ddim_timesteps(1000, 10, "linspace")[-1] == 999
    assert ddim_timesteps(1000, 10, "leading")[-1] == 900
    assert ddim_timesteps(1000, 10, "leading", steps_offset=1).tolist() == list(range(1, 1000, 100))
    assert ddim_timesteps(1000, 10, "trailing", steps_offset=1)[-1] == 999   # diffusers ignores it there too
    with pytest.raises(ValueError, match="cannot place 1000 distinct timesteps"):
        ddim_timesteps(1000, 1000, "leading", steps_offset=1)                 # step 1000 does not exist
    for bad, match in [(0, "between 1 and T"), (1001, "between 1 and T"), (2.5, "between 1 and T")]:
        with pytest.raises(ValueError, match=match):
            ddim_timesteps(1000, bad)
    with pytest.raises(ValueError, match="unknown spacing 'even'"):
        dpm_solver_timesteps(1000, 10, "even")


def test_karras_sigmas_follow_eq_5():
    sigmas = karras_sigmas(0.002, 80.0, 18, rho=7.0)
    ramp = np.linspace(0, 1, 18)
    expected = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas[:-1], expected, rtol=1e-12)
    assert sigmas[-1] == 0 and sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002)
    assert karras_sigmas(0.1, 10.0, 1).tolist() == [pytest.approx(10.0, rel=1e-14), 0.0]
    for args in [(0.0, 1.0, 5), (2.0, 1.0, 5), (0.1, float("inf"), 5), (0.1, 1.0, 0)]:
        with pytest.raises(ValueError):
            karras_sigmas(*args)


@hsettings
@given(random_betas)
def test_rescale_zero_terminal_snr_is_lin_et_al_algorithm_1(betas):
    """sqrt(alpha_bar) shifted to end at 0 and scaled to keep its first value (Lin et al. 2023, Algorithm 1)."""
    rescaled = rescale_zero_terminal_snr(betas)
    before, after = np.sqrt(np.cumprod(1 - betas)), np.sqrt(np.cumprod(1 - rescaled))
    assert rescaled[-1] == 1.0 and after[-1] == 0.0
    np.testing.assert_allclose(after[0], before[0], rtol=1e-12)
    expected = (before - before[-1]) * before[0] / (before[0] - before[-1])   # affine in sqrt(alpha_bar)
    # Compared in alpha_bar with atol 1e-15: a beta next to 1 is stored to one ulp, so alpha = 1 - beta (and the
    # running product after it) is exact only absolutely (betas 1e-6, 0.5, 1e-6: alpha_bar_2 ~ 1e-12 to 5e-17)
    np.testing.assert_allclose(after ** 2, expected ** 2, rtol=1e-9, atol=1e-15)
    assert np.all((rescaled > 0) & (rescaled <= 1))


def test_zero_terminal_snr_diffusions_take_beta_T_of_one_and_stay_finite_where_they_divide():
    betas = rescale_zero_terminal_snr(get_named_beta_schedule("cosine", 100))
    d = GaussianDiffusion(betas, model_mean_type="v")
    assert d.zero_terminal_snr and d.one_minus_alphas_cumprod[-1] == 1.0
    x_t, x_0, v = np.full((1, 2), 0.7), np.full((1, 2), -0.3), np.full((1, 2), 0.2)
    t = np.array([99])
    eps = d.predict_noise_from_start(x_t, t, x_0)     # divides by sqrt(1 - alpha_bar) = 1: x_t itself
    np.testing.assert_allclose(eps, x_t)
    np.testing.assert_allclose(d.predict_start_from_v(x_t, t, v), -v)   # alpha_bar = 0: x_0 = -v
    assert GaussianDiffusion(get_named_beta_schedule("linear", 100)).zero_terminal_snr is False
