"""minidiff's few-step samplers held to diffusers' schedulers: the same model, the same x_T, the same x_0.

One deterministic smooth model, eps(x, t) = tanh(0.8 x + 1.5 t / T - 0.4) + 0.2 sin(t / 60) (read as
v where the chain predicts v), is run through minidiff's loop and through a diffusers scheduler's loop, driven as a
pipeline drives it (set_timesteps, scale_model_input, model, step), with t passed as each side gives it;
x_T (shape (4, 1, 4, 4); T = 1000 linear betas 1e-4 .. 0.02, given to every scheduler) is the same array on
both sides.
minidiff runs in float64, diffusers as it does (float32 samples and sigmas), so the outputs are held
to 1e-4 of their scale: max |ours - theirs| / max |theirs| <= 1e-4, and entrywise rtol 1e-4 with atol
1e-4 max |theirs| (atol 1e-5 at least).

Held to diffusers:
  1. dpm_solver_sample_loop(order=k, spacing=s) is DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
     solver_order=k, lower_order_final=True, final_sigmas_type="zero", solver_type="midpoint",
     timestep_spacing=s), orders 1-3, every spacing, eps and v, with fewer and more than 15 steps; its model
     calls are at dpm_solver_timesteps (reversed), which equal diffusers' grids (trailing: see 6b).
  2. (minidiff alone) order-1 DPM-Solver++ is DDIM with eta = 0 on the same ("trailing") grid.
  3. karras_sample_loop(solver="euler"|"heun") is EulerDiscreteScheduler / HeunDiscreteScheduler with
     use_karras_sigmas=True, timestep_spacing="linspace": the same sigmas (schedule.karras_sigmas), the same
     fractional timesteps, n and 2n - 1 model calls, the same x_0.
  4. ddim_sample_loop(clip_denoised=False) is DDIMScheduler(clip_sample=False) with "trailing" spacing
     where n divides T, with set_alpha_to_one=False, with steps_offset=1, and with rescale_betas_zero_snr=True
     for a v model.
  5. schedule.rescale_zero_terminal_snr is diffusers' rescale_zero_terminal_snr (float64).

Different by design (pinned by tests, so that a change on either side is noticed):
  - The Karras sampler starts from x = sqrt(1 + sigma_max^2) x_T, x_T ~ N(0, I): the VP chain's x_T
    scaled into x = x_t / sqrt(alpha_bar). diffusers' init_noise_sigma for "linspace" (and "trailing") is
    sigma_max, not sqrt(sigma_max^2 + 1), so its pipelines start from a slightly narrower x; here its
    loop is fed minidiff's starting x, noise * sqrt(1 + sigma_max^2).
  - 6a. DDIMScheduler steps from t to t - T // n, which is not the next point of its own "linspace" or
    "trailing" grid when n does not divide T (and "linspace"'s last steps go to t = 11 and then to
    alpha_bar = 1); minidiff always steps to the next grid point.
  - 6b. diffusers' "trailing" grid is np.arange(T, 0, -T / n) in floats: float error decides the
    ties (T = 1000, n = 48: 186 where the exact value 187.5 rounds half to even to 188, minus 1 = 187) and
    can add an (n + 1)-th point, timestep -1 (n = 61); minidiff rounds the exact rational and gives
    exactly n distinct timesteps.
Needs torch and diffusers (the `compat` extra): skips without it, and fails in CI.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
from conftest import compat_import

from minidiff import backend, schedule
from minidiff.diffusion import GaussianDiffusion
from minidiff.tensor import Tensor

pytestmark = pytest.mark.usefixtures("numpy_backend")  # the model hands back host float64 arrays

T = 1000
SHAPE = (4, 1, 4, 4)
RTOL, ATOL = 1e-4, 1e-5
# diffusers' DDIM, DPM-Solver and Euler schedulers default to this schedule, HeunDiscreteScheduler to
# beta 0.00085 .. 0.012 (Stable Diffusion's): every scheduler here is given it explicitly
SCHEDULE = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}   # minidiff's model_mean_type -> diffusers' prediction_type


@pytest.fixture(scope="module")
def diffusers():
    compat_import("torch")
    return compat_import("diffusers")


def betas():
    return schedule.get_named_beta_schedule("linear", T)


def x_T(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


class Model:
    """eps(x, t) = tanh(0.8 x + 1.5 t / T - 0.4) + 0.2 sin(t / 60): smooth, nonlinear in x, and curved enough in t
    that the multistep orders and the lower-order rules change x_0 well beyond the tolerance (see
    test_the_comparison_tells_the_solver_variants_apart). Records every t it is shown."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, **kwargs):
        x = backend.to_numpy(x.data if isinstance(x, Tensor) else x).astype(np.float64)
        t = np.asarray(backend.to_numpy(t), dtype=np.float64)
        self.calls.append(float(t.reshape(-1)[0]))
        t = t.reshape(-1, *([1] * (x.ndim - 1)))
        return np.tanh(0.8 * x + 1.5 * t / T - 0.4) + 0.2 * np.sin(t / 60.0)


def run_diffusers(scheduler, num_steps, sample, model, **step_kwargs):
    """A pipeline's loop: set_timesteps, then per timestep scale_model_input, the model, step; float32 tensors."""
    import torch
    scheduler.set_timesteps(num_steps)
    sample = torch.from_numpy(np.asarray(sample, dtype=np.float32))
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        out = model(model_input.numpy(), t.numpy())
        sample = scheduler.step(torch.from_numpy(out.astype(np.float32)), t, sample, **step_kwargs).prev_sample
    return sample.numpy()


def assert_matches(ours, theirs, case, rtol=RTOL, atol=ATOL):
    ours, theirs = backend.to_numpy(ours).astype(np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape and np.isfinite(ours).all()
    rel = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
    print(f"{case}: max relative difference {rel:.2e}")   # shown with pytest -s
    # relative to the output's scale (as tests/test_pretrained.py holds the U-Net): diffusers' float32 leaves
    # ~1e-7 of the largest value in every entry, so a tiny entry is held to the scale, not to its own size
    assert rel <= rtol, f"{case}: max |ours - theirs| / max |theirs| = {rel:.3e} > {rtol:.0e}"
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=max(atol, rtol * float(np.max(np.abs(theirs)))),
                               err_msg=case)
    return rel


def exact_trailing(n):
    """round-half-even(T (n - k) / n) - 1 for k = n-1 .. 0, in exact rational arithmetic (increasing)."""
    return np.array([round(Fraction(T * j, n)) - 1 for j in range(1, n + 1)], dtype=np.int64)


# ---------------------------------------------------------------- 1. DPM-Solver++ against DPMSolverMultistepScheduler


@pytest.mark.parametrize("mean_type", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("num_steps", [5, 10, 20])
def test_dpm_solver_equals_dpm_solver_multistep_scheduler(diffusers, num_steps, order, spacing, mean_type):
    ours_model, their_model = Model(), Model()
    diffusion = GaussianDiffusion(betas(), model_mean_type=mean_type)
    noise = x_T(order)
    ours = diffusion.dpm_solver_sample_loop(ours_model, SHAPE, num_steps=num_steps, order=order, spacing=spacing,
                                            noise=noise.astype(np.float64))
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **SCHEDULE, algorithm_type="dpmsolver++", solver_order=order, lower_order_final=True, final_sigmas_type="zero",
        solver_type="midpoint", timestep_spacing=spacing, prediction_type=PREDICTIONS[mean_type])
    theirs = run_diffusers(scheduler, num_steps, noise, their_model)
    grid = schedule.dpm_solver_timesteps(T, num_steps, spacing)[::-1]
    assert ours_model.calls == their_model.calls == grid.tolist()            # n calls, at the same timesteps
    assert_matches(ours, theirs, f"dpm++ order {order} {spacing} {mean_type} n={num_steps}")


def test_the_comparison_tells_the_solver_variants_apart(diffusers):
    """The tolerance has teeth: with this model, diffusers' other DPM-Solver++ variants (no lower order near the
    end, the "heun" form of the second-order term) and the other orders land well outside 1e-4 of minidiff's."""
    diffusion = GaussianDiffusion(betas())
    noise = x_T(3)
    ours = diffusion.dpm_solver_sample_loop(Model(), SHAPE, num_steps=10, order=3, noise=noise.astype(np.float64))

    def apart(**config):
        theirs = run_diffusers(diffusers.DPMSolverMultistepScheduler(**SCHEDULE, **config), 10, noise, Model())
        return float(np.max(np.abs(backend.to_numpy(ours) - theirs)) / np.max(np.abs(theirs)))

    assert apart(solver_order=3) < 1e-5
    for config in (dict(solver_order=3, lower_order_final=False), dict(solver_order=3, solver_type="heun"),
                   dict(solver_order=2), dict(solver_order=1)):
        assert apart(**config) > 3e-4, config


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpm_solver_timesteps_are_the_schedulers(diffusers, spacing):
    """dpm_solver_timesteps (reversed) is DPMSolverMultistepScheduler.timesteps for n = 1 .. 200; for "trailing"
    wherever diffusers' float arange gives the exact grid (elsewhere it has a tie decided by float error or an
    extra timestep -1, and minidiff keeps the exact one: 6b)."""
    off_exact = []
    for n in range(1, 201):
        ours = schedule.dpm_solver_timesteps(T, n, spacing)
        assert len(np.unique(ours)) == n and ours.min() >= 0 and ours.max() <= T - 1
        scheduler = diffusers.DPMSolverMultistepScheduler(**SCHEDULE, timestep_spacing=spacing)
        scheduler.set_timesteps(n)
        theirs = scheduler.timesteps.numpy()
        if spacing == "trailing":
            np.testing.assert_array_equal(ours, exact_trailing(n))
            if len(theirs) != n or not np.array_equal(theirs, ours[::-1]):
                ties = any(2 * (T * j % n) == n for j in range(1, n + 1))
                assert ties or (len(theirs) == n + 1 and theirs[-1] == -1), n
                off_exact.append(n)
                continue
        np.testing.assert_array_equal(theirs, ours[::-1], err_msg=f"n={n}")
    if spacing == "trailing":
        assert 48 in off_exact and 61 in off_exact and len(off_exact) < 20


# ---------------------------------------------------------------- 2. order 1 is DDIM (minidiff alone)


@pytest.mark.parametrize("mean_type", ["eps", "v"])
@pytest.mark.parametrize("num_steps", [5, 10, 20])
def test_first_order_dpm_solver_is_ddim_on_the_same_grid(num_steps, mean_type):
    """DPM-Solver++ 1 (Lu et al. 2022, Sec. 4.1) is DDIM with eta = 0; "trailing" is the same grid for both, and
    both end at alpha_bar = 1 (sigma = 0; set_alpha_to_one)."""
    diffusion = GaussianDiffusion(betas(), model_mean_type=mean_type)
    noise = x_T(1).astype(np.float64)
    dpm = diffusion.dpm_solver_sample_loop(Model(), SHAPE, num_steps=num_steps, order=1, spacing="trailing",
                                           noise=noise)
    ddim = diffusion.ddim_sample_loop(Model(), SHAPE, num_steps=num_steps, eta=0.0, noise=noise, clip_denoised=False,
                                      spacing="trailing")
    np.testing.assert_array_equal(schedule.dpm_solver_timesteps(T, num_steps, "trailing"),
                                  schedule.ddim_timesteps(T, num_steps, "trailing"))
    assert_matches(dpm, ddim, f"dpm++ 1 vs ddim {mean_type} n={num_steps}", rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- 3. Karras Euler and Heun against diffusers


@pytest.mark.parametrize("mean_type", ["eps", "v"])
@pytest.mark.parametrize("num_steps", [5, 20])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_karras_sampler_equals_euler_and_heun_schedulers(diffusers, solver, num_steps, mean_type):
    diffusion = GaussianDiffusion(betas(), model_mean_type=mean_type)
    cls = diffusers.EulerDiscreteScheduler if solver == "euler" else diffusers.HeunDiscreteScheduler
    scheduler = cls(**SCHEDULE, use_karras_sigmas=True, timestep_spacing="linspace",
                    prediction_type=PREDICTIONS[mean_type])
    np.testing.assert_allclose(scheduler.betas.double().numpy(), diffusion.betas, rtol=1e-6)
    scheduler.set_timesteps(num_steps)

    sigma = diffusion.sqrt_recipm1_alphas_cumprod                 # sqrt((1 - alpha_bar) / alpha_bar)
    ours_sigmas = schedule.karras_sigmas(float(sigma[0]), float(sigma[-1]), num_steps, 7.0)
    np.testing.assert_array_equal(ours_sigmas, diffusion.karras_sigmas(num_steps))
    their_sigmas = scheduler.sigmas.double().numpy()
    if solver == "heun":                                           # sigma_0, then each later sigma twice, then 0
        their_sigmas = np.concatenate([their_sigmas[:1], their_sigmas[1:-1:2], their_sigmas[-1:]])
    assert their_sigmas[-1] == 0 and len(their_sigmas) == num_steps + 1
    # The same formula (EDM Eq. 5, rho = 7) on diffusers' own end points ...
    on_their_ends = schedule.karras_sigmas(float(their_sigmas[-2]), float(their_sigmas[0]), num_steps, 7.0)
    np.testing.assert_allclose(their_sigmas[:-1], on_their_ends[:-1], rtol=1e-6)
    # ... which are minidiff's up to diffusers' float32 alpha_bar: 1 - alpha_bar_0 = 1e-4 loses ~6e-8 to
    # cancellation there, so sigma_min = sqrt((1 - alpha_bar_0) / alpha_bar_0) is off by ~8e-5 relative.
    np.testing.assert_allclose(their_sigmas[:-1], ours_sigmas[:-1], rtol=2e-4)
    np.testing.assert_allclose(their_sigmas[0], ours_sigmas[0], rtol=1e-6)

    noise = x_T(2)
    start = noise.astype(np.float64) * math.sqrt(1.0 + float(ours_sigmas[0]) ** 2)
    ours_model, their_model = Model(), Model()
    ours = diffusion.karras_sample_loop(ours_model, SHAPE, num_steps=num_steps, solver=solver,
                                        noise=noise.astype(np.float64))
    # diffusers' init_noise_sigma would be sigma_max: feed it minidiff's starting x instead (module docstring)
    theirs = run_diffusers(cls(**SCHEDULE, use_karras_sigmas=True, timestep_spacing="linspace",
                               prediction_type=PREDICTIONS[mean_type]), num_steps, start, their_model)
    calls = num_steps if solver == "euler" else 2 * num_steps - 1
    assert len(ours_model.calls) == len(their_model.calls) == calls
    # the fractional timesteps: diffusers' sigmas and log-sigma table come from its float32 alpha_bar, which
    # moves them by up to ~3e-5 relative (0.005 of a timestep)
    np.testing.assert_allclose(ours_model.calls, their_model.calls, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(their_model.calls, scheduler.timesteps.numpy(), rtol=0, atol=0)
    assert_matches(ours, theirs, f"karras {solver} {mean_type} n={num_steps}")
    # Most of that difference is diffusers' float32 alpha_bar (its sigmas, and the fractional timesteps the model
    # sees): minidiff on the chain of diffusers' own alpha_bar table agrees to 1e-5 (over 20 times closer for v, n = 5).
    their_table = scheduler.alphas_cumprod.double().numpy()
    same_table = GaussianDiffusion(1.0 - their_table / np.append(1.0, their_table[:-1]), model_mean_type=mean_type)
    start = noise.astype(np.float64) * math.sqrt(1.0 + float(same_table.karras_sigmas(num_steps)[0]) ** 2)
    theirs = run_diffusers(cls(**SCHEDULE, use_karras_sigmas=True, timestep_spacing="linspace",
                               prediction_type=PREDICTIONS[mean_type]), num_steps, start, Model())
    assert_matches(same_table.karras_sample_loop(Model(), SHAPE, num_steps=num_steps, solver=solver,
                                                 noise=noise.astype(np.float64)),
                   theirs, f"karras {solver} {mean_type} n={num_steps}, diffusers' alpha_bar", rtol=1e-5)


# ---------------------------------------------------------------- 4. DDIM against DDIMScheduler


DDIM_CASES = {   # case -> (minidiff GaussianDiffusion kwargs / zero SNR, ddim_sample_loop kwargs, DDIMScheduler kwargs)
    "trailing": (False, dict(spacing="trailing"), dict(timestep_spacing="trailing")),
    "leading, set_alpha_to_one=False": (False, dict(spacing="leading", set_alpha_to_one=False),
                                        dict(timestep_spacing="leading", set_alpha_to_one=False)),
    "leading, steps_offset=1": (False, dict(spacing="leading", steps_offset=1),
                                dict(timestep_spacing="leading", steps_offset=1)),
    "trailing, zero terminal SNR": (True, dict(spacing="trailing"),
                                    dict(timestep_spacing="trailing", rescale_betas_zero_snr=True)),
}


@pytest.mark.parametrize("num_steps", [10, 20, 50])
@pytest.mark.parametrize("case, mean_type", [(case, mean_type) for case in DDIM_CASES for mean_type in ("eps", "v")
                                             if mean_type == "v" or not DDIM_CASES[case][0]])  # zero SNR: v only
def test_ddim_equals_ddim_scheduler(diffusers, case, mean_type, num_steps):
    """n divides T, so diffusers' step to t - T // n is the next grid point (6a); no clipping on either side.
    Zero terminal SNR is a v model's (alpha_bar_T = 0: an eps model cannot give x_0 there)."""
    zero_snr, ours_kwargs, their_kwargs = DDIM_CASES[case]
    chain_betas = schedule.rescale_zero_terminal_snr(betas()) if zero_snr else betas()
    diffusion = GaussianDiffusion(chain_betas, model_mean_type=mean_type)
    scheduler = diffusers.DDIMScheduler(**SCHEDULE, clip_sample=False, prediction_type=PREDICTIONS[mean_type],
                                        **their_kwargs)
    np.testing.assert_allclose(diffusion.alphas_cumprod, scheduler.alphas_cumprod.double().numpy(),
                               rtol=2e-5, atol=1e-7)
    if zero_snr:
        assert diffusion.alphas_cumprod[-1] == 0
    noise = x_T(3)
    ours_model, their_model = Model(), Model()
    ours = diffusion.ddim_sample_loop(ours_model, SHAPE, num_steps=num_steps, eta=0.0, noise=noise.astype(np.float64),
                                      clip_denoised=False, **ours_kwargs)
    theirs = run_diffusers(scheduler, num_steps, noise, their_model, eta=0.0)
    assert ours_model.calls == their_model.calls == diffusion.ddim_timesteps(
        num_steps, ours_kwargs["spacing"], ours_kwargs.get("steps_offset", 0))[::-1].tolist()
    assert_matches(ours, theirs, f"ddim {case} {mean_type} n={num_steps}")


# ---------------------------------------------------------------- 5. rescale_zero_terminal_snr


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2", "scaled_linear"])
def test_rescale_zero_terminal_snr_equals_diffusers(diffusers, name):
    import torch
    from diffusers.schedulers.scheduling_ddim import betas_for_alpha_bar, rescale_zero_terminal_snr
    if name == "linear":
        b = betas()
    elif name == "squaredcos_cap_v2":
        b = betas_for_alpha_bar(T).double().numpy()                  # diffusers' own cosine betas (float32 values)
    else:
        b = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2   # Stable Diffusion's
    ours = schedule.rescale_zero_terminal_snr(b)
    theirs = rescale_zero_terminal_snr(torch.tensor(b, dtype=torch.float64)).numpy()
    assert theirs.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10)
    assert ours[-1] == 1.0 and np.cumprod(1.0 - ours)[-1] == 0.0      # alpha_bar_T = 0 exactly
    assert GaussianDiffusion(ours, model_mean_type="v").alphas_cumprod[-1] == 0.0
    np.testing.assert_allclose(np.cumprod(1.0 - ours)[0], 1.0 - b[0], rtol=1e-12)   # the first step is kept


# ---------------------------------------------------------------- 6. documented differences


def ddim_reference(alphas_cumprod, timesteps, prev_of, x, model, final_alpha_bar=1.0):
    """DDIM, eta = 0, eps model, float64: from each t of timesteps (decreasing) to alpha_bar at prev_of(t), or at
    final_alpha_bar where prev_of(t) < 0."""
    x = np.asarray(x, dtype=np.float64)
    for t in timesteps:
        a, p = alphas_cumprod[t], prev_of(t)
        a_prev = alphas_cumprod[p] if p >= 0 else final_alpha_bar
        eps = model(x, np.array([t]))
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


@pytest.mark.parametrize("spacing, num_steps", [("trailing", 30), ("linspace", 10)])
def test_ddim_scheduler_steps_off_its_grid_where_n_does_not_divide_t(diffusers, spacing, num_steps):
    """6a. DDIMScheduler steps from t to t - T // n; on "trailing" with n = 30 (T / n = 33.3) and on "linspace"
    with n = 10 (steps of 111) that is not the next grid point. minidiff steps to its grid's next point."""
    diffusion = GaussianDiffusion(betas())
    scheduler = diffusers.DDIMScheduler(**SCHEDULE, clip_sample=False, timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    grid = diffusion.ddim_timesteps(num_steps, spacing)[::-1]
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), grid)      # the same grid ...
    next_point = dict(zip(grid.tolist(), grid[1:].tolist() + [-1]))
    theirs_prev = {t: t - T // num_steps for t in grid.tolist()}
    off = [t for t in grid.tolist() if theirs_prev[t] != next_point[t]]   # ... but not the same steps
    assert off, "diffusers would step along the grid"
    if spacing == "linspace":
        assert theirs_prev[999] == 899 and next_point[999] == 888 and theirs_prev[111] == 11   # then 0 -> alpha_bar 1
    else:
        assert theirs_prev[966] == 933 and next_point[966] == 932
    noise = x_T(4)
    ours = diffusion.ddim_sample_loop(Model(), SHAPE, num_steps=num_steps, noise=noise.astype(np.float64),
                                      clip_denoised=False, spacing=spacing)
    theirs = run_diffusers(scheduler, num_steps, noise, Model(), eta=0.0)
    along_grid = ddim_reference(diffusion.alphas_cumprod, grid, next_point.get, noise, Model())
    diffusers_rule = ddim_reference(diffusion.alphas_cumprod, grid, theirs_prev.get, noise, Model())
    np.testing.assert_allclose(backend.to_numpy(ours), along_grid, rtol=1e-10, atol=1e-12)
    assert_matches(theirs, diffusers_rule, f"diffusers ddim {spacing} n={num_steps} vs its t - T // n rule")
    apart = float(np.max(np.abs(backend.to_numpy(ours) - theirs)) / np.max(np.abs(theirs)))
    print(f"ddim {spacing} n={num_steps}: minidiff vs diffusers differ by {apart:.2e} (by design)")
    assert apart > 1e-3


def test_diffusers_trailing_grid_float_error(diffusers):
    """6b. diffusers' "trailing" grid, np.arange(T, 0, -T / n) rounded, minus 1: for n = 61 it has 62 timesteps
    ending at -1; for n = 48 float error rounds 187.5 down (186) where round half to even gives 188 - 1 = 187.
    minidiff gives n distinct timesteps in 0 .. T - 1, the exact rational rounded."""
    for cls in (diffusers.DDIMScheduler, diffusers.DPMSolverMultistepScheduler):
        scheduler = cls(**SCHEDULE, timestep_spacing="trailing")
        scheduler.set_timesteps(61)
        theirs = scheduler.timesteps.numpy()
        assert len(theirs) == 62 and theirs[-1] == -1
        scheduler.set_timesteps(48)
        assert 186 in scheduler.timesteps.numpy() and 187 not in scheduler.timesteps.numpy()
    assert round(Fraction(T * 9, 48)) - 1 == 187 and Fraction(T * 9, 48) == Fraction(375, 2)
    for n in (61, 48):
        for grid in (schedule.ddim_timesteps(T, n, "trailing"), schedule.dpm_solver_timesteps(T, n, "trailing")):
            assert len(grid) == len(np.unique(grid)) == n and grid.min() >= 0 and grid.max() == T - 1
            np.testing.assert_array_equal(grid, exact_trailing(n))
    assert 187 in schedule.ddim_timesteps(T, 48, "trailing") and 186 not in schedule.ddim_timesteps(T, 48, "trailing")


# ---------------------------------------------------------------- 7. learned variances against DDPMScheduler.step


class ConstantModel:
    """A "model" that hands back one fixed 2C-channel output, whatever it is shown; records the t it is shown."""

    def __init__(self, out):
        self.out, self.calls = out, []

    def __call__(self, x, t, **kwargs):
        self.calls.append(int(np.asarray(backend.to_numpy(t)).reshape(-1)[0]))
        return self.out


def learned_output(rng, v_low=-1.0, v_high=1.0):
    """(x_t, the model's 2C output [eps | v], z), float64; eps large enough that clip_sample bites at large t."""
    x = rng.standard_normal(SHAPE)
    out = np.concatenate([1.5 * rng.standard_normal(SHAPE), rng.uniform(v_low, v_high, SHAPE)], axis=1)
    return x, out, rng.standard_normal(SHAPE)


def float64_tables(scheduler, alphas_cumprod):
    """Hand a DDPMScheduler minidiff's float64 alpha_bar, so that its step runs the same arithmetic in float64:
    what is left between the two is the formulas, not diffusers' float32 table."""
    import torch
    scheduler.alphas_cumprod = torch.from_numpy(np.asarray(alphas_cumprod, dtype=np.float64))
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def diffusers_step(scheduler, out, t, x, z):
    """DDPMScheduler.step(model_output_2C, t, x_t) with the noise z: step draws randn_tensor(eps half's shape) from
    the generator; z is handed in by subtracting what the generator gives and adding z times the same sigma.
    Returns (prev_sample, mean, log sigma^2), the last from the scheduler's own _get_variance."""
    import torch
    seed = 1234 + int(t)
    prev = scheduler.step(torch.from_numpy(out), int(t), torch.from_numpy(x),
                          generator=torch.Generator().manual_seed(seed)).prev_sample.double().numpy()
    drawn = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    log_var = scheduler._get_variance(int(t), predicted_variance=torch.from_numpy(out[:, SHAPE[1]:]))
    log_var = log_var.double().numpy()
    std = np.exp(0.5 * log_var) if scheduler.variance_type == "learned_range" else np.sqrt(log_var)
    mean = prev - std * drawn
    return mean + std * z, mean, log_var


def minidiff_step(diffusion, out, code_t, x, z, clip):
    """minidiff's ancestral step (p_sample, the model a constant) and its p_mean_variance on the same output."""
    t = np.full(SHAPE[0], code_t)
    model = ConstantModel(out)
    sample = backend.to_numpy(diffusion.p_sample(model, x, t, noise=z, clip_denoised=clip)["sample"])
    got = diffusion.p_mean_variance(None, x, t, clip, model_output=out)
    return sample, backend.to_numpy(got["mean"]), backend.to_numpy(got["log_variance"]), model.calls


def learned_range_scheduler(diffusers, clip, **kwargs):
    return diffusers.DDPMScheduler(**SCHEDULE, variance_type="learned_range", prediction_type="epsilon",
                                   clip_sample=clip, **kwargs)


@pytest.mark.parametrize("clip", [False, True])
def test_learned_range_step_equals_ddpm_scheduler_step(diffusers, clip):
    """Eq. 15 of Improved DDPM on the full T = 1000 linear chain, eps prediction: for t = 1, 10, 500, 999 minidiff's
    p_sample with a constant 2C "model" is DDPMScheduler(variance_type="learned_range").step on the same output,
    x_t and noise; the mean and log sigma^2 agree separately. On diffusers' own float32 alpha_bar to 3e-4 (its
    1 - alpha_bar_0 = 1e-4 keeps ~4 digits, and beta_tilde_1 is built from it); handed minidiff's float64 alpha_bar,
    to 1e-10: the same formulas.

    t = 0 is left out (see test_learned_range_at_t_0_differs_only_where_no_noise_is_added): diffusers clamps
    beta_tilde_0 = 0 to 1e-20 before its log, minidiff takes code t = 1's log beta_tilde (improved-diffusion's
    posterior_log_variance_clipped); neither adds noise at t = 0, so the samples agree there anyway."""
    diffusion = GaussianDiffusion(betas(), "eps", "learned_range", "hybrid")
    native = learned_range_scheduler(diffusers, clip)
    exact = float64_tables(learned_range_scheduler(diffusers, clip), diffusion.alphas_cumprod)
    rng = np.random.default_rng(7)
    clipped = []
    for t in (1, 10, 500, 999):
        x, out, z = learned_output(rng)
        sample, mean, log_var, calls = minidiff_step(diffusion, out, t, x, z, clip)
        assert calls == [t]
        x0 = diffusion.predict_start_from_noise(x, np.full(SHAPE[0], t), out[:, :1])
        clipped.append(bool((np.abs(x0) > 1).any()))
        for scheduler, rtol in ((exact, 1e-10), (native, 3e-4)):
            their_sample, their_mean, their_log_var = diffusers_step(scheduler, out, t, x, z)
            case = f"learned_range t={t} clip={clip} {'float64' if rtol < 1e-6 else 'float32'} alpha_bar"
            np.testing.assert_allclose(log_var, their_log_var, rtol=rtol, atol=0, err_msg=case)
            assert_matches(mean, their_mean, case + " mean", rtol=rtol, atol=rtol * 1e-2)
            assert_matches(sample, their_sample, case + " sample", rtol=rtol, atol=rtol * 1e-2)
        # the learned log variance spans [log beta_tilde_t, log beta_t] (0.7 wide at t = 1, ~1e-3 by t = 500)
        lo, hi = diffusion.posterior_log_variance_clipped[t], np.log(diffusion.betas[t])
        assert lo - 1e-12 <= log_var.min() and log_var.max() <= hi + 1e-12 and hi > lo
        assert t > 1 or hi - lo > 0.5
    assert any(clipped[1:]), "clip_sample must bite somewhere for clip=True to test anything"


def test_learned_range_at_t_0_differs_only_where_no_noise_is_added(diffusers):
    """Pinned: at t = 0 diffusers' beta_tilde_0 = 0 is clamped to 1e-20 (log = -46), minidiff's log beta_tilde_0 is
    code t = 1's (improved-diffusion's clip). Both add no noise at t = 0, so the step is the mean, and equal."""
    import torch
    diffusion = GaussianDiffusion(betas(), "eps", "learned_range", "hybrid")
    for clip in (False, True):
        scheduler = float64_tables(learned_range_scheduler(diffusers, clip), diffusion.alphas_cumprod)
        x, out, z = learned_output(np.random.default_rng(3))
        sample, mean, log_var, _ = minidiff_step(diffusion, out, 0, x, z, clip)
        theirs = scheduler.step(torch.from_numpy(out), 0, torch.from_numpy(x),
                                generator=torch.Generator().manual_seed(0)).prev_sample.numpy()
        np.testing.assert_allclose(sample, theirs, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(sample, mean)                              # no noise at t = 0
        their_log_var = scheduler._get_variance(0, torch.from_numpy(out[:, 1:])).numpy()
        frac = (out[:, 1:] + 1) / 2
        np.testing.assert_allclose(their_log_var, frac * np.log(diffusion.betas[0]) + (1 - frac) * np.log(1e-20),
                                   rtol=1e-10)
        np.testing.assert_allclose(log_var, frac * np.log(diffusion.betas[0])
                                   + (1 - frac) * diffusion.posterior_log_variance_clipped[1], rtol=1e-10)
        assert diffusion.posterior_log_variance_clipped[0] == diffusion.posterior_log_variance_clipped[1]


def test_learned_is_log_sigma_squared_where_diffusers_reads_sigma_squared(diffusers):
    """Pinned: minidiff's "learned" reads the variance half as log sigma^2 (improved-diffusion, where such models come
    from); DDPMScheduler.step takes its square root, as sigma^2. So minidiff on [eps | L] is diffusers on
    [eps | exp(L)], at every t > 0 (the mean is the same; the std is exp(L / 2) on both sides)."""
    diffusion = GaussianDiffusion(betas(), "eps", "learned", "hybrid")
    scheduler = float64_tables(diffusers.DDPMScheduler(**SCHEDULE, variance_type="learned", clip_sample=True),
                               diffusion.alphas_cumprod)
    rng = np.random.default_rng(5)
    for t in (1, 10, 500, 999):
        x, out, z = learned_output(rng, v_low=-12.0, v_high=-2.0)              # log sigma^2 values
        sample, mean, log_var, _ = minidiff_step(diffusion, out, t, x, z, True)
        np.testing.assert_array_equal(log_var, out[:, 1:])
        as_variance = np.concatenate([out[:, :1], np.exp(out[:, 1:])], axis=1)
        their_sample, their_mean, _ = diffusers_step(scheduler, as_variance, t, x, z)
        assert_matches(mean, their_mean, f"learned t={t} mean", rtol=1e-10, atol=1e-12)
        assert_matches(sample, their_sample, f"learned t={t} sample", rtol=1e-10, atol=1e-12)
        with np.errstate(invalid="ignore"):                                   # sqrt of a negative "variance"
            their_raw, _, _ = diffusers_step(scheduler, out, t, x, z)           # the same bits read as sigma^2
        assert not np.isfinite(their_raw).all() or np.abs(their_raw - sample).max() > 1e-3


def respaced_against_scheduler(diffusers, diffusion, short, scheduler, clip, indices, rtol):
    """short (minidiff's respaced chain, timestep_map its kept steps) against scheduler after set_timesteps, at the
    code steps `indices` of short (model timestep short.timestep_map[i]): one step each, the same output and z."""
    rng = np.random.default_rng(11)
    kept = np.asarray(short.timestep_map)
    for i in indices:
        x, out, z = learned_output(rng)
        sample, mean, log_var, calls = minidiff_step(short, out, i, x, z, clip)
        assert calls == [int(kept[i])]                                       # the model sees the original timestep
        their_sample, their_mean, their_log_var = diffusers_step(scheduler, out, int(kept[i]), x, z)
        case = f"respaced n={len(kept)} i={i} (t={kept[i]}) clip={clip}"
        np.testing.assert_allclose(log_var, their_log_var, rtol=rtol, atol=0, err_msg=case)
        assert_matches(mean, their_mean, case + " mean", rtol=rtol, atol=rtol * 1e-2)
        assert_matches(sample, their_sample, case + " sample", rtol=rtol, atol=rtol * 1e-2)
        # the respaced chain's own beta and beta_tilde, not the original chain's at kept[i] (far apart here)
        frac = (out[:, 1:] + 1) / 2
        original = frac * np.log(diffusion.betas[kept[i]]) + (1 - frac) * diffusion.posterior_log_variance_clipped[
            kept[i]]
        assert np.abs(original - log_var).max() > 0.5, case


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("num_steps", [10, 50])
def test_respaced_learned_range_equals_ddpm_scheduler_on_the_same_grid(diffusers, num_steps, clip):
    """respaced(n) keeps space_timesteps(T, n) (improved-diffusion's rounding of a running sum of (T - 1) / (n - 1));
    diffusers' "linspace" set_timesteps(n) rounds linspace(0, T - 1, n): the same steps for n = 10 and 50 (asserted).
    On that grid DDPMScheduler takes current_beta_t = 1 - alpha_bar_t / alpha_bar_prev from its previous timestep, as
    respace_betas does: the learned_range variance spans the respaced chain's beta and beta_tilde on both sides."""
    diffusion = GaussianDiffusion(betas(), "eps", "learned_range", "hybrid")
    short = diffusion.respaced(num_steps)
    for scheduler, rtol in ((float64_tables(learned_range_scheduler(diffusers, clip, timestep_spacing="linspace"),
                                            diffusion.alphas_cumprod), 1e-10),
                            (learned_range_scheduler(diffusers, clip, timestep_spacing="linspace"), 3e-4)):
        scheduler.set_timesteps(num_steps)
        np.testing.assert_array_equal(scheduler.timesteps.numpy()[::-1], short.timestep_map)
        respaced_against_scheduler(diffusers, diffusion, short, scheduler, clip,
                                   (1, 2, num_steps // 2, num_steps - 1), rtol)


def test_respaced_learned_range_on_a_grid_diffusers_spaces_differently(diffusers):
    """n = 21: space_timesteps keeps 499 (the running sum's rounding, schedule.space_timesteps), diffusers'
    "linspace" 500 (round half to even of 499.5); "leading" and "trailing" differ too. The grids differ, so
    diffusers is given minidiff's kept steps as custom timesteps, and a GaussianDiffusion built by respace_betas on
    diffusers' own "leading" grid is compared with diffusers on that grid: both agree step for step."""
    diffusion = GaussianDiffusion(betas(), "eps", "learned_range", "hybrid")
    short = diffusion.respaced(21)
    for spacing in ("linspace", "leading", "trailing"):
        scheduler = learned_range_scheduler(diffusers, True, timestep_spacing=spacing)
        scheduler.set_timesteps(21)
        assert not np.array_equal(scheduler.timesteps.numpy()[::-1], short.timestep_map), spacing
    assert 499 in short.timestep_map and 500 not in short.timestep_map
    scheduler = float64_tables(learned_range_scheduler(diffusers, True), diffusion.alphas_cumprod)
    scheduler.set_timesteps(timesteps=short.timestep_map[::-1].tolist())
    respaced_against_scheduler(diffusers, diffusion, short, scheduler, True, (1, 10, 20), 1e-10)

    scheduler = float64_tables(learned_range_scheduler(diffusers, True, timestep_spacing="leading"),
                               diffusion.alphas_cumprod)
    scheduler.set_timesteps(21)
    kept = np.sort(scheduler.timesteps.numpy())
    theirs = GaussianDiffusion(schedule.respace_betas(diffusion.alphas_cumprod, kept), "eps", "learned_range", "hybrid")
    theirs.timestep_map = kept
    respaced_against_scheduler(diffusers, diffusion, theirs, scheduler, True, (1, 10, 20), 1e-10)
