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
    posterior variance 0), beta = 1 destroys the signal and alpha_bar stays 0 after it.
    """
    betas = host.array(backend.to_numpy(getattr(betas, "data", betas)), dtype=host.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    bad = ~(host.isfinite(betas) & (betas > 0) & (betas < 1))
    if bad.any():
        i = int(host.flatnonzero(bad)[0])
        raise ValueError(f"betas must satisfy 0 < beta < 1; betas[{i}] = {betas[i]!r} "
                         f"({int(bad.sum())} of {betas.size} entries are out of range)")
    return betas


def space_timesteps(num_timesteps, num_steps):
    """num_steps of the timesteps 0 .. T-1, evenly strided, first and last included (sorted host int64).

    improved-diffusion's `space_timesteps` with one section: round(i * (T - 1) / (num_steps - 1)).
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be between 1 and num_timesteps = {num_timesteps}, got {num_steps}")
    if num_steps == 1:
        return host.array([num_timesteps - 1], dtype=host.int64)
    stride = (num_timesteps - 1) / (num_steps - 1)
    return host.round(host.arange(num_steps) * stride).astype(host.int64)


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
