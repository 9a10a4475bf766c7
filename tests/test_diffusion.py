"""GaussianDiffusion: identities (hypothesis), closed-form sampler oracles, losses, the bound, seeds.

Oracles, cheapest first:
- identities between Eq. 4, 7, 11 and 15 in float64, for every named and random schedule;
- Gaussian data N(mu, s^2): the optimal predictor E[eps | x_t] is linear in x_t, so every sampler
  is a linear-Gaussian chain whose output mean and variance follow from a scalar recursion written
  here from the betas alone; samples must match it, and perturbed samplers must not;
- a small point set: the optimal predictor is a softmax-weighted average; samples land on the points;
- classifier-free guidance (Ho & Salimans 2022): a labelled mixture of Gaussians, whose conditional
  predictor is the Gaussian oracle of its component and whose unconditional one is the posterior-weighted
  mixture of those; guided linear predictors are linear again, so their moments are exact too;
- the few-step ODE samplers (DPM-Solver++, Karras's Heun and Euler, DDIM at eta 0): for Gaussian data the
  probability-flow ODE maps x_T to x_0 by a known affine map, so each sampler's global error is exact and
  its order of convergence measurable; the labelled mixture at 10 and 20 network calls.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff import backend, ops
from minidiff.diffusion import GaussianDiffusion
from minidiff.losses import discretized_gaussian_log_likelihood
from minidiff.schedule import (ddim_timesteps, dpm_solver_timesteps, get_named_beta_schedule,
                               rescale_zero_terminal_snr)
from minidiff.tensor import Tensor
from strategies import betas_arrays, finite_arrays, image_shapes, timesteps

hsettings = settings(deadline=None)
LINEAR_100 = get_named_beta_schedule("linear", 100)


def constant_model(output):
    """A model that ignores its input and returns `output` (an array shaped like x_t)."""
    return lambda x, t: output


def draw_case(data, betas, low=0):
    """x_0, eps (float64, shape (N, C, H, W)) and 0-based t (N,) for property tests."""
    shape = data.draw(image_shapes)
    x_start = data.draw(finite_arrays(shape, -1, 1))
    eps = data.draw(finite_arrays(shape))
    t = data.draw(timesteps(betas.size, shape[0], low=low))
    return x_start, eps, t


def per_sample(coef, t, ndim=4):
    """A float64 table indexed at t and shaped (N, 1, 1, 1), written out independently of _extract."""
    return np.asarray(coef)[t].reshape(-1, *([1] * (ndim - 1)))


# ---------------------------------------------------------------- identities (hypothesis)


@hsettings
@given(betas_arrays, st.integers(0, 10**6))
def test_q_step_composes_into_q_sample(betas, pick):
    """Eq. 2 composed from x_0 to step t is Eq. 4, exactly, by linearity of the chain.

    With zero noise the chain scales x_0 by prod sqrt(alpha_s) = sqrt(alpha_bar_t) (Eq. 4's mean).
    The noise injected at step s reaches x_t multiplied by sqrt(beta_s) prod_{r > s} sqrt(alpha_r);
    those coefficients, found by pushing a unit noise through the remaining steps, must have squares
    summing to 1 - alpha_bar_t (Eq. 4's variance), computed here from the betas alone.
    """
    d = GaussianDiffusion(betas)
    t = pick % min(betas.size, 60)
    x = np.array([[[[0.7]]]])
    zero = np.zeros_like(x)
    for s in range(t + 1):
        x = d.q_step(x, s, zero)
    alpha_bar = np.prod(1 - betas[:t + 1])
    np.testing.assert_allclose(x.ravel(), np.sqrt(alpha_bar) * 0.7, rtol=1e-12)
    variance = 0.0
    for s in range(t + 1):
        x = d.q_step(zero, s, np.ones_like(zero))          # unit noise at step s only
        for r in range(s + 1, t + 1):
            x = d.q_step(x, r, zero)
        variance += float(x.ravel()[0]) ** 2
    np.testing.assert_allclose(variance, 1 - alpha_bar, rtol=1e-9, atol=1e-300)


def test_q_step_samples_follow_eq4(backend_name):
    """Many chains of Eq. 2 from one x_0, on each backend: mean and variance of x_t match Eq. 4."""
    d = GaussianDiffusion(get_named_beta_schedule("linear", 200))
    xp = backend.xp()
    x_start = xp.asarray(np.full((20000, 1, 1, 1), 0.5, dtype=np.float32))
    x = x_start
    backend.manual_seed(3)
    for s in range(150):
        x = d.q_step(x, s)                                  # noise drawn on x's backend
    assert backend.xp_of(x) is xp
    x = backend.to_numpy(x).astype(np.float64).ravel()
    alpha_bar = np.prod(1 - get_named_beta_schedule("linear", 200)[:150])
    std_err = np.sqrt(1 / 20000)
    assert abs(x.mean() - np.sqrt(alpha_bar) * 0.5) < 5 * std_err
    assert abs(x.var() - (1 - alpha_bar)) < 5 * np.sqrt(2 / 20000)



@hsettings
@given(betas_arrays, st.data())
def test_predict_start_from_noise_inverts_q_sample(betas, data):
    """Eq. 15 undoes Eq. 4. The tolerance grows as 1 / sqrt(alpha_bar_t): dividing by it amplifies
    float64 rounding of x_t, and random schedules drive alpha_bar as low as ~1e-90."""
    d = GaussianDiffusion(betas)
    x_start, eps, t = draw_case(data, betas)
    x_t = d.q_sample(x_start, t, eps)
    expected = per_sample(np.sqrt(np.cumprod(1 - betas)), t) * x_start + \
        per_sample(np.sqrt(1 - np.cumprod(1 - betas)), t) * eps
    np.testing.assert_allclose(x_t, expected, rtol=1e-12, atol=1e-12)
    error = np.abs(d.predict_start_from_noise(x_t, t, eps) - x_start)
    assert np.all(error <= 1e-14 * (4 + np.abs(eps)) / per_sample(d.sqrt_alphas_cumprod, t))
    # And back: eps from (x_t, x_0) divides by sqrt(1 - alpha_bar_t) as well, hence the second factor.
    error = np.abs(d.predict_noise_from_start(x_t, t, x_start) - eps)
    assert np.all(error <= 1e-14 * (4 + np.abs(eps)) / per_sample(d.sqrt_alphas_cumprod * d.sqrt_one_minus_alphas_cumprod, t))


@hsettings
@given(betas_arrays, st.data())
def test_posterior_mean_from_x0_equals_algorithm_2s_mean_from_eps(betas, data):
    """With x_t = q_sample(x_0, eps): p_mean_from_noise (Eq. 11 / Algorithm 2, line 4) is
    1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) written out here from the betas, and
    equals mu_tilde(x_t, x_0) (Eq. 7): the true eps gives the true posterior mean."""
    d = GaussianDiffusion(betas)
    x_start, eps, t = draw_case(data, betas)
    x_t = d.q_sample(x_start, t, eps)
    one_minus_abar = -np.expm1(np.cumsum(np.log1p(-betas)))  # 1 - alpha_bar without cancellation (beta ~ 1e-6)
    eq11 = (x_t - per_sample(betas / np.sqrt(one_minus_abar), t) * eps) / per_sample(np.sqrt(1 - betas), t)
    scale = 1 + np.abs(x_t) + np.abs(eps)
    assert np.all(np.abs(d.p_mean_from_noise(x_t, t, eps) - eq11) <= 1e-12 * scale)
    posterior_mean, _, _ = d.q_posterior_mean_variance(x_start, x_t, t)
    assert np.all(np.abs(posterior_mean - d.p_mean_from_noise(x_t, t, eps)) <= 1e-11 * scale)


@hsettings
@given(betas_arrays, st.data())
def test_eq11_is_p_mean_variances_mean_when_nothing_is_clipped(betas, data):
    """p_mean_variance's route (x_0_hat by Eq. 15, then Eq. 7) is Eq. 11 in float64 when unclipped, with
    Sec. 3.2's fixed variance. Random schedules reach alpha_bar ~ 1e-90 (x_0_hat ~ 1e45 for an
    arbitrary eps, then cancelled), so this model predicts an eps consistent with some x_0 in [-1, 1]."""
    d = GaussianDiffusion(betas)
    x_start, eps, t = draw_case(data, betas)
    x_t = d.q_sample(x_start, t, eps)
    out = d.p_mean_variance(constant_model(eps), x_t, t, clip_denoised=False)
    scale = 1 + np.abs(x_t) + np.abs(eps)
    assert np.all(np.abs(out["mean"] - d.p_mean_from_noise(x_t, t, eps)) <= 1e-11 * scale)
    np.testing.assert_array_equal(out["variance"], per_sample(d.posterior_variance, t))   # sigma_t^2 = beta_tilde_t


def test_eq11_differs_from_the_clipped_mean_exactly_where_clipping_bites():
    """With x_0_hat = 3 x_0 outside [-1, 1] in some entries, clip_denoised=True moves the mean there by
    posterior_mean_coef1 (clip(x_0_hat) - x_0_hat) (Eq. 7 is affine in x_0) and nowhere else."""
    d = GaussianDiffusion(LINEAR_100)
    rng = np.random.default_rng(4)
    x_start, eps = rng.uniform(-1, 1, (4, 1, 3, 3)), rng.standard_normal((4, 1, 3, 3))
    t = np.array([0, 1, 50, 99])
    x_t = d.q_sample(3 * x_start, t, eps)                         # Eq. 15 gives back x_0_hat = 3 x_0
    eq11 = d.p_mean_from_noise(x_t, t, eps)
    clipped = d.p_mean_variance(constant_model(eps), x_t, t, clip_denoised=True)["mean"]
    bites = np.abs(3 * x_start) > 1
    assert bites.any() and not bites.all()
    shift = per_sample(d.posterior_mean_coef1, t) * (np.clip(3 * x_start, -1, 1) - 3 * x_start)
    np.testing.assert_allclose(clipped - eq11, shift, rtol=1e-9, atol=1e-12)
    assert np.all(np.abs(clipped - eq11)[bites] > 1e-6)
    np.testing.assert_allclose(clipped[~bites], eq11[~bites], rtol=1e-12, atol=1e-12)


@hsettings
@given(betas_arrays, st.data())
def test_eps_x0_and_v_parameterisations_give_the_same_mean(betas, data):
    """Consistent predictions (eps, x_0, v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0) give one mean."""
    x_start, eps, t = draw_case(data, betas)
    means = {}
    for mean_type in ("eps", "x0", "v"):
        d = GaussianDiffusion(betas, model_mean_type=mean_type)
        x_t = d.q_sample(x_start, t, eps)
        a = per_sample(np.cumprod(1 - betas), t)
        prediction = {"eps": eps, "x0": x_start, "v": np.sqrt(a) * eps - np.sqrt(1 - a) * x_start}[mean_type]
        means[mean_type] = d.p_mean_variance(constant_model(prediction), x_t, t, clip_denoised=False)["mean"]
    scale = 1 + np.abs(x_t) + np.abs(eps)
    assert np.all(np.abs(means["x0"] - means["eps"]) <= 1e-11 * scale)
    assert np.all(np.abs(means["v"] - means["eps"]) <= 1e-11 * scale)


def test_v_target_is_sqrt_abar_eps_minus_sqrt_one_minus_abar_x0():
    d = GaussianDiffusion(LINEAR_100)
    x_start, eps, t = np.full((2, 1), 0.5), np.full((2, 1), -1.0), np.array([0, 99])
    a = d.alphas_cumprod[t][:, None]
    np.testing.assert_allclose(d.velocity(x_start, t, eps), -np.sqrt(a) - 0.5 * np.sqrt(1 - a), rtol=1e-14)
    np.testing.assert_allclose(d.predict_start_from_v(d.q_sample(x_start, t, eps), t, d.velocity(x_start, t, eps)),
                               x_start, rtol=1e-12)


def test_p_sample_adds_no_noise_at_t0_and_sigma_z_elsewhere():
    for var_type in ("fixed_small", "fixed_large"):
        d = GaussianDiffusion(LINEAR_100, model_var_type=var_type)
        t = np.array([0, 3, 0, 99])
        x, noise = np.linspace(-1, 1, 8).reshape(4, 2), np.ones((4, 2))
        model = constant_model(np.full((4, 2), 0.1))
        mean = d.p_mean_variance(model, x, t)["mean"]
        step = d.p_sample(model, x, t, noise=noise)["sample"] - mean
        sigma = np.sqrt(LINEAR_100[t] if var_type == "fixed_large" else d.posterior_variance[t])
        np.testing.assert_allclose(step, np.where(t[:, None] == 0, 0.0, sigma[:, None]) * noise, rtol=1e-12)
        assert np.all(step[t == 0] == 0)


def test_clip_denoised_clips_the_x0_prediction():
    d = GaussianDiffusion(LINEAR_100, model_mean_type="x0")
    x, t = np.zeros((3, 1)), np.array([5, 5, 5])
    out = d.p_mean_variance(constant_model(np.array([[-3.0], [0.5], [2.0]])), x, t)
    np.testing.assert_array_equal(out["pred_xstart"], [[-1.0], [0.5], [1.0]])
    unclipped = d.p_mean_variance(constant_model(np.array([[-3.0], [0.5], [2.0]])), x, t, clip_denoised=False)
    np.testing.assert_array_equal(unclipped["pred_xstart"], [[-3.0], [0.5], [2.0]])


@pytest.mark.usefixtures("numpy_backend")  # host oracle arrays throughout
def test_float32_stays_float32_and_tensors_are_accepted():
    """Coefficients are cast to x's dtype in _extract; even a float64 model output does not promote."""
    d = GaussianDiffusion(LINEAR_100)
    x = np.zeros((2, 1, 2, 2), np.float32)
    t = np.array([1, 50])
    assert d.q_sample(x, t, np.ones_like(x)).dtype == np.float32
    model64 = constant_model(np.zeros((2, 1, 2, 2), np.float64))
    assert d.p_sample(model64, x, t)["sample"].dtype == np.float32
    assert d.p_sample_loop(model64, x.shape, seed=0).dtype == np.float32
    assert d.ddim_sample_loop(model64, x.shape, num_steps=5, eta=1.0, seed=0).dtype == np.float32
    # A Tensor in gives a Tensor out, with the gradient of Eq. 4: d x_t / d x_0 = sqrt(alpha_bar_t).
    x0 = Tensor(np.ones((2, 3)), requires_grad=True)
    x_t = d.q_sample(x0, t, np.zeros((2, 3)))
    assert isinstance(x_t, Tensor)
    x_t.sum().backward()
    np.testing.assert_allclose(x0.grad, np.repeat(d.sqrt_alphas_cumprod[t][:, None], 3, axis=1), rtol=1e-14)


def test_model_output_of_the_wrong_shape_is_a_clear_error():
    d = GaussianDiffusion(LINEAR_100)
    with pytest.raises(ValueError, match=r"returned shape \(2, 2\)"):
        d.p_sample(constant_model(np.zeros((2, 2))), np.zeros((2, 1)), np.array([1, 1]))


# ---------------------------------------------------------------- the Gaussian-data oracle

MU = 0.3  # data mean; two widths: one wide, one narrow (where the fixed variances are the worst approximation)


def gaussian_optimal_model(alphas_cumprod, mu, s, scale=1.0):
    """E[eps | x_t] for x_0 ~ N(mu, s^2): Cov(eps, x_t) / Var(x_t) (x_t - E x_t), linear in x_t.

    Var(x_t) = alpha_bar s^2 + 1 - alpha_bar, Cov = sqrt(1 - alpha_bar). `scale` != 1 gives a wrong model.
    t are the model's (original) timesteps, indexed into the original alpha_bars.
    """
    def model(x, t):
        x = x.data
        xp = backend.xp_of(x)
        a = xp.asarray(alphas_cumprod)[t].reshape(-1, *([1] * (x.ndim - 1)))
        return (scale * xp.sqrt(1 - a) / (a * s * s + 1 - a) * (x - xp.sqrt(a) * mu)).astype(x.dtype)
    return model


def eps_coefficients(a, mu, s):
    """eps_hat = c x_t + k for the optimal model above, at alpha_bar = a."""
    c = math.sqrt(1 - a) / (a * s * s + 1 - a)
    return c, -c * math.sqrt(a) * mu


def ancestral_moments(betas, mu, s, var_type, coefficients=None):
    """Mean and variance of Algorithm 2's output with the optimal model, from the betas alone.

    x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t) + sigma_t z  (Eq. 11), an
    affine map plus noise, so mean and variance follow m <- A m + B, V <- A^2 V + sigma_t^2 from x_T ~ N(0, 1).
    `coefficients(a)` -> (c, k) gives another linear predictor eps_hat = c x_t + k (default: the optimal one).
    """
    coefficients = coefficients or (lambda a: eps_coefficients(a, mu, s))
    abar = np.cumprod(1 - betas)
    m, V = 0.0, 1.0
    for t in reversed(range(len(betas))):
        beta, a = betas[t], abar[t]
        c, k = coefficients(a)
        slope = beta / math.sqrt(1 - a)
        A, B = (1 - slope * c) / math.sqrt(1 - beta), -slope * k / math.sqrt(1 - beta)
        a_prev = abar[t - 1] if t > 0 else 1.0
        sigma2 = 0.0 if t == 0 else beta * (1 - a_prev) / (1 - a) if var_type == "fixed_small" else beta
        m, V = A * m + B, A * A * V + sigma2
    return m, V


def ddim_moments(betas, mu, s, num_steps, eta, coefficients=None):
    """Mean and variance of DDIM's output (Song et al. Eq. 12, sigma from Eq. 16) with the optimal model
    (or the linear predictor `coefficients`, as in ancestral_moments)."""
    coefficients = coefficients or (lambda a: eps_coefficients(a, mu, s))
    abar = np.cumprod(1 - betas)
    steps = np.arange(num_steps) * (len(betas) // num_steps)
    m, V = 0.0, 1.0
    for i in reversed(range(num_steps)):
        a = abar[steps[i]]
        a_prev = abar[steps[i - 1]] if i > 0 else 1.0
        c, k = coefficients(a)
        p, q = (1 - math.sqrt(1 - a) * c) / math.sqrt(a), -math.sqrt(1 - a) * k / math.sqrt(a)  # x0_hat = p x + q
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        direction = math.sqrt(1 - a_prev - sigma ** 2)
        A, B = math.sqrt(a_prev) * p + direction * c, math.sqrt(a_prev) * q + direction * k
        m, V = A * m + B, A * A * V + sigma ** 2
    return m, V


def z_scores(samples, mean, variance):
    """How many standard errors the sample mean and variance are from (mean, variance), as numbers."""
    x = backend.to_numpy(samples).astype(np.float64).ravel()
    n = x.size
    return (abs(x.mean() - mean) / math.sqrt(variance / n),
            abs(x.var() - variance) / (variance * math.sqrt(2 / (n - 1))))


SHAPE = (10000, 4)  # 40,000 i.i.d. scalars: standard errors ~0.5% of sigma and ~0.7% of the variance
Z_MAX = 5.0  # a correct sampler stays below it; each perturbed one below lands far above (~10 to 80)


@pytest.mark.parametrize("s", [0.4, 0.05])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_ancestral_sampling_matches_the_gaussian_oracle(var_type, s, backend_name):
    d = GaussianDiffusion(LINEAR_100, model_var_type=var_type)
    samples = d.p_sample_loop(gaussian_optimal_model(d.alphas_cumprod, MU, s), SHAPE, seed=0, clip_denoised=False)
    mean, variance = ancestral_moments(LINEAR_100, MU, s, var_type)
    assert max(z_scores(samples, mean, variance)) < Z_MAX


@pytest.mark.parametrize("s", [0.4, 0.05])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampling_matches_the_gaussian_oracle(eta, s, backend_name):
    d = GaussianDiffusion(LINEAR_100)
    samples = d.ddim_sample_loop(gaussian_optimal_model(d.alphas_cumprod, MU, s), SHAPE, num_steps=10, eta=eta,
                                 seed=1, clip_denoised=False)
    mean, variance = ddim_moments(LINEAR_100, MU, s, 10, eta)
    assert max(z_scores(samples, mean, variance)) < Z_MAX


def test_respaced_ancestral_sampling_matches_the_oracle_of_the_shorter_chain(backend_name):
    """20 of 100 steps: the model sees the original timesteps, the chain uses the respaced betas."""
    d = GaussianDiffusion(LINEAR_100)
    spaced = d.respaced(20)
    seen = set()

    def model(x, t):
        seen.update(backend.to_numpy(t).tolist())
        return gaussian_optimal_model(d.alphas_cumprod, MU, 0.4)(x, t)

    samples = spaced.p_sample_loop(model, SHAPE, seed=2, clip_denoised=False)
    assert seen == set(spaced.timestep_map.tolist()) and len(seen) == 20
    mean, variance = ancestral_moments(spaced.betas, MU, 0.4, "fixed_small")
    assert max(z_scores(samples, mean, variance)) < Z_MAX


def perturbed_coefficient(diffusion, name, factor):
    setattr(diffusion, name, getattr(diffusion, name) * factor)
    diffusion._device_copies.clear()  # drop the cast copies of the correct table
    return diffusion


@pytest.mark.parametrize("case", ["model x1.05", "posterior_mean_coef2 x1.001", "model_variance x1.1",
                                  "fixed_large vs fixed_small", "ddim eta 1 vs 0"])
def test_the_oracle_detects_a_wrong_sampler(case):
    """The check above is not vacuous: one wrong coefficient moves the samples far outside Z_MAX."""
    d, scale, s = GaussianDiffusion(LINEAR_100), 1.0, 0.4
    mean, variance = ancestral_moments(LINEAR_100, MU, s, "fixed_small")
    if case == "model x1.05":
        scale = 1.05
    elif case == "posterior_mean_coef2 x1.001":
        perturbed_coefficient(d, "posterior_mean_coef2", 1.001)
    elif case == "model_variance x1.1":
        perturbed_coefficient(d, "model_variance", 1.1)
    elif case == "fixed_large vs fixed_small":
        s = 0.05
        d = GaussianDiffusion(LINEAR_100, model_var_type="fixed_large")
        mean, variance = ancestral_moments(LINEAR_100, MU, s, "fixed_small")
    model = gaussian_optimal_model(d.alphas_cumprod, MU, s, scale)
    if case == "ddim eta 1 vs 0":
        samples = d.ddim_sample_loop(model, SHAPE, num_steps=10, eta=1.0, seed=1, clip_denoised=False)
        mean, variance = ddim_moments(LINEAR_100, MU, s, 10, 0.0)
    else:
        samples = d.p_sample_loop(model, SHAPE, seed=0, clip_denoised=False)
    assert max(z_scores(samples, mean, variance)) > 2 * Z_MAX


def test_the_samplers_do_not_reproduce_narrow_data_exactly():
    """The recursion, not the data distribution, is the right target: for narrow data the fixed
    reverse variances miss the data's variance by far more than sampling error."""
    d = GaussianDiffusion(LINEAR_100)
    samples = d.p_sample_loop(gaussian_optimal_model(d.alphas_cumprod, MU, 0.05), SHAPE, seed=0, clip_denoised=False)
    assert z_scores(samples, MU, 0.05 ** 2)[1] > 2 * Z_MAX


# ---------------------------------------------------------------- a point set: samples land on the points

POINTS = np.array([[-0.6, -0.6], [0.6, 0.2], [-0.2, 0.7]])  # (K, D), inside the data range [-1, 1]


def point_set_model(alphas_cumprod, points):
    """E[eps | x_t] for x_0 uniform on `points`: E[x_0 | x_t] = sum_k softmax_k(-|x_t - sqrt(a) p_k|^2 / 2(1 - a)) p_k."""
    def model(x, t):
        x = x.data
        xp = backend.xp_of(x)
        p = xp.asarray(points)
        a = xp.asarray(alphas_cumprod)[t][:, None]                                        # (N, 1)
        d2 = ((x[:, None, :] - xp.sqrt(a)[:, :, None] * p[None]) ** 2).sum(-1)           # (N, K)
        logits = -d2 / (2 * (1 - a))
        w = xp.exp(logits - logits.max(axis=1, keepdims=True))
        x0 = (w / w.sum(axis=1, keepdims=True)) @ p                                      # (N, D)
        return ((x - xp.sqrt(a) * x0) / xp.sqrt(1 - a)).astype(x.dtype)
    return model


def assert_on_the_points(samples):
    samples = backend.to_numpy(samples)
    distances = np.linalg.norm(samples[:, None, :] - POINTS[None], axis=-1)  # (N, K)
    assert np.quantile(distances.min(axis=1), 0.99) < 0.02
    shares = np.bincount(distances.argmin(axis=1), minlength=len(POINTS)) / len(samples)
    np.testing.assert_allclose(shares, 1 / len(POINTS), atol=0.08)  # ~4 standard errors at N = 600


@pytest.mark.parametrize("sampler", ["ancestral", "respaced", "ddim eta 0", "ddim eta 1"])
def test_samplers_concentrate_on_a_point_set(sampler, backend_name):
    d = GaussianDiffusion(LINEAR_100)
    model = point_set_model(d.alphas_cumprod, POINTS)
    if sampler == "ancestral":
        samples = d.p_sample_loop(model, (600, 2), seed=3)
    elif sampler == "respaced":
        samples = d.respaced(25).p_sample_loop(model, (600, 2), seed=3)
    else:
        samples = d.ddim_sample_loop(model, (600, 2), num_steps=20, eta=float(sampler[-1]), seed=3)
    assert_on_the_points(samples)


def test_a_wrong_point_set_model_misses_the_points():
    """The point-set check can fail: a model of other points puts samples elsewhere."""
    d = GaussianDiffusion(LINEAR_100)
    with pytest.raises(AssertionError):
        assert_on_the_points(d.p_sample_loop(point_set_model(d.alphas_cumprod, POINTS[:, ::-1]), (600, 2), seed=3))


# ---------------------------------------------------------------- DDIM specifics


@pytest.mark.usefixtures("numpy_backend")  # host oracle arrays throughout
def test_ddim_uses_the_original_spacing_and_one_model_call_per_step():
    d = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    calls = []

    def model(x, t):
        calls.append(int(backend.to_numpy(t)[0]))
        return np.zeros(x.shape, x.dtype)

    d.ddim_sample_loop(model, (1, 1), num_steps=50, seed=0)
    assert calls == list(range(980, -1, -20))
    np.testing.assert_array_equal(d.ddim_timesteps(50), np.arange(0, 1000, 20))
    calls.clear()
    GaussianDiffusion(LINEAR_100).ddim_sample_loop(model, (1, 1), num_steps=30, seed=0)  # 100 is not a multiple of 30
    assert len(calls) == 30


def test_ddim_recomputes_eps_from_the_clipped_x0():
    """Two steps (t = 50, then 0): after clipping x0_hat, eps = (x_t - sqrt(a) x0_clipped) / sqrt(1 - a)."""
    d = GaussianDiffusion(LINEAR_100)
    x_T = np.array([[0.9], [-0.2]])
    eps_model = np.array([[-2.0], [0.1]])  # the first sample's x0_hat is far above 1
    step = next(d.ddim_sample_loop_progressive(constant_model(eps_model), x_T.shape, num_steps=2, noise=x_T))
    a, a_prev = d.alphas_cumprod[50], d.alphas_cumprod[0]
    x0 = np.clip((x_T - math.sqrt(1 - a) * eps_model) / math.sqrt(a), -1, 1)
    eps = (x_T - math.sqrt(a) * x0) / math.sqrt(1 - a)
    assert step["t"] == 50 and x0[0, 0] == 1.0
    np.testing.assert_allclose(step["sample"], math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, rtol=1e-12)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_with_every_step_and_eta_1_is_ancestral_sampling(clip):
    """sigma(eta = 1)^2 = beta_tilde_t (Song et al. Eq. 16) and Eq. 12's mean is then mu_tilde (Eq. 7):
    with the same x_T and the same noise stream the two samplers agree to rounding."""
    d = GaussianDiffusion(LINEAR_100)
    model = point_set_model(d.alphas_cumprod, POINTS)
    x_T = np.random.default_rng(0).standard_normal((50, 2))  # float64, so rounding stays ~1e-12
    ancestral = d.p_sample_loop(model, x_T.shape, noise=x_T, seed=7, clip_denoised=clip)
    ddim = d.ddim_sample_loop(model, x_T.shape, num_steps=100, eta=1.0, noise=x_T, seed=7, clip_denoised=clip)
    np.testing.assert_allclose(ddim, ancestral, atol=1e-9)


# ---------------------------------------------------------------- seeds, noise, progress


@pytest.mark.usefixtures("numpy_backend")  # host oracle arrays throughout
def test_the_same_seed_gives_bit_identical_samples():
    d = GaussianDiffusion(LINEAR_100)
    model = gaussian_optimal_model(d.alphas_cumprod, MU, 0.4)
    for sample in (lambda seed: d.p_sample_loop(model, (3, 1, 4, 4), seed=seed),
                   lambda seed: d.ddim_sample_loop(model, (3, 1, 4, 4), num_steps=10, eta=1.0, seed=seed),
                   lambda seed: d.calc_bpd_loop(model, np.zeros((3, 1, 4, 4), np.float32), seed=seed)["total_bpd"]):
        np.testing.assert_array_equal(sample(11), sample(11))
        assert not np.array_equal(sample(11), sample(12))
    backend.manual_seed(5)  # without a seed: the default generator, reseedable
    first = d.p_sample_loop(model, (3, 2))
    backend.manual_seed(5)
    np.testing.assert_array_equal(d.p_sample_loop(model, (3, 2)), first)


def test_progressive_yields_every_step_and_ends_at_p_sample_loop():
    d = GaussianDiffusion(LINEAR_100)
    model = gaussian_optimal_model(d.alphas_cumprod, MU, 0.4)
    x_T = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    steps = list(d.p_sample_loop_progressive(model, x_T.shape, noise=x_T, seed=0))
    assert [s["t"] for s in steps] == list(range(99, -1, -1))
    assert all(s["sample"].shape == x_T.shape and s["pred_xstart"].shape == x_T.shape for s in steps)
    np.testing.assert_array_equal(steps[-1]["sample"], d.p_sample_loop(model, x_T.shape, noise=x_T, seed=0))
    with pytest.raises(ValueError, match="noise has shape"):
        d.p_sample_loop(model, (4, 4), noise=x_T)


@pytest.mark.usefixtures("numpy_backend")  # host oracle arrays throughout
def test_progress_bar(capsys):
    d = GaussianDiffusion(get_named_beta_schedule("linear", 10))
    d.p_sample_loop(constant_model(np.zeros((1, 1), np.float32)), (1, 1), seed=0, progress=True)
    assert "10/10" in capsys.readouterr().err


# ---------------------------------------------------------------- training losses (Algorithm 1, Eq. 14, Eq. 5)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_mse_loss_compares_the_model_with_its_target(mean_type):
    d = GaussianDiffusion(LINEAR_100, model_mean_type=mean_type)
    rng = np.random.default_rng(0)
    x_start, noise = rng.uniform(-1, 1, (3, 2, 2, 2)), rng.standard_normal((3, 2, 2, 2))
    t = np.array([0, 40, 99])
    output = rng.standard_normal((3, 2, 2, 2))
    a = per_sample(np.cumprod(1 - LINEAR_100), t)
    target = {"eps": noise, "x0": x_start, "v": np.sqrt(a) * noise - np.sqrt(1 - a) * x_start}[mean_type]
    losses = d.training_losses(constant_model(output), x_start, t, noise=noise)
    assert isinstance(losses["loss"], Tensor) and losses["loss"].shape == (3,)
    np.testing.assert_allclose(losses["loss"].data, ((target - output) ** 2).mean(axis=(1, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_l_simple_is_the_bounds_term_without_eq12s_weight(var_type):
    """For an eps model at t > 1 the bound's term L_{t-1} (Eq. 5, "kl") is Eq. 12: in nats per dimension,
    beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)) ||eps - eps_theta||^2 plus a constant (zero when
    sigma_t^2 = beta_tilde_t), while L_simple ("mse", Eq. 14) is the squared error alone."""
    rng = np.random.default_rng(2)
    x_start, noise = rng.uniform(-1, 1, (3, 1, 2, 2)), rng.standard_normal((3, 1, 2, 2))
    output, t = rng.standard_normal((3, 1, 2, 2)), np.array([1, 40, 99])
    losses = {loss_type: GaussianDiffusion(LINEAR_100, model_var_type=var_type, loss_type=loss_type)
              .training_losses(constant_model(output), x_start, t, noise)["loss"].data for loss_type in ("mse", "kl")}
    beta, abar = LINEAR_100[t], np.cumprod(1 - LINEAR_100)[t]
    beta_tilde = beta * (1 - np.cumprod(1 - LINEAR_100)[t - 1]) / (1 - abar)
    sigma2 = beta_tilde if var_type == "fixed_small" else beta
    weight = beta ** 2 / (2 * sigma2 * (1 - beta) * (1 - abar))                       # Eq. 12
    variance_term = 0.5 * (np.log(sigma2 / beta_tilde) + beta_tilde / sigma2 - 1)     # KL of the variances
    np.testing.assert_allclose(losses["mse"], ((noise - output) ** 2).mean(axis=(1, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(losses["kl"] * math.log(2), variance_term + weight * losses["mse"], rtol=1e-9)


def linear_model(w, b):
    """model(x_t, t) = w x_t + b with Tensor parameters: enough to check gradients through the losses."""
    return lambda x, t: x * w + b


@pytest.mark.parametrize("loss_type,mean_type", [("mse", "eps"), ("mse", "v"), ("kl", "eps"), ("kl", "x0"),
                                                 ("kl", "v")])
def test_training_losses_backpropagate_into_the_model(loss_type, mean_type):
    """losses["loss"].mean().backward() gives the central-difference gradient (float64)."""
    d = GaussianDiffusion(LINEAR_100, model_mean_type=mean_type, loss_type=loss_type)
    rng = np.random.default_rng(1)
    x_start = rng.integers(0, 256, (4, 1, 3, 3)) / 127.5 - 1.0   # 8-bit grid, for the decoder at t = 0
    noise, t = rng.standard_normal(x_start.shape), np.array([0, 1, 30, 99])
    w, b = Tensor(np.array(0.3), requires_grad=True), Tensor(np.array(-0.1), requires_grad=True)
    d.training_losses(linear_model(w, b), x_start, t, noise)["loss"].mean().backward()

    def loss(w_value, b_value):
        model = linear_model(Tensor(np.array(w_value)), Tensor(np.array(b_value)))
        return float(d.training_losses(model, x_start, t, noise)["loss"].data.mean())

    h = 1e-6
    assert float(w.grad) == pytest.approx((loss(0.3 + h, -0.1) - loss(0.3 - h, -0.1)) / (2 * h), rel=1e-5)
    assert float(b.grad) == pytest.approx((loss(0.3, -0.1 + h) - loss(0.3, -0.1 - h)) / (2 * h), rel=1e-5)


def test_kl_loss_is_zero_for_a_perfect_x0_model_and_the_decoder_nll_at_t0():
    """With x0_hat = x_0, p(x_{t-1} | x_t) = q(x_{t-1} | x_t, x_0): L_{t-1} = 0. At t = 0 the loss is
    -log2 P(bin of x_0) under N(x_0, beta_tilde_1) (Eq. 13, the clipped log-variance)."""
    d = GaussianDiffusion(LINEAR_100, model_mean_type="x0", loss_type="kl")
    x_start = np.full((3, 1, 2, 2), -1 + 2 * 100 / 255)  # an interior 8-bit level
    t = np.array([0, 1, 99])
    losses = d.training_losses(constant_model(x_start), x_start, t, np.ones_like(x_start))
    assert losses["loss"].data[1:] == pytest.approx([0, 0], abs=1e-12)
    sigma = math.sqrt(d.posterior_variance[1])
    p_bin = math.erf(1 / 255 / sigma / math.sqrt(2))  # Phi(h / sigma) - Phi(-h / sigma)
    assert losses["loss"].data[0] == pytest.approx(-math.log2(p_bin), rel=1e-3)  # 1e-3: the tanh CDF


# ---------------------------------------------------------------- the bound (Eq. 5, Table 2)


@pytest.mark.usefixtures("numpy_backend")  # host oracle arrays throughout
def test_calc_bpd_loop_adds_up_and_matches_training_losses_column_by_column():
    """total = prior + sum_t vb[:, t]; column t is training_losses' kl term for the same noise."""
    d = GaussianDiffusion(get_named_beta_schedule("cosine", 20), loss_type="kl")
    model = gaussian_optimal_model(d.alphas_cumprod, MU, 0.4)
    x_start = (np.random.default_rng(2).integers(0, 256, (3, 1, 2, 2)) / 127.5 - 1).astype(np.float32)
    bpd = d.calc_bpd_loop(model, x_start, clip_denoised=False, seed=4)
    assert bpd["vb"].shape == bpd["mse"].shape == (3, 20) and bpd["total_bpd"].shape == (3,)
    np.testing.assert_allclose(bpd["total_bpd"], bpd["prior_bpd"] + bpd["vb"].sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(bpd["prior_bpd"], d.prior_bpd(x_start), rtol=1e-6)
    generator = backend.Generator(4)  # replay calc_bpd_loop's noise: one draw per t, from T - 1 down
    noises = {i: generator.normal(x_start.shape) for i in range(19, -1, -1)}
    for i in (0, 1, 10, 19):
        t = np.full(3, i)
        terms = d.training_losses(model, x_start, t, noises[i])["loss"].data
        np.testing.assert_allclose(bpd["vb"][:, i], terms, rtol=1e-5, atol=1e-6)
        eps = model(Tensor(d.q_sample(x_start, t, noises[i])), t)
        np.testing.assert_allclose(bpd["mse"][:, i], ((eps - noises[i]) ** 2).mean(axis=(1, 2, 3)),
                                   rtol=1e-4, atol=1e-6)


def test_the_bound_of_a_perfect_denoiser_is_the_prior_plus_the_decoder():
    d = GaussianDiffusion(LINEAR_100, model_mean_type="x0")
    x_start = np.full((2, 1, 2, 2), -1 + 2 * 100 / 255, np.float32)
    bpd = d.calc_bpd_loop(constant_model(x_start), x_start, seed=0)
    np.testing.assert_allclose(bpd["vb"][:, 1:], 0.0, atol=1e-4)
    np.testing.assert_allclose(bpd["mse"], 0.0, atol=1e-4)
    decoder = -discretized_gaussian_log_likelihood(x_start, x_start, np.full_like(x_start, 0.5 * math.log(
        d.posterior_variance[1]))).mean(axis=(1, 2, 3)) / math.log(2)
    np.testing.assert_allclose(bpd["vb"][:, 0], decoder, rtol=1e-4)
    np.testing.assert_allclose(bpd["total_bpd"], bpd["prior_bpd"] + decoder, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- interpolation (Sec. 4.4)


def test_interpolation_mixes_latents_and_shares_the_reverse_noise():
    """The reverse chain of the Gaussian oracle is affine in x_t, so with shared noise the lambda = 1/2
    decoding is the average of the end points'; each end point decodes as if interpolated alone."""
    d = GaussianDiffusion(LINEAR_100)
    model = gaussian_optimal_model(d.alphas_cumprod, MU, 0.4)
    rng = np.random.default_rng(3)
    x_a, x_b = rng.uniform(-1, 1, (2, 1, 3, 3)), rng.uniform(-1, 1, (2, 1, 3, 3))
    out = d.interpolate(model, x_a, x_b, 50, [0.0, 0.5, 1.0], seed=9, clip_denoised=False)
    assert out.shape == (3, 2, 1, 3, 3)
    np.testing.assert_allclose(out[1], (out[0] + out[2]) / 2, atol=1e-10)
    np.testing.assert_array_equal(out[0], d.interpolate(model, x_a, x_b, 50, [0.0], seed=9, clip_denoised=False)[0])
    assert not np.allclose(out[0], out[2])


# ---------------------------------------------------------------- classifier-free guidance (Ho & Salimans 2022)

MIX_MEANS = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.5]])   # component c of a labelled 2-D mixture
MIX_S = 0.6


def mixture_oracle(alphas_cumprod, means=MIX_MEANS, s=MIX_S, weights=None, mean_type="eps"):
    """The exact predictors of x_0 ~ sum_c pi_c N(mu_c, s^2 I) with labels c, as model(x, t, y=None).

    Label c: component c's Gaussian oracle (gaussian_optimal_model per coordinate). y = NO_LABEL (-1)
    or y=None: E[eps | x_t] = sum_c p(c | x_t) eps_c(x_t), with p(c | x_t) proportional to
    pi_c N(x_t; sqrt(alpha_bar) mu_c, (alpha_bar s^2 + 1 - alpha_bar) I). mean_type "x0"/"v"
    returns the same prediction as x_0 (Eq. 15) or v.
    """
    means = np.asarray(means, dtype=np.float64)
    log_pi = np.log(np.full(len(means), 1 / len(means)) if weights is None else np.asarray(weights))

    def model(x, t, y=None):
        xp = backend.xp_of(x.data)                                          # answer on x's backend
        x = backend.to_numpy(x.data).astype(np.float64)                      # (N, 2)
        a = alpha_bar_at(alphas_cumprod, t)[:, None, None]                   # (N, 1, 1)
        var = a * s * s + 1 - a
        diff = x[:, None, :] - np.sqrt(a) * means[None]                     # (N, K, 2)
        eps_c = np.sqrt(1 - a) / var * diff                                 # each component's oracle
        logits = log_pi - 0.5 * (diff ** 2).sum(-1) / var[:, :, 0]
        r = np.exp(logits - logits.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)                                        # p(c | x_t)
        eps = (r[:, :, None] * eps_c).sum(1)
        if y is not None:
            y = backend.to_numpy(y)
            eps = np.where((y >= 0)[:, None], eps_c[np.arange(len(x)), np.maximum(y, 0)], eps)
        a = a[:, :, 0]
        if mean_type == "x0":
            eps = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        elif mean_type == "v":
            eps = np.sqrt(a) * eps - np.sqrt(1 - a) * (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        return xp.asarray(eps.astype(np.float32))
    return model


def alpha_bar_at(alphas_cumprod, t):
    """alpha_bar at the model's timesteps t (N,): a table entry for integer t; for the Karras sampler's
    fractional t, the alpha_bar whose log sigma is linear in t between the grid points (the rule by
    which the sampler chose t, so the oracle sees the very sigma the sampler meant)."""
    t = backend.to_numpy(t)
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    if t.dtype.kind != "f":
        return abar[t]
    log_sigma = np.interp(t, np.arange(len(abar)), 0.5 * np.log((1 - abar) / abar))
    return 1.0 / (1.0 + np.exp(2 * log_sigma))


def mixture_chain():
    """The paper's 1000-step schedule respaced to 100 ancestral steps: (base, chain). Unlike LINEAR_100
    (alpha_bar_T = 0.36) it ends in pure noise, which the mixture's unconditional samples need."""
    base = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    return base, base.respaced(100)


class CallCounter:
    """Wraps a model and records the batch size and labels of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, **kwargs):
        y = kwargs.get("y")
        self.calls.append((x.shape[0], None if y is None else backend.to_numpy(y).copy()))
        return self.model(x, t, **kwargs)


def test_guidance_zero_is_conditional_sampling_and_no_label_is_the_unconditional_model(backend_name):
    d = GaussianDiffusion(LINEAR_100)
    oracle = mixture_oracle(d.alphas_cumprod)
    y = np.arange(30) % 3
    with_kwargs = d.ddim_sample_loop(oracle, (30, 2), num_steps=10, eta=1.0, seed=3, clip_denoised=False,
                                     model_kwargs={"y": backend.to_active(y)}, guidance=0.0)
    fixed = d.ddim_sample_loop(lambda x, t: oracle(x, t, y), (30, 2), num_steps=10, eta=1.0, seed=3,
                               clip_denoised=False)
    np.testing.assert_array_equal(backend.to_numpy(with_kwargs), backend.to_numpy(fixed))
    no_label = d.p_sample_loop(oracle, (30, 2), seed=4, clip_denoised=False, model_kwargs={"y": np.full(30, -1)})
    unconditional = d.p_sample_loop(oracle, (30, 2), seed=4, clip_denoised=False)
    np.testing.assert_array_equal(backend.to_numpy(no_label), backend.to_numpy(unconditional))
    guided = d.p_sample_loop(oracle, (30, 2), seed=4, clip_denoised=False, model_kwargs={"y": y}, guidance=2.0)
    assert np.abs(backend.to_numpy(guided) - backend.to_numpy(unconditional)).max() > 0.1


@pytest.mark.parametrize("sampler", ["ancestral", "respaced", "ddim", "dpm++", "heun"])
def test_guidance_calls_the_model_once_per_step_on_a_doubled_batch(sampler):
    d = GaussianDiffusion(LINEAR_100)
    counter = CallCounter(mixture_oracle(d.alphas_cumprod))
    y = np.array([0, 2, 1, 2])
    kwargs = dict(seed=0, clip_denoised=False, model_kwargs={"y": y}, guidance=1.5)
    if sampler == "ancestral":
        d.p_sample_loop(counter, (4, 2), **kwargs)
        steps = 100
    elif sampler == "respaced":
        d.respaced(10).p_sample_loop(counter, (4, 2), **kwargs)
        steps = 10
    elif sampler == "ddim":
        d.ddim_sample_loop(counter, (4, 2), num_steps=10, eta=0.5, **kwargs)
        steps = 10
    elif sampler == "dpm++":
        d.respaced(20).dpm_solver_sample_loop(counter, (4, 2), num_steps=10, order=3, **kwargs)
        steps = 10
    else:
        d.karras_sample_loop(counter, (4, 2), num_steps=5, **kwargs)
        steps = 9   # Heun: 2 per step but the last
    assert len(counter.calls) == steps
    for n, labels in counter.calls:   # [labels; no label] in one batch of 2N
        assert n == 8 and labels.tolist() == [0, 2, 1, 2, -1, -1, -1, -1]


def test_guidance_without_labels_is_an_error():
    d = GaussianDiffusion(LINEAR_100)
    with pytest.raises(ValueError, match="needs labels"):
        d.ddim_sample_loop(mixture_oracle(d.alphas_cumprod), (4, 2), num_steps=5, guidance=1.0)


def test_samples_of_label_c_follow_component_c_of_the_mixture(backend_name):
    """With w = 0 and the exact predictors, label c's samples have the moments of Algorithm 2 run on
    component c alone (the Gaussian oracle's recursion, per coordinate)."""
    base, d = mixture_chain()
    n = 3 * 6000
    y = np.arange(n) % 3
    samples = backend.to_numpy(d.p_sample_loop(mixture_oracle(base.alphas_cumprod), (n, 2), seed=5, clip_denoised=False,
                                               model_kwargs={"y": backend.to_active(y)})).astype(np.float64)
    for c in range(3):
        for j in range(2):
            mean, variance = ancestral_moments(d.betas, MIX_MEANS[c, j], MIX_S, "fixed_small")
            assert max(z_scores(samples[y == c, j], mean, variance)) < Z_MAX, (c, j)
    # and the same chain with the unconditional predictor covers all three components about equally
    free = backend.to_numpy(d.p_sample_loop(mixture_oracle(base.alphas_cumprod), (3000, 2), seed=6,
                                            clip_denoised=False)).astype(np.float64)
    rng = np.random.default_rng(0)   # the data itself, through the same nearest-mean assignment
    data = MIX_MEANS[rng.integers(0, 3, 200000)] + MIX_S * rng.standard_normal((200000, 2))

    def shares(x):
        return np.bincount(np.argmin(((x[:, None] - MIX_MEANS[None]) ** 2).sum(-1), axis=1), minlength=3) / len(x)

    np.testing.assert_allclose(shares(free), shares(data), atol=0.03)   # standard error ~0.009


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_guided_linear_predictors_match_eq_6_exactly(sampler, mean_type, backend_name):
    """Conditional oracle N(0.5, 0.3^2), unconditional oracle N(-0.2, 0.8^2): the guided predictor
    (1 + w) eps_c - w eps_u is linear, c = (1 + w) c_c - w c_u, k likewise, so the sampler's output
    moments follow the exact recursion. For x_0 and v models the raw outputs are combined: equal to Eq. 6."""
    w, (mu_c, s_c), (mu_u, s_u) = 2.0, (0.5, 0.3), (-0.2, 0.8)
    d = GaussianDiffusion(LINEAR_100, model_mean_type=mean_type)
    cond = mixture_oracle(d.alphas_cumprod, [[mu_c]], s_c, mean_type=mean_type)
    uncond = mixture_oracle(d.alphas_cumprod, [[mu_u]], s_u, mean_type=mean_type)

    def model(x, t, y):   # each of the 4 coordinates is one scalar draw of the 1-D oracles
        y, t = (np.repeat(backend.to_numpy(a), x.shape[1]) for a in (y, t))
        x_np = Tensor(backend.to_numpy(x.data).reshape(-1, 1))
        out = np.where((y >= 0)[:, None], backend.to_numpy(cond(x_np, t)), backend.to_numpy(uncond(x_np, t)))
        return backend.xp_of(x.data).asarray(out.reshape(x.shape))

    def guided(a):
        (cc, kc), (cu, ku) = eps_coefficients(a, mu_c, s_c), eps_coefficients(a, mu_u, s_u)
        return (1 + w) * cc - w * cu, (1 + w) * kc - w * ku

    shape, kwargs = (10000, 4), dict(clip_denoised=False, model_kwargs={"y": np.zeros(10000, dtype=np.int64)},
                                     guidance=w)
    if sampler == "ancestral":
        samples = d.p_sample_loop(model, shape, seed=7, **kwargs)
        mean, variance = ancestral_moments(LINEAR_100, None, None, "fixed_small", coefficients=guided)
    else:
        samples = d.ddim_sample_loop(model, shape, num_steps=10, eta=1.0, seed=7, **kwargs)
        mean, variance = ddim_moments(LINEAR_100, None, None, 10, 1.0, coefficients=guided)
    assert max(z_scores(samples, mean, variance)) < Z_MAX
    plain = ancestral_moments(LINEAR_100, mu_c, s_c, "fixed_small")   # not vacuous: w = 0 is far from it
    assert abs(plain[0] - mean) > 0.1


def test_guidance_moves_samples_of_label_c_further_toward_component_c():
    """w > 0 samples from p(x | c) p(c | x)^w (Ho & Salimans Sec. 3.2): with two overlapping
    components, label 0's samples move away from component 1, and the Bayes classifier
    p(c | x_0) agrees with the label more often as w grows."""
    means = np.array([[1.0, 0.0], [-1.0, 0.0]])
    base, d = mixture_chain()
    oracle = mixture_oracle(base.alphas_cumprod, means, 0.7)
    shifts, agreements = [], []
    for w in (0.0, 1.0, 3.0):
        x = backend.to_numpy(d.p_sample_loop(oracle, (4000, 2), seed=8, clip_denoised=False,
                                             model_kwargs={"y": np.zeros(4000, dtype=np.int64)}, guidance=w))
        shifts.append(float(x[:, 0].mean()))       # the direction from component 1 to component 0
        agreements.append(float((x[:, 0] > 0).mean()))  # p(0 | x) > 1/2 for equal weights
    assert shifts[0] == pytest.approx(1.0, abs=0.05)   # w = 0: component 0's mean
    assert shifts[0] + 0.1 < shifts[1] < shifts[2] - 0.1
    assert agreements[0] == pytest.approx(0.923, abs=0.02)   # Phi(1 / 0.7) for the exact component
    assert agreements[0] < agreements[1] < agreements[2] and agreements[2] > 0.99


def test_interpolate_and_bpd_pass_labels_through(backend_name):
    d = GaussianDiffusion(LINEAR_100)
    counter = CallCounter(mixture_oracle(d.alphas_cumprod))
    x_a, x_b = backend.to_active(np.zeros((2, 2), np.float32)), backend.to_active(np.ones((2, 2), np.float32))
    out = d.interpolate(counter, x_a, x_b, 9, [0.0, 0.5, 1.0], seed=0, clip_denoised=False,
                        model_kwargs={"y": np.array([1, 2])}, guidance=1.0)
    assert out.shape == (3, 2, 2) and len(counter.calls) == 10
    assert counter.calls[0] == (12, counter.calls[0][1]) and counter.calls[0][1].tolist() == [1, 2] * 3 + [-1] * 6
    counter.calls.clear()
    d.calc_bpd_loop(counter, x_a, clip_denoised=False, seed=0, model_kwargs={"y": np.array([0, 1])})
    assert len(counter.calls) == 100 and all(n == 2 and y.tolist() == [0, 1] for n, y in counter.calls)


def test_default_noise_is_drawn_on_the_backend_of_x(standin):
    """x on the device while numpy is active: every path that draws its own noise stays on x's backend."""
    d = GaussianDiffusion(get_named_beta_schedule("linear", 10))
    x = standin.asarray(np.zeros((2, 1, 2, 2), np.float32))
    t = standin.asarray(np.array([3, 0]))
    backend.use_backend("numpy")
    assert isinstance(d.q_sample(x, t), standin.ndarray)
    model = lambda x_t, t_: Tensor(x_t.data * 0 if isinstance(x_t, Tensor) else x_t * 0)  # noqa: E731
    assert isinstance(d.p_sample(model, x, t)["sample"], standin.ndarray)
    assert isinstance(d.q_step(x, t), standin.ndarray)
    assert isinstance(d.training_losses(model, x, t)["loss"].data, standin.ndarray)


def test_the_ode_samplers_stay_on_the_device_backend(standin):
    """DPM-Solver++ and the Karras sampler on the strict CuPy stand-in, respaced (fractional timesteps mapped
    by xp.interp) and guided: the chain stays on the device, every coefficient a host float."""
    d = GaussianDiffusion(get_named_beta_schedule("linear", 100)).respaced(20)
    seen = []

    def model(x_t, t, y=None):
        seen.append(t)
        return Tensor(x_t.data * 0.5)
    kwargs = dict(seed=0, model_kwargs={"y": standin.asarray(np.array([1, 2]))}, guidance=1.0)
    for x in (d.dpm_solver_sample_loop(model, (2, 1, 2, 2), 5, order=3, **kwargs),
              d.karras_sample_loop(model, (2, 1, 2, 2), 3, **kwargs)):
        assert isinstance(x, standin.ndarray) and x.dtype == np.float32
    assert all(isinstance(t, standin.ndarray) for t in seen)
    fractional = [backend.to_numpy(t) for t in seen[5:]]
    assert all(t.dtype == np.float64 and 0 <= t.min() <= t.max() <= 99 for t in fractional)


# ---------------------------------------------------------------- few-step ODE samplers: orders of convergence


def log_sigma_linear_betas(num_timesteps, sigma_min=0.02, sigma_max=80.0):
    """A schedule whose sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is geometric in t (log sigma linear):
    the grid points of every spacing are then evenly spaced in lambda = -log sigma, and the Karras
    sampler's fractional timesteps are exact, so the measured error ratios are clean."""
    sigma = sigma_min * (sigma_max / sigma_min) ** (np.arange(num_timesteps) / (num_timesteps - 1))
    abar = 1.0 / (1.0 + sigma ** 2)
    return 1.0 - abar / np.append(1.0, abar[:-1])


LOGLIN = GaussianDiffusion(log_sigma_linear_betas(1001))   # T - 1 = 1000: linspace grids of 25 .. 200 steps are exact
FLOW_X = np.linspace(-3.0, 3.0, 101).reshape(-1, 1)        # the x_T of every chain: errors are deterministic


def gaussian_flow_model(alphas_cumprod, mu, s):
    """E[eps | x_t] for x_0 ~ N(mu, s^2) (as gaussian_optimal_model), at integer or fractional t, in float64."""
    def model(x, t):
        a = alpha_bar_at(alphas_cumprod, t).reshape(-1, *([1] * (x.ndim - 1)))
        return np.sqrt(1 - a) * (x.data - np.sqrt(a) * mu) / (a * s * s + 1 - a)
    return model


def exact_flow(d, mu, s, x_T, alpha_bar):
    """The probability-flow ODE's solution from x_T at noise level alpha_bar, for x_0 ~ N(mu, s^2).

    Every marginal is Gaussian, N(sqrt(a) mu, a s^2 + 1 - a), and the ODE's flow between two of them
    is the monotone (affine) map between them: the standardised value z stays constant.
    """
    a_T = d.alphas_cumprod[-1]
    z = (x_T - math.sqrt(a_T) * mu) / math.sqrt(a_T * s * s + 1 - a_T)
    return math.sqrt(alpha_bar) * mu + math.sqrt(alpha_bar * s * s + 1 - alpha_bar) * z


def flow_error(d, sampler, n, mu=0.3, s=0.5):
    """Max |x - exact| at the solver's last noise level before its final denoising step.

    The final step of every ODE sampler here maps to sigma = 0 by x_0 = D(x) (the model's x_0 prediction),
    whose error is O(sigma_min^2) whatever n is; the integration error is measured before it.
    """
    model = gaussian_flow_model(d.alphas_cumprod, mu, s)
    kwargs = dict(noise=FLOW_X, clip_denoised=False)
    if sampler.startswith("dpm"):
        chain = list(d.dpm_solver_sample_loop_progressive(model, FLOW_X.shape, n, order=int(sampler[-1]), **kwargs))
        alpha_bar = d.alphas_cumprod[dpm_solver_timesteps(d.num_timesteps, n, "linspace")[0]]
    elif sampler == "ddim":
        chain = list(d.ddim_sample_loop_progressive(model, FLOW_X.shape, n, spacing="linspace", **kwargs))
        alpha_bar = d.alphas_cumprod[ddim_timesteps(d.num_timesteps, n, "linspace")[0]]
    else:
        chain = list(d.karras_sample_loop_progressive(model, FLOW_X.shape, n, solver=sampler, **kwargs))
        alpha_bar = 1.0 / (1.0 + chain[-2]["sigma"] ** 2)
    return float(np.abs(chain[-2]["sample"] - exact_flow(d, mu, s, FLOW_X, alpha_bar)).max())


# Measured ratios err(n) / err(2n) at n = 25, 50, 100 on LOGLIN (2.0 = order 1, 4.0 = order 2, 8.0 = order 3):
#   ddim 2.00 2.00 2.00   dpm1 1.96 1.98 1.99   euler 1.99 1.99 2.00
#   dpm2 3.81 3.96 3.99   heun 4.34 4.16 4.08   dpm3 4.88 4.26 4.09
# On the paper's linear schedule the same ratios are erratic (dpm2 1.28 2.40 3.03, dpm3 69.6 0.30 5.63):
# its lambda_t is far from linear in t, so the rounded grid points are unevenly spaced in lambda.
ORDERS = {"ddim": 1, "dpm1": 1, "euler": 1, "dpm2": 2, "heun": 2, "dpm3": 2}


@pytest.mark.usefixtures("numpy_backend")
@pytest.mark.parametrize("sampler", sorted(ORDERS))
def test_each_ode_sampler_converges_at_its_order_on_the_gaussian_flow(sampler):
    """Halving the step halves the error of a first-order sampler and quarters that of a second-order one.

    DPM-Solver++ order 3 (computed as DPM-Solver's reference code and diffusers do) shows order 2 here:
    its first step is first-order and its second second-order (there is no history yet), and a first-order
    step's local error O(h^2) stays in the global error; it is still the most accurate at every n.
    """
    errors = [flow_error(LOGLIN, sampler, n) for n in (50, 100)]
    ratio = errors[0] / errors[1]
    expected = 2.0 ** ORDERS[sampler]
    assert expected * 0.9 < ratio < expected * 1.25, (sampler, errors, ratio)


@pytest.mark.usefixtures("numpy_backend")
def test_dpm_solver_order_3_is_the_most_accurate_and_a_wrong_update_fails_the_order_test(monkeypatch):
    errors = {k: flow_error(LOGLIN, k, 100) for k in ("dpm1", "dpm2", "dpm3")}
    assert errors["dpm3"] < errors["dpm2"] < errors["dpm1"] / 10
    # The order test can fail: drop the second-order correction's factor 1/2 and order 2 is lost.
    original = GaussianDiffusion._dpm_solver_update

    def wrong(x, history, lam_t, sigma_ratio, alpha_t):
        if len(history) != 2:
            return original(x, history, lam_t, sigma_ratio, alpha_t)
        (lam_s1, d_s1), (lam_s0, d0) = history
        h = lam_t - lam_s0
        x = original(x, history[-1:], lam_t, sigma_ratio, alpha_t)
        return x - alpha_t * math.expm1(-h) * (h / (lam_s0 - lam_s1)) * (d0 - d_s1)   # 1 instead of 1/2
    monkeypatch.setattr(GaussianDiffusion, "_dpm_solver_update", staticmethod(wrong))
    errors = [flow_error(LOGLIN, "dpm2", n) for n in (50, 100)]
    assert errors[0] / errors[1] < 2.5


@pytest.mark.usefixtures("numpy_backend")
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("mean_type", ["eps", "v"])
def test_dpm_solver_order_1_is_ddim(clip, mean_type):
    """First-order DPM-Solver++ is DDIM with eta = 0 (Lu et al. 2022, Sec. 4.1): the same x on the same grid,
    also with x_0 clipped (DDIM recomputes eps from the clipped x_0, DPM-Solver++ steps with it)."""
    d = GaussianDiffusion(get_named_beta_schedule("linear", 200), model_mean_type=mean_type)
    model = mixture_oracle(d.alphas_cumprod, mean_type=mean_type)
    x_T = np.random.default_rng(0).standard_normal((50, 2)) * 3
    for n in (1, 7, 20):
        ours = d.dpm_solver_sample_loop(model, x_T.shape, n, order=1, spacing="trailing", noise=x_T, clip_denoised=clip)
        ddim = d.ddim_sample_loop(model, x_T.shape, n, spacing="trailing", noise=x_T, clip_denoised=clip)
        np.testing.assert_allclose(ours, ddim, rtol=1e-5, atol=1e-5)
    assert not np.allclose(d.dpm_solver_sample_loop(model, x_T.shape, 7, order=2, spacing="trailing", noise=x_T),
                           ddim, atol=1e-3)


@pytest.mark.usefixtures("numpy_backend")
def test_the_ode_samplers_use_every_parameterisation_alike():
    """eps, x_0 and v models of the same Gaussian oracle give the same ODE samples."""
    outs = {}
    for mean_type in ("eps", "x0", "v"):
        d = GaussianDiffusion(get_named_beta_schedule("cosine", 300), model_mean_type=mean_type)
        model = mixture_oracle(d.alphas_cumprod, [[0.2, -0.4]], 0.5, mean_type=mean_type)
        outs[mean_type] = [d.dpm_solver_sample_loop(model, FLOW_X.shape[:1] + (2,), 10, order=3, seed=1),
                           d.karras_sample_loop(model, FLOW_X.shape[:1] + (2,), 8, seed=1)]
    for mean_type in ("x0", "v"):
        for a, b in zip(outs[mean_type], outs["eps"]):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


# (sampler, network calls) -> the largest relative error of the components' spread allowed. Measured with
# 6,000 samples (standard error of a spread ~1.6%): dpm2 and dpm3 0.58-0.60 at 20 calls, 0.51-0.53 at 10 (the
# data's 0.6); ddim 0.54 and 0.47, euler 0.52 and 0.44: first-order samplers lose spread at few steps;
# heun 0.75 at 19 calls and 0.64 at 39: on the paper's chain sigma_max = 157, and its second-order step
# overshoots where few Karras steps span a large ratio of sigmas (it is 1.67 at 9 calls).
MIXTURE_SPREAD = {("dpm2", 20): 0.05, ("dpm3", 20): 0.05, ("dpm2", 10): 0.2, ("dpm3", 10): 0.2,
                  ("ddim", 20): 0.15, ("euler", 20): 0.15, ("ddim", 10): 0.25, ("euler", 10): 0.3,
                  ("heun", 39): 0.1, ("heun", 19): 0.3}


@pytest.mark.parametrize("sampler,calls", sorted(MIXTURE_SPREAD))
def test_few_step_samplers_follow_each_component_of_the_mixture(sampler, calls, backend_name):
    """Labelled mixture, exact predictors, 10 or 20 network calls on the paper's 1000-step chain: label c's
    samples have component c's mean (within 0.05) and its spread (within MIXTURE_SPREAD; the ODE's target
    is the data itself), and the unconditional predictor's samples split over the components as the data does."""
    base, _ = mixture_chain()
    oracle = mixture_oracle(base.alphas_cumprod)
    n = 3 * 2000
    y = np.arange(n) % 3
    kwargs = dict(seed=5, clip_denoised=False)

    def draw(shape, **extra):
        if sampler == "ddim":
            x = base.ddim_sample_loop(oracle, shape, calls, **kwargs, **extra)
        elif sampler.startswith("dpm"):
            x = base.dpm_solver_sample_loop(oracle, shape, calls, order=int(sampler[-1]), **kwargs, **extra)
        else:
            x = base.karras_sample_loop(oracle, shape, (calls + 1) // 2 if sampler == "heun" else calls,
                                        solver=sampler, **kwargs, **extra)
        return backend.to_numpy(x).astype(np.float64)

    samples = draw((n, 2), model_kwargs={"y": backend.to_active(y)})
    for c in range(3):
        np.testing.assert_allclose(samples[y == c].mean(0), MIX_MEANS[c], atol=0.05)
        np.testing.assert_allclose(samples[y == c].std(0), MIX_S, rtol=MIXTURE_SPREAD[sampler, calls])
    free = draw((3000, 2))
    share = np.bincount(np.argmin(((free[:, None] - MIX_MEANS[None]) ** 2).sum(-1), axis=1), minlength=3) / 3000
    np.testing.assert_allclose(share, 1 / 3, atol=0.06)


@pytest.mark.usefixtures("numpy_backend")
def test_a_wrong_mixture_oracle_fails_the_few_step_check():
    base, _ = mixture_chain()
    wrong = mixture_oracle(base.alphas_cumprod, MIX_MEANS * 1.3)
    x = base.dpm_solver_sample_loop(wrong, (3000, 2), 20, seed=5, model_kwargs={"y": np.zeros(3000, np.int64)})
    assert abs(float(np.asarray(x)[:, 0].mean()) - MIX_MEANS[0, 0]) > 0.2


@pytest.mark.usefixtures("numpy_backend")
def test_karras_sigmas_span_the_chain_and_the_model_sees_their_timesteps():
    d = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    sigmas = d.karras_sigmas(10)
    sigma_t = np.sqrt((1 - d.alphas_cumprod) / d.alphas_cumprod)
    assert sigmas.shape == (11,) and sigmas[-1] == 0 and np.all(np.diff(sigmas) < 0)
    np.testing.assert_allclose(sigmas[[0, 9]], sigma_t[[-1, 0]], rtol=1e-12)
    # rho = 7: the steps in sigma^(1/7) are even (EDM Eq. 5)
    np.testing.assert_allclose(np.diff(sigmas[:-1] ** (1 / 7)), np.diff(sigmas[:-1] ** (1 / 7))[0], rtol=1e-9)
    seen = []

    def model(x, t):
        seen.append(float(np.asarray(t)[0]))
        return np.zeros_like(x.data)
    steps = list(d.karras_sample_loop_progressive(model, (2, 1), 10, noise=np.ones((2, 1))))
    assert len(seen) == 19 and len(steps) == 10 and steps[-1]["sigma"] == 0
    # each model call's t is where its sigma falls on the chain's own log sigma(t), between grid points
    expected = np.interp(np.log(sigmas[:-1]), np.log(sigma_t), np.arange(1000))
    np.testing.assert_allclose(seen[0::2], expected, rtol=1e-12, atol=1e-9)
    assert seen[0] == pytest.approx(999) and seen[-1] == pytest.approx(0, abs=1e-9)
    # a respaced chain maps its fractional index onto the original timesteps
    spaced = d.respaced(50)
    seen.clear()
    spaced.karras_sample_loop(model, (2, 1), 3, noise=np.ones((2, 1)), solver="euler")
    assert seen[0] == pytest.approx(999) and 0 <= min(seen) and max(seen) <= 999
    with pytest.raises(ValueError, match="unknown solver"):
        d.karras_sample_loop(model, (2, 1), 3, solver="rk4")


@pytest.mark.usefixtures("numpy_backend")
def test_zero_terminal_snr_chains_stay_finite_for_v_models_and_refuse_eps():
    """Lin et al. 2023: alpha_bar_T = 0. A v model's DDIM and DPM-Solver++ steps stay finite at the last
    step (lambda_T = -inf for DPM-Solver++, whose first step is then x = sigma_t x_T + alpha_t D);
    an eps model, and the Karras sampler (sigma_max = inf), are refused with one clear error."""
    betas = rescale_zero_terminal_snr(get_named_beta_schedule("linear", 1000))
    with pytest.raises(ValueError, match="zero terminal SNR.*'v'"):
        GaussianDiffusion(betas)
    d = GaussianDiffusion(betas, model_mean_type="v")
    assert d.alphas_cumprod[-1] == 0 and d.betas[-1] == 1
    for name in ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "posterior_log_variance_clipped", "model_log_variance"):
        assert np.isfinite(getattr(d, name)).all(), name
    model = mixture_oracle(np.maximum(d.alphas_cumprod, 1e-12), mean_type="v")
    x_T = np.random.default_rng(1).standard_normal((2000, 2))
    y = {"y": np.zeros(2000, np.int64)}
    for x in (d.ddim_sample_loop(model, x_T.shape, 20, noise=x_T, clip_denoised=False, spacing="trailing",
                                 model_kwargs=y),
              d.dpm_solver_sample_loop(model, x_T.shape, 20, order=3, spacing="trailing", noise=x_T, model_kwargs=y),
              d.p_sample_loop(model, x_T.shape, seed=0, clip_denoised=False, model_kwargs=y)):
        assert np.isfinite(x).all()
        np.testing.assert_allclose(x.mean(0), MIX_MEANS[0], atol=0.06)
    with pytest.raises(ValueError, match="infinite with zero terminal SNR"):
        d.karras_sample_loop(model, x_T.shape, 5, noise=x_T)


# ---------------------------------------------------------------- learned variances (Improved DDPM)


def learned_output(mean_part, var_part):
    """A model output of a learned-variance model: the mean half, then the variance half (channel axis)."""
    return np.concatenate([mean_part, var_part], axis=1)


def slow_learned_range(betas, t, v):
    """log sigma_t^2 of Improved DDPM Eq. 15 written from the betas alone: v' log beta_t + (1 - v') log beta_tilde_t,
    v' = (v + 1) / 2, with beta_tilde at code t = 0 replaced by code t = 1's (improved-diffusion's clipped log)."""
    out = np.empty_like(v)
    for i, step in enumerate(t):
        abar = np.prod(1 - betas[:step + 1])
        abar_prev = np.prod(1 - betas[:step])
        beta_tilde = betas[step] * (1 - abar_prev) / (1 - abar)
        if step == 0:
            beta_tilde = betas[1] * (1 - (1 - betas[0])) / (1 - (1 - betas[0]) * (1 - betas[1]))
        frac = (v[i] + 1) / 2
        out[i] = frac * math.log(betas[step]) + (1 - frac) * math.log(beta_tilde)
    return out


@pytest.mark.parametrize("loss_type", ["mse", "kl"])
def test_learned_range_ends_are_beta_and_beta_tilde(loss_type):
    """Eq. 15: v = 1 gives log beta_t, v = -1 log beta_tilde_t (at code t = 0 code t = 1's beta_tilde), any v in
    between the slow reference; "learned" reads the log-variance itself. The fixed variances are the two ends."""
    del loss_type   # the variance does not depend on the loss; both refusals are tested below
    d = GaussianDiffusion(LINEAR_100, model_var_type="learned_range", loss_type="hybrid")
    small = GaussianDiffusion(LINEAR_100, model_var_type="fixed_small")
    t = np.array([0, 1, 2, 50, 99])
    x = np.zeros((5, 1, 2, 2))
    for v, expected in ((1.0, np.log(LINEAR_100[t])), (-1.0, small.posterior_log_variance_clipped[t])):
        _, log_var = d.p_variance(np.full(x.shape, v), x, t)
        np.testing.assert_allclose(log_var[:, 0, 0, 0], expected, rtol=1e-13)
    v = np.random.default_rng(0).uniform(-1, 1, x.shape)
    variance, log_var = d.p_variance(v, x, t)
    np.testing.assert_allclose(log_var, slow_learned_range(LINEAR_100, t, v), rtol=1e-12)
    np.testing.assert_allclose(variance, np.exp(log_var), rtol=1e-15)
    learned = GaussianDiffusion(LINEAR_100, model_var_type="learned", loss_type="kl")
    variance, log_var = learned.p_variance(v, x, t)
    np.testing.assert_array_equal(log_var, v)
    np.testing.assert_allclose(variance, np.exp(v), rtol=1e-15)


def test_a_respaced_learned_range_spans_the_respaced_chains_beta_and_beta_tilde():
    """On a respaced chain Eq. 15 interpolates between that chain's own beta and beta_tilde (diffusers PR #3006)."""
    d = GaussianDiffusion(LINEAR_100, model_var_type="learned_range", loss_type="hybrid").respaced(10)
    kept = d.timestep_map
    abar = np.cumprod(1 - LINEAR_100)[kept]
    beta = 1 - abar / np.append(1.0, abar[:-1])                      # the respaced chain's beta, from alpha_bar
    t = np.arange(10)
    x = np.zeros((10, 1, 1, 1))
    _, log_var = d.p_variance(np.ones(x.shape), x, t)
    np.testing.assert_allclose(log_var.ravel(), np.log(beta), rtol=1e-10)
    _, log_var = d.p_variance(-np.ones(x.shape), x, t)
    beta_tilde = beta * (1 - np.append(1.0, abar[:-1])) / (1 - abar)
    np.testing.assert_allclose(log_var.ravel()[1:], np.log(beta_tilde[1:]), rtol=1e-10)
    assert not np.allclose(np.log(beta), np.log(LINEAR_100[kept]))   # the original betas would be wrong


def test_variance_and_loss_combinations_that_cannot_train_are_refused():
    """hybrid with a fixed variance and mse with a learned one: one error each naming the working combination."""
    with pytest.raises(ValueError, match="learned_range.*--learn-sigma"):
        GaussianDiffusion(LINEAR_100, model_var_type="fixed_large", loss_type="hybrid")
    with pytest.raises(ValueError, match="no gradient.*hybrid"):
        GaussianDiffusion(LINEAR_100, model_var_type="learned_range", loss_type="mse")
    with pytest.raises(ValueError, match="vlb_weight"):
        GaussianDiffusion(LINEAR_100, model_var_type="learned_range", loss_type="hybrid", vlb_weight=-1.0)
    GaussianDiffusion(LINEAR_100, model_var_type="learned", loss_type="kl")   # the bound alone trains both halves


def test_a_learned_variance_model_must_output_twice_the_channels():
    d = GaussianDiffusion(LINEAR_100, model_var_type="learned_range", loss_type="hybrid")
    assert d.output_channels(3) == 6
    with pytest.raises(ValueError, match=r"two values per input value.*\(2, 2, 2, 2\)"):
        d.p_sample_loop(constant_model(np.zeros((2, 1, 2, 2))), (2, 1, 2, 2), seed=0)


def hybrid_case(mean_type="eps", t=(0, 1, 40, 99), betas=LINEAR_100):
    rng = np.random.default_rng(5)
    x_start = rng.integers(0, 256, (len(t), 1, 2, 2)) / 127.5 - 1.0   # 8-bit grid, for the decoder at t = 0
    noise = rng.standard_normal(x_start.shape)
    mean_part, var_part = rng.standard_normal(x_start.shape) * 0.5, rng.uniform(-0.9, 0.9, x_start.shape)
    return x_start, noise, np.array(t), mean_part, var_part


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_the_hybrid_loss_is_l_simple_plus_lambda_t_times_the_bounds_term(mean_type):
    """loss = mse + vlb_weight * T * vb: at T = 1000 and lambda = 0.001 exactly mse + vb (improved-diffusion's
    rescaled MSE), with T the chain's own length; mse and vb are the "mse" and "kl" losses of the same output."""
    for betas, weight in ((LINEAR_100, 0.001), (get_named_beta_schedule("linear", 1000), 0.001),
                          (LINEAR_100, 0.25)):
        x_start, noise, t, mean_part, var_part = hybrid_case(mean_type)
        out = learned_output(mean_part, var_part)
        hybrid = GaussianDiffusion(betas, mean_type, "learned_range", "hybrid", vlb_weight=weight)
        kl = GaussianDiffusion(betas, mean_type, "learned_range", "kl")
        losses = hybrid.training_losses(constant_model(out), x_start, t, noise)
        vb = kl.training_losses(constant_model(out), x_start, t, noise)["loss"].data
        simple = GaussianDiffusion(betas, mean_type).training_losses(constant_model(mean_part), x_start, t, noise)
        np.testing.assert_allclose(losses["mse"].data, simple["loss"].data, rtol=1e-14)
        np.testing.assert_allclose(losses["vb"].data, vb, rtol=1e-14)
        np.testing.assert_allclose(losses["loss"].data, simple["loss"].data + weight * betas.size * vb, rtol=1e-13)
        if betas.size == 1000 and weight == 0.001:
            np.testing.assert_allclose(losses["loss"].data, simple["loss"].data + vb, rtol=1e-13)


def slow_vb_terms(betas, x_start, x_t, t, eps_hat, v, num_bins=256):
    """improved-diffusion's _vb_terms_bpd for an eps model with a learned_range variance, from the betas alone,
    with scipy-free exact erf-free formulas: the KL between Gaussians (Eq. 5) and the tanh-CDF decoder (Eq. 13)."""
    out = np.empty(len(t))
    log_var = slow_learned_range(betas, t, v)
    for i, step in enumerate(t):
        abar = np.prod(1 - betas[:step + 1])
        abar_prev = np.prod(1 - betas[:step])
        x0_hat = (x_t[i] - math.sqrt(1 - abar) * eps_hat[i]) / math.sqrt(abar)
        c1 = betas[step] * math.sqrt(abar_prev) / (1 - abar)
        c2 = (1 - abar_prev) * math.sqrt(1 - betas[step]) / (1 - abar)
        mean = c1 * x0_hat + c2 * x_t[i]
        if step == 0:
            h = 1.0 / (num_bins - 1)
            cdf = lambda z: 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
            inv = np.exp(-0.5 * log_var[i])
            c = x_start[i] - mean
            lo, hi = cdf(inv * (c - h)), cdf(inv * (c + h))
            p = np.where(x_start[i] < -0.999, hi, np.where(x_start[i] > 0.999, 1 - lo, hi - lo))
            out[i] = -np.log(np.maximum(p, 1e-12)).mean() / math.log(2)
        else:
            true_mean = c1 * x_start[i] + c2 * x_t[i]
            true_var = betas[step] * (1 - abar_prev) / (1 - abar)
            kl = 0.5 * (-1 + log_var[i] - math.log(true_var) + true_var / np.exp(log_var[i])
                        + (true_mean - mean) ** 2 / np.exp(log_var[i]))
            out[i] = kl.mean() / math.log(2)
    return out


def test_the_learned_range_bound_matches_improved_diffusions_formulas():
    """The bound's terms with a learned_range variance (the "kl" loss, and calc_bpd_loop's columns) equal a slow
    reference of improved-diffusion's p_mean_variance and _vb_terms_bpd written from the betas alone."""
    x_start, noise, t, eps_hat, v = hybrid_case()
    d = GaussianDiffusion(LINEAR_100, "eps", "learned_range", "kl")
    x_t = d.q_sample(x_start, t, noise)
    vb = d.training_losses(constant_model(learned_output(eps_hat, v)), x_start, t, noise)["loss"].data
    np.testing.assert_allclose(vb, slow_vb_terms(LINEAR_100, x_start, x_t, t, eps_hat, v), rtol=1e-10)


def test_the_stop_gradient_sends_l_simple_to_the_mean_and_lambda_t_vb_to_the_variance():
    """d loss / d mean half = d mse / d mean half alone (Sec. 3.1's stop-gradient); d loss / d variance half =
    lambda T d vb / d v. Both against central differences of the separate terms, in float64."""
    x_start, noise, t, mean_part, var_part = hybrid_case()
    weight = 0.01
    d = GaussianDiffusion(LINEAR_100, "eps", "learned_range", "hybrid", vlb_weight=weight)
    out = Tensor(learned_output(mean_part, var_part), requires_grad=True)
    d.training_losses(lambda x, t_: out, x_start, t, noise)["loss"].sum().backward()
    grad_mean, grad_var = out.grad[:, :1], out.grad[:, 1:]

    def term(name, m, v):
        return float(d.training_losses(constant_model(learned_output(m, v)), x_start, t, noise)[name].data.sum())

    h = 1e-6
    rng = np.random.default_rng(9)
    for _ in range(3):   # random directions: the whole Jacobian, not one entry
        dm, dv = rng.standard_normal(mean_part.shape), rng.standard_normal(var_part.shape)
        mse_slope = (term("mse", mean_part + h * dm, var_part) - term("mse", mean_part - h * dm, var_part)) / (2 * h)
        vb_slope = (term("vb", mean_part, var_part + h * dv) - term("vb", mean_part, var_part - h * dv)) / (2 * h)
        assert float((grad_mean * dm).sum()) == pytest.approx(mse_slope, rel=1e-6)
        assert float((grad_var * dv).sum()) == pytest.approx(weight * 100 * vb_slope, rel=1e-6)
        # vb does depend on the mean half, yet none of that reaches the gradient: the stop-gradient
        vb_mean_slope = (term("vb", mean_part + h * dm, var_part) - term("vb", mean_part - h * dm, var_part)) / (2 * h)
        assert abs(vb_mean_slope) > 1e-3


def test_the_kl_loss_with_a_learned_variance_trains_both_halves():
    """loss_type "kl": no stop-gradient, the bound's gradient reaches the mean half too (central differences)."""
    x_start, noise, t, mean_part, var_part = hybrid_case()
    d = GaussianDiffusion(LINEAR_100, "eps", "learned_range", "kl")
    out = Tensor(learned_output(mean_part, var_part), requires_grad=True)
    d.training_losses(lambda x, t_: out, x_start, t, noise)["loss"].sum().backward()
    h, direction = 1e-6, np.random.default_rng(3).standard_normal(out.shape)
    base = learned_output(mean_part, var_part)

    def loss(o):
        return float(d.training_losses(constant_model(o), x_start, t, noise)["loss"].data.sum())

    slope = (loss(base + h * direction) - loss(base - h * direction)) / (2 * h)
    assert float((out.grad * direction).sum()) == pytest.approx(slope, rel=1e-6)
    assert np.abs(out.grad[:, :1]).max() > 0


@pytest.mark.parametrize("s", [0.5, 1.0, 0.05])
def test_the_learned_range_optimum_is_the_true_reverse_variance_of_gaussian_data(s):
    """The closed-form oracle. For x_0 ~ N(0, s^2) and the exact eps model E[eps | x_t], the bound's term L_{t-1}
    over sigma_t^2 is least at Var(x_{t-1} | x_t) = beta_tilde_t + c1^2 Var(x_0 | x_t) (c1 = posterior_mean_coef1,
    Var(x_0 | x_t) = s^2 (1 - abar) / (abar s^2 + 1 - abar)): beta_t for s = 1 (v = 1), beta_tilde_t as s -> 0
    (v = -1), in between otherwise. A learned_range v trained on the Monte-Carlo bound must land there."""
    betas = LINEAR_100
    d = GaussianDiffusion(betas, "eps", "learned_range", "kl")
    eps_model = gaussian_optimal_model(d.alphas_cumprod, 0.0, s)
    rng = np.random.default_rng(4)
    n = 20000
    for step in (5, 30, 80):
        abar, abar_prev = d.alphas_cumprod[step], d.alphas_cumprod_prev[step]
        var_x0 = s * s * (1 - abar) / (abar * s * s + 1 - abar)
        optimum = d.posterior_variance[step] + d.posterior_mean_coef1[step] ** 2 * var_x0
        v_star = 2 * (math.log(optimum) - math.log(d.posterior_variance[step])) / (
            math.log(betas[step]) - math.log(d.posterior_variance[step])) - 1
        x_start = rng.standard_normal((n, 1, 1, 1)) * s
        noise = rng.standard_normal(x_start.shape)
        t = np.full(n, step)

        def model_with(v):
            return lambda x, t_: np.concatenate([eps_model(x, t_), np.full(x.shape, v)], axis=1)

        grid = np.linspace(-1, 1, 81)
        bound = [d.training_losses(model_with(v), x_start, t, noise)["loss"].data.mean() for v in grid]
        found = grid[int(np.argmin(bound))]
        assert found == pytest.approx(float(np.clip(v_star, -1, 1)), abs=0.06), (step, v_star)
        del abar_prev
    assert s != 1.0 or v_star == pytest.approx(1.0, abs=1e-9)


def test_every_sampler_uses_the_mean_half_and_ancestral_sampling_the_learned_variance():
    """DDIM, DPM-Solver++ and Heun/Euler give exactly the fixed-variance chain's samples on the mean half; Algorithm 2
    with v = 1 is the fixed_large chain (the same noise) at every step but t = 0, where no noise is added."""
    d = GaussianDiffusion(LINEAR_100, "eps", "learned_range", "hybrid")
    fixed = GaussianDiffusion(LINEAR_100, "eps", "fixed_large")
    flow_model = gaussian_flow_model(d.alphas_cumprod, 0.2, 0.5)   # fractional t too (the Karras sampler)

    def eps_model(x, t):
        return flow_model(x, t).astype(x.data.dtype)

    def learned(x, t):
        return np.concatenate([eps_model(x, t), np.ones(x.shape, dtype=x.data.dtype)], axis=1)

    shape = (6, 1, 2, 2)
    for method, kw in (("ddim_sample_loop", {"num_steps": 10}), ("dpm_solver_sample_loop", {"num_steps": 8}),
                       ("karras_sample_loop", {"num_steps": 5}), ("p_sample_loop", {})):
        ours = getattr(d, method)(learned, shape, seed=3, **kw)
        theirs = getattr(fixed, method)(eps_model, shape, seed=3, **kw)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=method)
    low = GaussianDiffusion(LINEAR_100, "eps", "fixed_small")
    ours = d.p_sample_loop(lambda x, t: np.concatenate([eps_model(x, t), -np.ones(x.shape, np.float32)], axis=1),
                           shape, seed=3)
    np.testing.assert_allclose(ours, low.p_sample_loop(eps_model, shape, seed=3), rtol=1e-5, atol=1e-6)


def test_the_learned_variance_reaches_the_bound_and_bits_per_dim():
    """calc_bpd_loop with v = -1 is the fixed_small bound column by column (both use the clipped log at t = 0)."""
    rng = np.random.default_rng(2)
    x_start = rng.integers(0, 256, (3, 1, 2, 2)) / 127.5 - 1.0
    eps_model = gaussian_optimal_model(np.cumprod(1 - LINEAR_100), 0.0, 0.5)
    d = GaussianDiffusion(LINEAR_100, "eps", "learned_range", "hybrid")
    small = GaussianDiffusion(LINEAR_100, "eps", "fixed_small")
    ours = d.calc_bpd_loop(lambda x, t: np.concatenate([eps_model(x, t), -np.ones(x.shape)], axis=1), x_start, seed=1)
    theirs = small.calc_bpd_loop(eps_model, x_start, seed=1)
    np.testing.assert_allclose(ours["vb"], theirs["vb"], rtol=1e-10)
    half = d.calc_bpd_loop(lambda x, t: np.concatenate([eps_model(x, t), np.zeros(x.shape)], axis=1), x_start, seed=1)
    assert not np.allclose(half["vb"][:, 1:], theirs["vb"][:, 1:])   # the variance half is read


def test_guidance_combines_the_eps_halves_and_keeps_the_conditional_variance():
    """(1 + w) eps(y) - w eps(no label) on the first C channels (Eq. 6); the variance half is the conditional one."""
    d = GaussianDiffusion(LINEAR_100, "eps", "learned_range", "hybrid")

    def model(x, t, y):
        y = np.asarray(y, dtype=np.float64).reshape(-1, 1, 1, 1)
        eps = 0.1 * x.data + y                       # depends on the label
        v = np.tanh(0.3 * y) * np.ones_like(x.data)  # so does the variance
        return np.concatenate([eps, v], axis=1)

    x = np.random.default_rng(0).standard_normal((2, 1, 2, 2))
    t = np.array([10, 50])
    y = np.array([3, 5])
    out = d._call_model(model, x, t, {"y": y}, guidance=2.0, with_variance=True)
    cond = model(Tensor(x), t, y)
    uncond = model(Tensor(x), t, np.full(2, -1))
    np.testing.assert_allclose(out[:, :1], 3 * cond[:, :1] - 2 * uncond[:, :1], rtol=1e-12)
    np.testing.assert_array_equal(out[:, 1:], cond[:, 1:])
    mean_only = d._call_model(model, x, t, {"y": y}, guidance=2.0)
    np.testing.assert_array_equal(mean_only, out[:, :1])


def test_learned_variances_stay_on_the_device_backend(standin):
    """The hybrid loss, guided ancestral sampling on a respaced chain and the bound with a learned_range
    variance on the strict CuPy stand-in: every array stays on the device in float32."""
    d = GaussianDiffusion(LINEAR_100, "eps", "learned_range", "hybrid")
    w = Tensor(standin.asarray(np.float32(0.3)), requires_grad=True)

    def model(x_t, t, y=None):
        return ops.concatenate([x_t * w, x_t * 0.0 + 0.5], axis=1)

    x_start = standin.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 1, 2, 2)).astype(np.float32))
    losses = d.training_losses(model, x_start, standin.asarray(np.array([0, 50])))
    losses["loss"].mean().backward()
    assert isinstance(w.grad, standin.ndarray) and losses["loss"].data.dtype == np.float32
    kwargs = dict(seed=0, model_kwargs={"y": standin.asarray(np.array([1, 2]))}, guidance=1.0)
    x = d.respaced(5).p_sample_loop(model, (2, 1, 2, 2), **kwargs)
    assert isinstance(x, standin.ndarray) and x.dtype == np.float32
    bpd = d.respaced(5).calc_bpd_loop(model, x_start, seed=0)
    assert isinstance(bpd["total_bpd"], standin.ndarray)
