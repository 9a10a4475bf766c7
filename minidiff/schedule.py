"""Noise schedules beta_1 .. beta_T, as float64 host (numpy) arrays.

Index t of every array is the paper's step t + 1 (t is 0-based throughout minidiff).
Schedules are computed on the host in float64 and cast once where they are used
(GaussianDiffusion._extract): in float32, 1 - alpha_bar at t = 0 would be off by ~1e-4.
Sources: Ho et al. 2020 (arXiv:2006.11239) Sec. 4 for "linear"; Nichol & Dhariwal 2021
(arXiv:2102.09672) Eq. 17 for "cosine" and Sec. 4 / App. for respacing.
May import: backend.
"""
import numbers

from . import backend

host = backend.host  # numpy: schedule math is host-side float64, never on the GPU

BETA_START, BETA_END = 1e-4, 0.02  # Ho et al. 2020, Sec. 4: beta_1 = 1e-4 ... beta_T = 0.02
NAMES = ("linear", "quad", "cosine", "sigmoid")


def get_named_beta_schedule(name, num_timesteps):
    """beta_1 .. beta_T of a named schedule, shape (T,) float64; index t is the paper's step t + 1.

    "linear" is linspace(1e-4, 0.02, T) for every T (the paper's and diffusers' convention,
    without improved-diffusion's 1000 / T rescaling); "quad" is linear in sqrt(beta);
    "cosine" is Nichol & Dhariwal's Eq. 17; "sigmoid" squashes linspace(-6, 6) into [1e-4, 0.02].
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, numbers.Integral):
        raise TypeError(f"num_timesteps must be an integer, got {num_timesteps!r}")
    if num_timesteps <= 0:
        raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
    T = int(num_timesteps)
    if name == "linear":
        betas = host.linspace(BETA_START, BETA_END, T, dtype=host.float64)
    elif name == "quad":
        betas = host.linspace(BETA_START ** 0.5, BETA_END ** 0.5, T, dtype=host.float64) ** 2
    elif name == "cosine":
        betas = betas_for_alpha_bar(T, cosine_alpha_bar)
    elif name == "sigmoid":
        s = 1.0 / (1.0 + host.exp(-host.linspace(-6.0, 6.0, T, dtype=host.float64)))
        betas = s * (BETA_END - BETA_START) + BETA_START
    else:
        raise ValueError(f"unknown beta schedule {name!r}: use one of {', '.join(map(repr, NAMES))}")
    return check_betas(betas)


def cosine_alpha_bar(u, s=0.008):
    """alpha_bar at continuous time u = t / T in [0, 1]: f(u) / f(0), f(u) = cos((u + s) / (1 + s) * pi / 2)^2 (Eq. 17).

    The offset s = 0.008 keeps beta near u = 0 from being vanishingly small (Nichol & Dhariwal, Sec. 3.2).
    """
    f = lambda v: host.cos((v + s) / (1.0 + s) * host.pi / 2) ** 2  # noqa: E731
    return f(u) / f(0.0)


def betas_for_alpha_bar(num_timesteps, alpha_bar, max_beta=0.999):
    """betas with prod(1 - beta) = alpha_bar(t / T): beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}.

    Clipped at max_beta = 0.999 to avoid the singularity at u = 1 (Nichol & Dhariwal, Sec. 3.2).
    """
    u = host.arange(num_timesteps + 1, dtype=host.float64) / num_timesteps  # (T + 1,) grid of t / T
    a = alpha_bar(u)
    return host.minimum(1.0 - a[1:] / a[:-1], max_beta)


def check_betas(betas):
    """Validate a user-supplied schedule; return it as a float64 host array of shape (T,).

    The forward process needs 0 < beta_t < 1: beta = 0 adds no noise (and makes the
    posterior variance 0), beta = 1 destroys the signal and alpha_bar stays 0 after it. The last
    step alone may have beta_T = 1: a zero-terminal-SNR schedule (rescale_zero_terminal_snr).
    """
    betas = host.array(backend.to_numpy(getattr(betas, "data", betas)), dtype=host.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    below_one = betas < 1
    below_one[-1] = betas[-1] <= 1
    bad = ~(host.isfinite(betas) & (betas > 0) & below_one)
    if bad.any():
        i = int(host.flatnonzero(bad)[0])
        raise ValueError(f"betas must satisfy 0 < beta < 1 (beta_T = 1 allowed: zero terminal SNR); "
                         f"betas[{i}] = {betas[i]!r} ({int(bad.sum())} of {betas.size} entries are out of range)")
    return betas


def space_timesteps(num_timesteps, num_steps):
    """num_steps of the timesteps 0 .. T-1, evenly strided from 0 (sorted host int64): the steps a respaced chain keeps.

    improved-diffusion's `space_timesteps` with one section, tie rule included: a running sum
    cur += (T - 1) / (num_steps - 1) from 0, rounded half to even at each kept step, so the last
    is T - 1 (and num_steps = 1 keeps step 0, as there). Rounding the running sum, not the exact
    product i (T - 1) / (num_steps - 1), decides the ties where the sum's rounding error falls on
    x.5 (n = 21 at T = 1000 keeps 499, not 500). numpy's cumsum adds in order, as that loop does.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be between 1 and num_timesteps = {num_timesteps}, got {num_steps}")
    stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1.0
    running = host.cumsum(host.append(0.0, host.full(num_steps - 1, stride)))
    return host.round(running).astype(host.int64)


SPACINGS = ("leading", "trailing", "linspace")  # diffusers' names (Lin et al. 2023, Table 2)


def _check_request(num_timesteps, num_steps, spacing):
    """(T, n) once the spacing is known and 1 <= n <= T is a whole number."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be between 1 and T = {num_timesteps}, got {num_steps}")
    return num_timesteps, int(num_steps)


def _check_grid(timesteps, num_timesteps, num_steps, spacing, what):
    """Refuse a grid that is not num_steps distinct timesteps in 0 .. T-1 (the anchors' duplicate-step bugs)."""
    if (len(timesteps) != num_steps or len(host.unique(timesteps)) != num_steps
            or timesteps.min() < 0 or timesteps.max() > num_timesteps - 1):
        raise ValueError(f"{what} with spacing {spacing!r} cannot place {num_steps} distinct timesteps in "
                         f"0 .. {num_timesteps - 1}: use fewer steps or another spacing")
    return timesteps


def ddim_timesteps(num_timesteps, num_steps, spacing="leading", steps_offset=0):
    """DDIM's grid of num_steps timesteps, increasing (host int64), as diffusers' DDIMScheduler places them.

    "leading" (the DDIM paper's, minidiff's default): 0, c, .., (n - 1) c with c = T // n, plus steps_offset;
    "trailing": round(T - k T / n) - 1 for k = n-1 .. 0, ending at T - 1; "linspace": round(linspace(0, T - 1, n)).
    steps_offset shifts the "leading" grid only (diffusers ignores it for the others).
    """
    T, n = _check_request(num_timesteps, num_steps, spacing)
    if spacing == "leading":
        grid = host.arange(n) * (T // n) + int(steps_offset)
    elif spacing == "trailing":
        grid = _trailing(T, n)
    else:
        grid = host.round(host.linspace(0, T - 1, n)).astype(host.int64)
    return _check_grid(grid.astype(host.int64), T, n, spacing, "DDIM")


def dpm_solver_timesteps(num_timesteps, num_steps, spacing="linspace", steps_offset=0):
    """DPM-Solver++'s grid of num_steps timesteps, increasing, as diffusers' DPMSolverMultistepScheduler places them.

    It builds n + 1 points and drops the one nearest t = 0 (the solver's last step goes to sigma = 0
    instead), so its grids are not DDIM's: "linspace": round(linspace(0, T - 1, n + 1))[1:];
    "leading": k (T // (n + 1)) + steps_offset for k = 1 .. n; "trailing": as DDIM's.
    """
    T, n = _check_request(num_timesteps, num_steps, spacing)
    if spacing == "linspace":
        grid = host.round(host.linspace(0, T - 1, n + 1))[1:]
    elif spacing == "leading":
        grid = host.arange(1, n + 1) * (T // (n + 1)) + int(steps_offset)
    else:
        grid = _trailing(T, n)
    return _check_grid(grid.astype(host.int64), T, n, spacing, "DPM-Solver++")


def _trailing(T, n):
    """round(T - k T / n) - 1 for k = n-1 .. 0, rounded half to even in exact integer arithmetic.

    diffusers computes np.arange(T, 0, -T / n) in floats, whose error decides the ties (T = 1000,
    n = 48: 186 or 187) and can add an (n + 1)-th point, timestep -1 (n = 61); exact rounding does neither.
    """
    q, r = host.divmod(T * host.arange(1, n + 1, dtype=host.int64), n)    # T (n - k) / n = q + r / n
    up = (2 * r > n) | ((2 * r == n) & (q % 2 == 1))
    return q + up - 1


def karras_sigmas(sigma_min, sigma_max, num_steps, rho=7.0):
    """Karras et al. 2022's noise levels (EDM, Eq. 5): n sigmas from sigma_max down to sigma_min, then 0.

        sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0 .. n-1

    rho = 7 spends most steps at low noise, where the ODE's curvature is. Returns (n + 1,) float64.
    """
    if not 0 < sigma_min < sigma_max < float("inf"):
        raise ValueError(f"Karras sigmas need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = host.linspace(0.0, 1.0, num_steps) if num_steps > 1 else host.zeros(1)
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return host.append((hi + ramp * (lo - hi)) ** rho, 0.0)


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2023 (arXiv:2305.08891), Algorithm 1: rescale betas so alpha_bar_T = 0 (zero terminal SNR).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first is unchanged; the
    last step then sees pure noise, as sampling starts from it. beta_T becomes 1, which check_betas
    accepts for the last step only; an eps model cannot recover x_0 there (alpha_bar_T = 0), so train
    a v (or x_0) model with it, as the paper does.
    """
    betas = check_betas(betas)
    sqrt_ab = host.sqrt(host.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab ** 2
    alphas = host.append(ab[0], ab[1:] / ab[:-1])
    return check_betas(1.0 - alphas)


def respace_betas(alphas_cumprod, timesteps):
    """Betas of the shorter chain that visits only `timesteps` and keeps their alpha_bar.

    beta'_i = 1 - alpha_bar[timesteps[i]] / alpha_bar[timesteps[i - 1]] (with alpha_bar = 1
    before the first), so q(x_t | x_0) (Eq. 4) is unchanged at every kept step.
    """
    kept = host.asarray(alphas_cumprod, dtype=host.float64)[host.asarray(timesteps)]
    betas = 1.0 - kept / host.append(1.0, kept[:-1])
    if (betas >= 1.0).any():  # the ratio is below float64's resolution next to 1 (~1e-16)
        raise ValueError("alpha_bar falls by a factor over 1e16 between two kept timesteps, so the respaced "
                         "beta rounds to 1 and the chain would lose all signal; keep more timesteps")
    return check_betas(betas)
