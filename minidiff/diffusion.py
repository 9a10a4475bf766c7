"""Gaussian diffusion (Ho, Jain & Abbeel 2020, arXiv:2006.11239): every formula of the paper in one place.

Time is 0-based: `t` is an integer array of shape (N,) and t = 0 is the paper's step 1,
t = T - 1 its step T. The forward process q (Eq. 2, 4, 6-7), the reverse process p (Eq. 11,
15, Algorithm 2), the losses (L_simple Eq. 14 / Algorithm 1; the bound Eq. 5 with the decoder
Eq. 13) and DDIM (Song et al. 2021, arXiv:2010.02502, Eq. 12 and 16) follow the original code's
names (hojonathanho/diffusion, kept by improved-diffusion). Beyond the paper: learned variances trained by
the hybrid loss (Nichol & Dhariwal 2021, "Improved DDPM", arXiv:2102.09672, Eq. 15-16; p_variance and
training_losses; their importance-sampled timesteps, Eq. 18, are resample.py's), and two few-step samplers
of the probability-flow ODE: DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) and Karras et al.'s
Heun and Euler on the sigma schedule (EDM, arXiv:2206.00364, Algorithm 1). Coefficients are float64 host arrays,
cast to the activations' dtype and backend once, in `_extract`.
`model` is any callable model(x_t, t, **model_kwargs) returning an array or a Tensor shaped like x_t.
Class-conditional models take labels as model_kwargs={"y": labels (N,)}, NO_LABEL meaning "no label";
every sampler takes `model_kwargs` and a guidance weight `guidance` (classifier-free guidance, Ho &
Salimans 2022, Eq. 6), applied in one place: `_call_model`.
May import: backend, tensor, ops, schedule, losses.
"""
import math

from tqdm.auto import tqdm

from . import backend, ops
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .schedule import (check_betas, ddim_timesteps, dpm_solver_timesteps, karras_sigmas, respace_betas,
                       space_timesteps)
from .tensor import Tensor, no_grad

host = backend.host  # numpy, for the float64 coefficient tables only

MEAN_TYPES = ("eps", "x0", "v")  # what the model predicts: the noise (the paper), x_0, or v (Salimans & Ho 2022)
# sigma_t^2 = beta_tilde_t or beta_t (Sec. 3.2), or learned (Improved DDPM): the model's second half of channels
# is log sigma_t^2 itself ("learned") or the v of their Eq. 15 in [-1, 1] ("learned_range").
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LEARNED_VAR_TYPES = ("learned", "learned_range")
# L_simple (Eq. 14), the true variational bound (Eq. 5), or Improved DDPM's L_simple + lambda L_vlb (their Eq. 16)
LOSS_TYPES = ("mse", "kl", "hybrid")
VLB_WEIGHT = 0.001  # lambda of L_hybrid (Improved DDPM, Sec. 3.1)
NO_LABEL = -1  # the label meaning "no label" (the unconditional model of classifier-free guidance)
# The samplers (sampling.sampling_plan runs them by name): Algorithm 2, DDIM, DPM-Solver++, Karras's Heun and Euler.
SAMPLERS = ("ddpm", "ddim", "dpm++", "heun", "euler")
KARRAS_SOLVERS = ("heun", "euler")  # Karras et al. 2022, Algorithm 1 (second order) and its first-order case


def _data(a):
    """The raw array of a Tensor (arrays pass through)."""
    return a.data if isinstance(a, Tensor) else a


def _generator(seed):
    """A fresh seeded stream, or the package-wide default one (see backend.manual_seed)."""
    return backend.Generator(seed) if seed is not None else backend.default_generator()


def mean_flat(x):
    """Mean over all axes but the batch axis: (N, ...) -> (N,). Works on arrays and Tensors."""
    axes = tuple(range(1, x.ndim))
    return x.mean(axis=axes) if axes else x


def check_variance_and_loss(model_mean_type, model_var_type, loss_type, vlb_weight=VLB_WEIGHT):
    """ValueError, naming the working combination, unless the mean, variance and loss types can train together.

    A fixed variance has nothing for L_vlb's variance half to train ("hybrid" is refused with it), and
    L_simple gives a learned variance no gradient at all ("mse" is refused with one).
    """
    for value, allowed, what in ((model_mean_type, MEAN_TYPES, "model_mean_type"),
                                 (model_var_type, VAR_TYPES, "model_var_type"),
                                 (loss_type, LOSS_TYPES, "loss_type")):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(map(repr, allowed))}")
    learned = model_var_type in LEARNED_VAR_TYPES
    if loss_type == "hybrid" and not learned:
        raise ValueError(f"loss_type 'hybrid' (L_simple + lambda L_vlb) trains a learned variance, and "
                         f"model_var_type {model_var_type!r} is fixed: use model_var_type 'learned_range' with it "
                         f"(--learn-sigma), or loss_type 'mse' for a fixed variance")
    if loss_type == "mse" and learned:
        raise ValueError(f"loss_type 'mse' (L_simple) gives a learned variance ({model_var_type!r}) no gradient: "
                         f"use loss_type 'hybrid' with it (--learn-sigma), or 'kl' to train the bound alone")
    if not (isinstance(vlb_weight, (int, float)) and math.isfinite(vlb_weight) and vlb_weight > 0):
        raise ValueError(f"vlb_weight (lambda of the hybrid loss) must be a positive finite number, got {vlb_weight!r}")


class GaussianDiffusion:
    """The diffusion process for a fixed schedule betas (T,), and everything computed from it.

    Args:
        betas: beta_1 .. beta_T, e.g. schedule.get_named_beta_schedule("linear", 1000).
        model_mean_type: "eps", "x0" or "v": what the model's output means.
        model_var_type: "fixed_small" (beta_tilde_t), "fixed_large" (beta_t), or learned (Improved DDPM):
            "learned" (the model outputs log sigma_t^2) or "learned_range" (it outputs v of their Eq. 15).
            A learned variance doubles the model's output channels: the first C are eps, x_0 or v, the
            last C the variance (build it with UNet(..., out_channels=2 * C); `output_channels` says how many).
        loss_type: "mse" (L_simple, Eq. 14), "kl" (the bound's term for t, Eq. 5, in bits/dim) or "hybrid"
            (L_simple + lambda L_vlb, Improved DDPM Sec. 3.1; needs a learned variance, which "mse" cannot train).
        num_bins: grey levels of the data for the decoder L_0 (Eq. 13): 256 for 8-bit images, 17 for
            the bundled 8x8 digits, 2 for binary data.
        vlb_weight: lambda of the hybrid loss (Improved DDPM: 0.001).
    """

    def __init__(self, betas, model_mean_type="eps", model_var_type="fixed_small", loss_type="mse", num_bins=256,
                 vlb_weight=VLB_WEIGHT):
        check_variance_and_loss(model_mean_type, model_var_type, loss_type, vlb_weight)
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        self.learn_sigma = model_var_type in LEARNED_VAR_TYPES
        self.vlb_weight = float(vlb_weight)
        if int(num_bins) != num_bins or num_bins < 2:
            raise ValueError(f"num_bins must be an integer of at least 2 (grey levels of the data), got {num_bins}")
        self.num_bins = int(num_bins)
        self.betas = betas = check_betas(betas)  # float64 host array; cast at the point of use
        if betas.size < 2:
            raise ValueError("GaussianDiffusion needs at least 2 timesteps (beta_tilde at code t = 1 fills in code t = 0)")
        self.num_timesteps = int(betas.size)
        self.zero_terminal_snr = bool(betas[-1] == 1.0)   # alpha_bar_T = 0 (schedule.rescale_zero_terminal_snr)
        if self.zero_terminal_snr and model_mean_type == "eps":
            raise ValueError("this schedule has zero terminal SNR (beta_T = 1, alpha_bar_T = 0): an eps model cannot "
                             "give x_0 = (x_T - eps) / sqrt(alpha_bar_T) there; use model_mean_type 'v' (or 'x0')")
        # alpha_bar_T = 0 makes the tables of 1 / sqrt(alpha_bar) (and 1 / sqrt(alpha_T)) infinite at the last step;
        # only the eps route (refused above) uses them there, so they may hold inf without a warning.
        with host.errstate(divide="ignore"):
            self._tables(betas, model_var_type)
        self.timestep_map = None  # on a respaced chain: index -> original timestep the model was trained on
        self._device_copies = {}  # (name, backend, dtype) -> coefficient table on that backend

    def _tables(self, betas, model_var_type):
        """The coefficient tables of every formula below, float64 host arrays indexed by code t."""
        alphas = 1.0 - betas
        self.alphas_cumprod = host.cumprod(alphas)  # alpha_bar_t = prod_{s <= t} alpha_s (Eq. 4)
        self.alphas_cumprod_prev = host.append(1.0, self.alphas_cumprod[:-1])  # alpha_bar_{t-1}; 1 before step 1
        # 1 - alpha_bar_t without cancellation (exactly beta_1 at code t = 0, the paper's step 1): the naive 1 - cumprod loses
        # ~1e-16 / (1 - alpha_bar_t) relative, i.e. 1e-10 for a beta_1 of 1e-6.
        one_minus = -host.expm1(host.cumsum(host.log1p(-betas)))
        one_minus_prev = host.append(0.0, one_minus[:-1])
        self.one_minus_alphas_cumprod = one_minus

        # q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I): Eq. 2
        self.sqrt_alphas = host.sqrt(alphas)
        self.sqrt_betas = host.sqrt(betas)
        # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I): Eq. 4
        self.sqrt_alphas_cumprod = host.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = host.sqrt(one_minus)
        self.log_one_minus_alphas_cumprod = host.log(one_minus)
        # x_0 = x_t / sqrt(alpha_bar_t) - sqrt(1 / alpha_bar_t - 1) eps: Eq. 4 solved for x_0 (Eq. 15)
        self.sqrt_recip_alphas_cumprod = host.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = host.sqrt(one_minus / self.alphas_cumprod)  # sqrt(1 / alpha_bar - 1)

        # q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I): Eq. 6-7
        self.posterior_variance = betas * one_minus_prev / one_minus
        # beta_tilde at code t = 0 is 0 (log = -inf): use code t = 1's value, as the original code's second
        # version and improved-diffusion do. The decoder L_0 (Eq. 13) uses it, so bits/dim depend on it.
        self.posterior_log_variance_clipped = host.log(
            host.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * host.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = one_minus_prev * host.sqrt(alphas) / one_minus
        # mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta): Eq. 11
        self.sqrt_recip_alphas = 1.0 / host.sqrt(alphas)

        # The reverse process's fixed variance sigma_t^2 (Sec. 3.2). "fixed_large" takes beta_t but,
        # as the original code does, code t = 1's beta_tilde for the log-variance at code t = 0 (used by L_0).
        if model_var_type == "fixed_small":
            self.model_variance = self.posterior_variance
            self.model_log_variance = self.posterior_log_variance_clipped
        elif model_var_type == "fixed_large":
            self.model_variance = betas
            self.model_log_variance = host.log(host.append(self.posterior_variance[1], betas[1:]))
        # The upper end of Improved DDPM's Eq. 15 (its lower end is posterior_log_variance_clipped).
        self.log_betas = host.log(betas)

    # ------------------------------------------------------------------ helpers

    def _extract(self, name, t, x):
        """Coefficient table `name` at timesteps t, in x's dtype on x's backend, shaped (N, 1, ..., 1).

        Cast and moved once per backend and dtype, so float32 activations are never promoted to
        float64 and a GPU step pays no host-to-device copy.
        """
        x = _data(x)
        xp = backend.xp_of(x)
        key = (name, xp.__name__, x.dtype.str)
        if key not in self._device_copies:
            self._device_copies[key] = xp.asarray(getattr(self, name).astype(x.dtype))
        return self._device_copies[key][xp.asarray(_data(t))].reshape(-1, *([1] * (x.ndim - 1)))

    def _model_timesteps(self, t):
        """The timesteps to show the model: on a respaced chain, the original ones it was trained on.

        A fractional t (the Karras sampler's sigmas between grid points) maps by linear interpolation.
        """
        if self.timestep_map is None:
            return t
        t = _data(t)
        xp = backend.xp_of(t)
        if t.dtype.kind == "f":
            index = xp.arange(self.num_timesteps, dtype=host.float64)
            return xp.interp(t, index, xp.asarray(self.timestep_map, dtype=host.float64))
        return xp.asarray(self.timestep_map)[t]

    def _call_model(self, model, x, t, model_kwargs=None, guidance=0.0, with_variance=False):
        """model(x_t, t, **model_kwargs) as an array of x's dtype, without recording a graph (sampling, evaluation).

        With a learned variance the model's output has 2C channels: by default only the mean half
        (eps, x_0 or v) is returned, which is all DDIM, DPM-Solver++ and the ODE sampler use;
        with_variance=True returns both halves (p_mean_variance, the bound).

        With guidance w != 0, classifier-free guidance (Ho & Salimans 2022, Eq. 6):
            eps = (1 + w) eps(x_t, t, y) - w eps(x_t, t, no label)
        with both halves in one forward pass of a doubled batch, [labels y; NO_LABEL]. The x_0 and v
        outputs are affine in eps at fixed (x_t, t) (Eq. 15; Salimans & Ho 2022), with weights
        (1 + w) - w = 1 summing to one, so the same combination of the raw outputs is exactly Eq. 6.
        """
        model_kwargs = dict(model_kwargs or {})
        t = self._model_timesteps(t)
        if guidance:
            y = model_kwargs.get("y")
            if y is None:
                raise ValueError("classifier-free guidance needs labels: pass model_kwargs={'y': labels} "
                                 "(or guidance=0 to sample unconditionally)")
            xp = backend.xp_of(x)
            y = xp.asarray(_data(y)).astype(host.int64, copy=False)   # NO_LABEL (-1) must fit
            model_kwargs["y"] = xp.concatenate([y, xp.full(y.shape, NO_LABEL, dtype=y.dtype)])
            x_in, t_in = xp.concatenate([x, x]), xp.concatenate([xp.asarray(_data(t))] * 2)
        else:
            x_in, t_in = x, t
        with no_grad():
            out = _data(model(Tensor(x_in), t_in, **model_kwargs))
        self._check_output(out, x_in)
        out, var_out = self._split_output(out)
        if guidance:
            cond, uncond = out[:len(x)], out[len(x):]
            out = (1.0 + guidance) * cond - guidance * uncond   # Eq. 6 (Python floats keep out's dtype)
            # Only the eps halves are guided; the variance is the conditional model's (GLIDE, guided-diffusion).
            var_out = None if var_out is None else var_out[:len(x)]
        out = out.astype(x.dtype, copy=False)  # a float64 model output must not promote the chain
        if with_variance and var_out is not None:
            return backend.xp_of(out).concatenate([out, var_out.astype(x.dtype, copy=False)], axis=1)
        return out

    def _check_output(self, out, x):
        expected = (x.shape[0], self.output_channels(x.shape[1]), *x.shape[2:])
        if tuple(out.shape) != expected:
            what = ("two values per input value: eps, x_0 or v, then the variance (a learned "
                    f"{self.model_var_type!r} variance)" if self.learn_sigma else "one value per input value (eps, x_0 or v)")
            raise ValueError(f"the model returned shape {tuple(out.shape)} for x_t of shape {tuple(x.shape)}; "
                             f"it must predict {what}, shape {expected}")

    def output_channels(self, channels):
        """The model's output channels for `channels` input channels: twice as many with a learned variance."""
        return 2 * channels if self.learn_sigma else channels

    def _split_output(self, model_output):
        """(mean half, variance half) of a model output: the first C channels (eps, x_0 or v) and, with a
        learned variance, the last C (log sigma^2 or Eq. 15's v); the variance half is None for a fixed one.
        Works on arrays and Tensors (slicing a Tensor keeps the graph)."""
        if not self.learn_sigma:
            return model_output, None
        c = model_output.shape[1] // 2
        return model_output[:, :c], model_output[:, c:]

    def _full_t(self, x, i):
        """The timestep i for every sample of the batch x: an int64 array (N,) on x's backend."""
        return backend.xp_of(x).full((x.shape[0],), i, dtype=backend.host.int64)

    # ------------------------------------------------------------------ forward process q

    def q_step(self, x_prev, t, noise=None):
        """x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps, one step of the forward Markov chain q(x_t | x_{t-1}): Eq. 2.

        Code `t` is the paper's step t + 1: `q_step(x_0, 0)` gives x_1, the last step `T - 1` gives x_T.
        Composed from x_0, these steps give a sample of Eq. 4 (tests/test_diffusion.py checks the moments).
        """
        if noise is None:
            x = _data(x_prev)
            noise = backend.default_generator().normal(x.shape, dtype=x.dtype, like=x)
        return (self._extract("sqrt_alphas", t, x_prev) * x_prev
                + self._extract("sqrt_betas", t, x_prev) * noise)

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I): Eq. 4."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, a sample of q(x_t | x_0): Eq. 4."""
        if noise is None:
            noise = backend.default_generator().normal(_data(x_start).shape, dtype=_data(x_start).dtype,
                                                       like=_data(x_start))  # on x's backend, not the active one
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I): Eq. 6-7."""
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)  # mu_tilde_t(x_t, x_0), Eq. 7
        variance = self._extract("posterior_variance", t, x_t)  # beta_tilde_t, Eq. 7
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t, t, eps):
        """x_0 = x_t / sqrt(alpha_bar_t) - sqrt(1 / alpha_bar_t - 1) eps: Eq. 4 solved for x_0 (Eq. 15)."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_noise_from_start(self, x_t, t, x_start):
        """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t): Eq. 4 solved for eps (the inverse of Eq. 15).

        Written without 1 / alpha_bar, so it stays finite at alpha_bar_T = 0 (zero terminal SNR).
        """
        return ((x_t - self._extract("sqrt_alphas_cumprod", t, x_t) * x_start)
                / self._extract("sqrt_one_minus_alphas_cumprod", t, x_t))

    def predict_start_from_v(self, x_t, t, v):
        """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v (Salimans & Ho 2022, Sec. 4)."""
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    def velocity(self, x_start, t, noise):
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, the "v" model's target (Salimans & Ho 2022)."""
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)

    # ------------------------------------------------------------------ reverse process p

    def predict_xstart(self, model_output, x, t, clip_denoised=True):
        """The model's x_0 prediction from its output, whatever it predicts: Eq. 15 for eps,
        itself for x_0, Salimans & Ho's inverse for v. Shared by the ancestral and DDIM samplers.

        clip_denoised clips it to the data range [-1, 1]: a trained model's early predictions
        overshoot, and clipping them is what keeps few-step and ancestral samples in range.
        """
        if self.model_mean_type == "eps":
            pred_xstart = self.predict_start_from_noise(x, t, model_output)
        elif self.model_mean_type == "x0":
            pred_xstart = model_output
        else:
            pred_xstart = self.predict_start_from_v(x, t, model_output)
        return pred_xstart.clip(-1.0, 1.0) if clip_denoised else pred_xstart

    def p_mean_from_noise(self, x_t, t, eps):
        """mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)): Eq. 11.

        The reverse process's mean as the paper writes it, straight from the predicted noise `eps`
        (Algorithm 2, line 4 is this plus sigma_t z). The samplers take the clipped route of
        p_mean_variance instead: x_0_hat from eps (Eq. 15), clipped to [-1, 1], then the posterior
        mean mu_tilde_t(x_t, x_0_hat) (Eq. 7). Substituting Eq. 15 into Eq. 7 gives exactly this
        formula, so the two agree (to rounding) when nothing is clipped, i.e. with
        clip_denoised=False or x_0_hat inside [-1, 1]; where clipping bites, the clipped mean moves
        by posterior_mean_coef1 (clip(x_0_hat) - x_0_hat). tests/test_diffusion.py checks both.
        """
        return self._extract("sqrt_recip_alphas", t, x_t) * (
            x_t - self._extract("betas", t, x_t) / self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * eps)

    def p_variance(self, var_output, x, t):
        """sigma_t^2 of p_theta(x_{t-1} | x_t) and its log: (variance, log_variance).

        Fixed (Sec. 3.2): beta_tilde_t or beta_t, from the tables (var_output is None). Learned (Improved
        DDPM): "learned" reads log sigma_t^2 from the model's variance half; "learned_range" reads v in
        [-1, 1], mapped to [0, 1] as improved-diffusion does, and interpolates in the log domain (their Eq. 15):
            log sigma_t^2 = v' log beta_t + (1 - v') log beta_tilde_t,   v' = (v + 1) / 2
        so v = 1 gives beta_t and v = -1 beta_tilde_t. At code t = 0 (the paper's step 1) beta_tilde is 0;
        its log is code t = 1's, as for the fixed variances (posterior_log_variance_clipped). On a respaced
        chain both ends are the respaced chain's own beta and beta_tilde (the tables are built from its betas).
        var_output may be an array or a Tensor (the bound's gradient flows into v).
        """
        if not self.learn_sigma:
            return self._extract("model_variance", t, x), self._extract("model_log_variance", t, x)
        if self.model_var_type == "learned":
            log_variance = var_output
        else:
            frac = (var_output + 1.0) / 2.0
            log_variance = (frac * self._extract("log_betas", t, x)                                  # Eq. 15
                            + (1.0 - frac) * self._extract("posterior_log_variance_clipped", t, x))
        variance = log_variance.exp() if isinstance(log_variance, Tensor) else backend.xp_of(log_variance).exp(
            log_variance)
        return variance, log_variance

    def p_mean_variance(self, model, x, t, clip_denoised=True, model_output=None, model_kwargs=None, guidance=0.0):
        """Mean and variance of p_theta(x_{t-1} | x_t) (Eq. 11; sigma_t^2 fixed as in Sec. 3.2 or learned,
        p_variance) and x_0_hat.

        Eq. 11's mean, mu_theta(x_t, t) (p_mean_from_noise), is computed here as the posterior mean
        mu_tilde_t(x_t, x_0_hat) of Eq. 7 at x_0_hat from Eq. 15: the same function of eps_theta when
        nothing is clipped, but this route lets x_0_hat be clipped to [-1, 1] first, as the original
        code does, and serves x_0 and v models too.
        A given `model_output` (the whole output, both halves with a learned variance; a Tensor while
        training on the bound) is used instead of calling `model`, which otherwise gets `model_kwargs`
        (e.g. labels) and the guidance weight (see _call_model).
        Returns a dict with "mean", "variance", "log_variance" and "pred_xstart".
        """
        if model_output is None:
            model_output = self._call_model(model, x, t, model_kwargs, guidance, with_variance=True)
        mean_output, var_output = self._split_output(model_output)
        pred_xstart = self.predict_xstart(mean_output, x, t, clip_denoised)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)    # = Eq. 11 when unclipped
        variance, log_variance = self.p_variance(var_output, x, t)        # sigma_t^2
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model, x, t, noise=None, clip_denoised=True, model_kwargs=None, guidance=0.0):
        """Algorithm 2, line 4: one reverse step, and no noise at the last step.

            x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t) / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z

        i.e. mu_theta(x_t, t) of Eq. 11 (p_mean_from_noise; 1 - alpha_t = beta_t) plus sigma_t z. The
        mean comes from p_mean_variance, which is that formula when clip_denoised=False (an x_0 or v
        model's output stands for the eps it implies); by default it clips x_0_hat to [-1, 1] first,
        as the original code does. The last step is the paper's t = 1, code t = 0. A mask rather than an `if`:
        no GPU sync, and a batch may mix timesteps. Returns {"sample": x_{t-1}, "pred_xstart": x_0_hat}.
        """
        if noise is None:
            noise = backend.default_generator().normal(x.shape, dtype=x.dtype, like=x)
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs=model_kwargs, guidance=guidance)
        nonzero = (backend.xp_of(x).asarray(_data(t)) != 0).astype(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        # line 4: mu_theta(x_t, t) (Eq. 11, through Eq. 15 and 7 so x_0_hat can be clipped) + sigma_t z
        return {"sample": out["mean"] + nonzero * out["variance"] ** 0.5 * noise, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop_progressive(self, model, shape, noise=None, seed=None, clip_denoised=True, progress=False,
                                  model_kwargs=None, guidance=0.0):
        """Algorithm 2, yielding {"t", "sample", "pred_xstart"} after every step (Fig. 6 shows pred_xstart).

            1: x_T ~ N(0, I)
            2: for t = T, ..., 1 do
            3:     z ~ N(0, I) if t > 1, else z = 0
            4:     x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t) / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z
            5: end for
            6: return x_0

        The code's i runs from T - 1 to 0: i is the paper's t - 1, and the yielded "t" is i.
        `model_kwargs` and `guidance` reach eps_theta (labels, classifier-free guidance: _call_model).
        """
        generator = _generator(seed)
        x = self._initial_noise(shape, noise, generator)                                  # line 1
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), desc="sampling", disable=not progress):  # line 2
            z = generator.normal(x.shape, dtype=x.dtype, like=x)                          # line 3 (zeroed at i = 0)
            out = self.p_sample(model, x, self._full_t(x, i), z, clip_denoised, model_kwargs, guidance)  # line 4
            x = out["sample"]
            yield {"t": i, "sample": x, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, seed=None, clip_denoised=True, progress=False,
                      model_kwargs=None, guidance=0.0):
        """Ancestral sampling, Algorithm 2: x_T ~ N(0, I), then T reverse steps; returns x_0 (line 6).

        `noise` is x_T; `seed` makes the whole chain reproducible (same seed, same bits).
        """
        for step in self.p_sample_loop_progressive(model, shape, noise, seed, clip_denoised, progress,
                                                   model_kwargs, guidance):
            pass
        return step["sample"]

    def _initial_noise(self, shape, noise, generator):
        """x_T ~ N(0, I) (Algorithm 2, line 1), or the caller's `noise`."""
        if noise is None:
            return generator.normal(tuple(shape))
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={tuple(shape)} was asked for")
        return _data(noise)

    def _with_betas(self, betas):
        """A chain of other betas with this one's model and loss settings."""
        return GaussianDiffusion(betas, self.model_mean_type, self.model_var_type, self.loss_type, self.num_bins,
                                 self.vlb_weight)

    def respaced(self, num_steps):
        """The same model sampled with num_steps ancestral steps (Nichol & Dhariwal 2021, Sec. 4).

        Keeps num_steps evenly spaced timesteps (schedule.space_timesteps) and recomputes the
        betas from their alpha_bars (schedule.respace_betas), so q(x_t | x_0) is unchanged at
        the kept steps; the model is shown the original timesteps through `timestep_map`. A learned
        "learned_range" variance then spans the respaced chain's beta and beta_tilde (p_variance).
        """
        kept = space_timesteps(self.num_timesteps, num_steps)
        spaced = self._with_betas(respace_betas(self.alphas_cumprod, kept))
        spaced.timestep_map = kept if self.timestep_map is None else self.timestep_map[kept]
        return spaced

    # ------------------------------------------------------------------ DDIM

    def ddim_timesteps(self, num_steps, spacing="leading", steps_offset=0):
        """DDIM's kept timesteps, increasing: "leading" is the DDIM paper's 0, c, .., (n - 1) c with c = T // n
        (see schedule.ddim_timesteps for "trailing" and "linspace", and steps_offset)."""
        return ddim_timesteps(self.num_timesteps, num_steps, spacing, steps_offset)

    def ddim_sample_loop_progressive(self, model, shape, num_steps=50, eta=0.0, noise=None, seed=None,
                                     clip_denoised=True, progress=False, model_kwargs=None, guidance=0.0,
                                     spacing="leading", set_alpha_to_one=True, steps_offset=0):
        """DDIM (Song et al. 2021) step by step: yields {"t", "sample", "pred_xstart"}; one model call per step.

        From x_T ~ N(0, I), for the kept timesteps t from last to first (ddim_timesteps), with
        alpha_bar_prev the next kept step's alpha_bar (after the last step: 1, or alpha_bar at code
        t = 0 with set_alpha_to_one=False, as diffusers' DDIMScheduler offers):
            x_0_hat, eps_hat = the model's predictions at (x_t, t)
            sigma  = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) sqrt(1 - alpha_bar / alpha_bar_prev)   (Eq. 16)
            x_prev = sqrt(alpha_bar_prev) x_0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma z    (Eq. 12)
        eta = 0 is deterministic; eta = 1 is the DDPM-like sampler. When clip_denoised clips x_0_hat,
        eps_hat is recomputed from the clipped x_0_hat (the original DDIM and improved-diffusion convention).
        Every step goes to the next point of its own grid, whatever the spacing (diffusers steps to
        t - T // n instead, which is off the "linspace" and "trailing" grids when n does not divide T).
        """
        generator = _generator(seed)
        x = self._initial_noise(shape, noise, generator)
        timesteps = self.ddim_timesteps(num_steps, spacing, steps_offset)
        final_alpha_bar = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        for i in tqdm(range(num_steps - 1, -1, -1), desc="ddim", disable=not progress):
            t = self._full_t(x, int(timesteps[i]))
            # Python floats: a float64 numpy scalar would promote the float32 chain.
            alpha_bar = float(self.alphas_cumprod[timesteps[i]])
            alpha_bar_prev = float(self.alphas_cumprod[timesteps[i - 1]]) if i > 0 else final_alpha_bar
            model_output = self._call_model(model, x, t, model_kwargs, guidance)
            pred_xstart = self.predict_xstart(model_output, x, t, clip_denoised)
            eps = self.predict_noise_from_start(x, t, pred_xstart)
            sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * math.sqrt(1 - alpha_bar / alpha_bar_prev)
            x = math.sqrt(alpha_bar_prev) * pred_xstart + math.sqrt(max(1 - alpha_bar_prev - sigma ** 2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * generator.normal(x.shape, dtype=x.dtype, like=x)
            yield {"t": int(timesteps[i]), "sample": x, "pred_xstart": pred_xstart}

    def ddim_sample_loop(self, model, shape, num_steps=50, eta=0.0, noise=None, seed=None,
                         clip_denoised=True, progress=False, model_kwargs=None, guidance=0.0,
                         spacing="leading", set_alpha_to_one=True, steps_offset=0):
        """DDIM sampling (Song et al. 2021, Eq. 12) with exactly num_steps model calls; returns x_0."""
        for step in self.ddim_sample_loop_progressive(model, shape, num_steps, eta, noise, seed, clip_denoised,
                                                      progress, model_kwargs, guidance, spacing, set_alpha_to_one,
                                                      steps_offset):
            pass
        return step["sample"]

    # ------------------------------------------------------------------ DPM-Solver++

    def dpm_solver_sample_loop_progressive(self, model, shape, num_steps=20, order=2, spacing="linspace", noise=None,
                                           seed=None, clip_denoised=False, progress=False, model_kwargs=None,
                                           guidance=0.0):
        """DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095), multistep, in data-prediction form: yields per step.

        It integrates the probability-flow ODE in lambda_t = log(alpha_t / sigma_t), half the log-SNR, with
        alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t). From s to t (h = lambda_t - lambda_s > 0),
        with D_i the model's x_0 predictions at the last grid points s = s_0, s_1, s_2 (newest first):
            order 1:  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D_0              (Sec. 4.1; = DDIM, eta 0)
            order 2:  ... - alpha_t (e^-h - 1) D_1 / 2,  D_1 = (D_0 - D_s1) h / h_0      (Algorithm 2, "2M")
            order 3:  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D_0 + alpha_t ((e^-h - 1) / h + 1) D_1
                            - alpha_t ((e^-h - 1 + h) / h^2 - 1/2) D_2
        with h_0 = lambda_s0 - lambda_s1, h_1 = lambda_s1 - lambda_s2, r_0 = h_0 / h, r_1 = h_1 / h and
        D1_0 = (D_0 - D_s1) / r_0, D1_1 = (D_s1 - D_s2) / r_1, D_1 = D1_0 + r_0 (D1_0 - D1_1) / (r_0 + r_1),
        D_2 = (D1_0 - D1_1) / (r_0 + r_1): order 3 as DPM-Solver's reference code and diffusers compute it
        (the multistep order-3 update of DPM-Solver's Appendix; the DPM-Solver++ paper states orders 1 and 2).
        On the Gaussian oracle (tests/test_diffusion.py, log sigma linear in t) order 3 converges at
        order 2: its first step has no history and is first-order, and that step's local error O(h^2)
        stays in the global error; it is still the most accurate of the three at every n.
        Lower orders where the history is short or the step is long, as the paper and diffusers do:
        step 1 is order 1, step 2 at most order 2; the last step goes to sigma = 0 (h = infinity, where only
        order 1 is finite: x_0 = D_0), and with fewer than 15 steps the one before it is at most order 2.
        The grid is schedule.dpm_solver_timesteps (n network calls, at integer timesteps of this chain,
        respaced or not). clip_denoised clips each D_i to [-1, 1]. With alpha_bar_T = 0 (zero terminal
        SNR) lambda_T = -infinity and the first step's h is infinite: x = sigma_t x_T + alpha_t D_0, still finite.
        Yields {"t", "sample", "pred_xstart"}.
        """
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ has orders 1, 2 and 3, got order={order!r}")
        generator = _generator(seed)
        x = self._initial_noise(shape, noise, generator)
        grid = dpm_solver_timesteps(self.num_timesteps, num_steps, spacing)[::-1]         # T - 1 side first
        alpha_bar = host.append(self.alphas_cumprod[grid], 1.0)                          # sigma = 0 after the last
        one_minus = host.append(self.one_minus_alphas_cumprod[grid], 0.0)
        alpha, sigma = host.sqrt(alpha_bar), host.sqrt(one_minus)
        with host.errstate(divide="ignore"):
            lam = host.log(alpha) - host.log(sigma)                                       # -inf / +inf at the ends
        history = []                                                                      # (lambda, D), newest last
        for i in tqdm(range(num_steps), desc="dpm++", disable=not progress):
            t = self._full_t(x, int(grid[i]))
            model_output = self._call_model(model, x, t, model_kwargs, guidance)
            pred_xstart = self.predict_xstart(model_output, x, t, clip_denoised)
            history = (history + [(float(lam[i]), pred_xstart)])[-3:]
            k = min(order, i + 1)
            if i == num_steps - 1:
                k = 1
            elif i == num_steps - 2 and num_steps < 15:
                k = min(k, 2)
            x = self._dpm_solver_update(x, history[-k:], float(lam[i + 1]),
                                        float(sigma[i + 1] / sigma[i]), float(alpha[i + 1]))
            yield {"t": int(grid[i]), "sample": x, "pred_xstart": pred_xstart}

    @staticmethod
    def _dpm_solver_update(x, history, lam_t, sigma_ratio, alpha_t):
        """One DPM-Solver++ step of order len(history) from the newest point of history to lambda_t (see above)."""
        (lam_s0, d0) = history[-1]
        h = lam_t - lam_s0
        phi = math.expm1(-h)                                                              # e^-h - 1, exact near 0
        x = sigma_ratio * x - (alpha_t * phi) * d0
        if len(history) == 2:
            (lam_s1, d_s1) = history[0]
            d1 = (h / (lam_s0 - lam_s1)) * (d0 - d_s1)                                    # (D_0 - D_s1) / r_0
            x = x - (0.5 * alpha_t * phi) * d1
        elif len(history) == 3:
            (lam_s2, d_s2), (lam_s1, d_s1) = history[0], history[1]
            h_0, h_1 = lam_s0 - lam_s1, lam_s1 - lam_s2
            r0, r1 = h_0 / h, h_1 / h
            d1_0, d1_1 = (h / h_0) * (d0 - d_s1), (h / h_1) * (d_s1 - d_s2)
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
            x = x + (alpha_t * (phi / h + 1.0)) * d1 - (alpha_t * ((phi + h) / h ** 2 - 0.5)) * d2
        return x

    def dpm_solver_sample_loop(self, model, shape, num_steps=20, order=2, spacing="linspace", noise=None, seed=None,
                               clip_denoised=False, progress=False, model_kwargs=None, guidance=0.0):
        """DPM-Solver++ sampling (Lu et al. 2022) with exactly num_steps model calls; returns x_0. Order 1 is DDIM."""
        for step in self.dpm_solver_sample_loop_progressive(model, shape, num_steps, order, spacing, noise, seed,
                                                            clip_denoised, progress, model_kwargs, guidance):
            pass
        return step["sample"]

    # ------------------------------------------------------------------ the Karras (EDM) ODE sampler

    def karras_sigmas(self, num_steps, rho=7.0):
        """Karras et al.'s noise levels (EDM Eq. 5) between this chain's sigma_min and sigma_max, then 0.

        On the VP model, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps.
        """
        if self.zero_terminal_snr:
            raise ValueError("the Karras sampler starts at sigma_max = sqrt((1 - alpha_bar_T) / alpha_bar_T), which is "
                             "infinite with zero terminal SNR: use the dpm++ or ddim sampler")
        sigma = self.sqrt_recipm1_alphas_cumprod
        return karras_sigmas(float(sigma[0]), float(sigma[-1]), num_steps, rho)

    def _sigma_to_t(self, sigma):
        """The fractional code timestep whose sigma_t is `sigma`: linear in log sigma between grid points."""
        log_sigmas = host.log(self.sqrt_recipm1_alphas_cumprod)   # increasing in t
        return float(host.interp(math.log(sigma), log_sigmas, host.arange(self.num_timesteps, dtype=host.float64)))

    def _denoise(self, model, x, sigma, clip_denoised, model_kwargs, guidance):
        """EDM's denoiser D(x; sigma) from the VP model: its x_0 prediction at x = x_0 + sigma eps.

        The model sees x_t = x / sqrt(1 + sigma^2) (alpha_bar = 1 / (1 + sigma^2)) and the timestep whose
        sigma_t this is: a fractional t, linear in log sigma between the two grid points around it
        (as k-diffusion and diffusers' Euler and Heun schedulers do); the sinusoidal timestep embedding
        takes real t. Eq. 15 (and the x_0 and v forms) then use this alpha_bar, not a grid point's.
        """
        xp = backend.xp_of(x)
        t = xp.full((x.shape[0],), self._sigma_to_t(sigma), dtype=host.float64)
        alpha_bar = 1.0 / (1.0 + sigma ** 2)
        x_t = x * math.sqrt(alpha_bar)
        out = self._call_model(model, x_t, t, model_kwargs, guidance)
        if self.model_mean_type == "eps":
            pred_xstart = x - sigma * out                                                 # Eq. 15 at this sigma
        elif self.model_mean_type == "x0":
            pred_xstart = out
        else:
            pred_xstart = math.sqrt(alpha_bar) * x_t - math.sqrt(1.0 - alpha_bar) * out
        return pred_xstart.clip(-1.0, 1.0) if clip_denoised else pred_xstart

    def karras_sample_loop_progressive(self, model, shape, num_steps=20, solver="heun", rho=7.0, noise=None,
                                       seed=None, clip_denoised=False, progress=False, model_kwargs=None,
                                       guidance=0.0):
        """Karras et al. 2022 (EDM, arXiv:2206.00364), Algorithm 1: the deterministic ODE sampler on the VP model.

        In x = x_t / sqrt(alpha_bar_t) the probability-flow ODE is dx / dsigma = (x - D(x; sigma)) / sigma
        (EDM Eq. 3 with sigma(t) = t), D the denoiser (_denoise). From x = sqrt(1 + sigma_max^2) x_T, x_T ~ N(0, I),
        over the sigmas of karras_sigmas (sigma_0 = sigma_max > .. > sigma_{n-1} = sigma_min > sigma_n = 0):
            d_i = (x_i - D(x_i; sigma_i)) / sigma_i,   x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i          (Euler)
            heun, if sigma_{i+1} > 0:  d' = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1},
                                       x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d') / 2           (line 7-8)
        Network calls: euler n, heun 2 n - 1 (its last step, to sigma = 0, is an Euler step).
        Yields {"t" (the model's fractional timestep), "sigma", "sample" (x_t = x / sqrt(1 + sigma^2)),
        "pred_xstart"}.
        """
        if solver not in KARRAS_SOLVERS:
            raise ValueError(f"unknown solver {solver!r}: use one of {', '.join(map(repr, KARRAS_SOLVERS))}")
        sigmas = self.karras_sigmas(num_steps, rho)
        generator = _generator(seed)
        x = self._initial_noise(shape, noise, generator) * math.sqrt(1.0 + float(sigmas[0]) ** 2)
        for i in tqdm(range(num_steps), desc=solver, disable=not progress):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = self._denoise(model, x, s, clip_denoised, model_kwargs, guidance)
            d = (x - denoised) / s
            x_next = x + (s_next - s) * d
            if solver == "heun" and s_next > 0:
                d_next = (x_next - self._denoise(model, x_next, s_next, clip_denoised, model_kwargs, guidance)) / s_next
                x_next = x + (s_next - s) * 0.5 * (d + d_next)
            x = x_next
            yield {"t": self._sigma_to_t(s), "sigma": s_next, "sample": x / math.sqrt(1.0 + s_next ** 2), "pred_xstart": denoised}

    def karras_sample_loop(self, model, shape, num_steps=20, solver="heun", rho=7.0, noise=None, seed=None,
                           clip_denoised=False, progress=False, model_kwargs=None, guidance=0.0):
        """The Karras (EDM) ODE sampler (Heun, or Euler with solver="euler") on sigma_t of this chain; returns x_0."""
        for step in self.karras_sample_loop_progressive(model, shape, num_steps, solver, rho, noise, seed,
                                                        clip_denoised, progress, model_kwargs, guidance):
            pass
        return step["sample"]

    # ------------------------------------------------------------------ losses and the bound

    def training_losses(self, model, x_start, t, noise=None, model_kwargs=None):
        """The loss of Algorithm 1 for a batch x_start (N, ...) at timesteps t (N,): {"loss": Tensor (N,), ...}.

        "mse": L_simple (Eq. 14), the mean over non-batch axes of (target - model output)^2 with the
        target eps, x_0 or v; also returned as "mse". With the eps target it is Eq. 12's term for t without
        Eq. 12's weight beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)): Eq. 14 drops it (Sec. 3.4),
        which down-weights the small-t terms, for better samples. "kl": the bound's term for t (Eq. 5)
        in bits/dim, L_0 (Eq. 13) where code t == 0 (the paper's step 1), computed without clipping x_0
        as the original does; also as "vb". With a learned variance "kl" trains both halves on it.
        "hybrid" (Improved DDPM, Sec. 3.1, their Eq. 16): L_hybrid = L_simple + lambda L_vlb, where
        L_vlb = L_0 + .. + L_{T-1} is the whole bound, estimated from the sampled term as T L_t, so
            loss = mse + vlb_weight * T * vb       (T: this chain's own number of steps)
        which at T = 1000 and lambda = 0.001 is mse + vb, as improved-diffusion's rescaled MSE computes
        (its vb * T / 1000). Inside L_vlb the mean half of the output is detached (stop-gradient): the
        mean learns from L_simple alone and the variance from L_vlb alone.
        `model_kwargs` go to the model (labels y for a class-conditional model, NO_LABEL where
        Ho & Salimans' Algorithm 1 drops them). The model runs with gradients on, so a training step is
            losses = diffusion.training_losses(model, x_start, t)
            losses["loss"].mean().backward()
        """
        x_start = _data(x_start)
        if noise is None:
            noise = backend.default_generator().normal(x_start.shape, dtype=x_start.dtype, like=x_start)
        noise = _data(noise)
        x_t = self.q_sample(x_start, t, noise)  # Eq. 4
        model_output = model(Tensor(x_t), self._model_timesteps(t), **(model_kwargs or {}))
        if not isinstance(model_output, Tensor):  # a plain array: still return Tensors, just without a graph
            model_output = Tensor(model_output)
        self._check_output(model_output, x_t)
        mean_output, var_output = self._split_output(model_output)
        terms = {}
        if self.loss_type in ("mse", "hybrid"):
            if self.model_mean_type == "eps":
                target = noise
            elif self.model_mean_type == "x0":
                target = x_start
            else:
                target = self.velocity(x_start, t, noise)
            # ||eps - eps_theta(x_t, t)||^2, Eq. 14: no beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)) weight (Eq. 12)
            terms["mse"] = mean_flat((mean_output - target) ** 2)
        if self.loss_type in ("kl", "hybrid"):
            if self.loss_type == "hybrid":   # stop-gradient on the mean: L_vlb trains the variance only (Sec. 3.1)
                model_output = ops.concatenate([mean_output.detach(), var_output], axis=1)
            terms["vb"], _ = self._vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised=False)
        if self.loss_type == "mse":
            terms["loss"] = terms["mse"]
        elif self.loss_type == "kl":
            terms["loss"] = terms["vb"]
        else:
            terms["loss"] = terms["mse"] + (self.vlb_weight * self.num_timesteps) * terms["vb"]   # Eq. 16
        return terms

    def _vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised):
        """The bound's term for timestep t in bits/dim (Tensor (N,)), and pred_xstart.

        In the paper's indices: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for steps t > 1 (Eq. 5),
        and L_0 = -log p(x_0 | x_1), the discretised Gaussian decoder (Eq. 13), at step 1 (code t == 0).
        """
        model_output = model_output if isinstance(model_output, Tensor) else Tensor(model_output)
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(None, x_t, t, clip_denoised, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, out["mean"], 0.5 * out["log_variance"], num_bins=self.num_bins)) / math.log(2.0)
        # A mask, not an `if`: a batch mixes timesteps. Both terms are finite everywhere.
        is_first = backend.xp_of(x_start).asarray(_data(t)) == 0
        return ops.where(is_first, decoder_nll, kl), out["pred_xstart"]

    def prior_bpd(self, x_start):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape (N,): no parameters, about 0 for a good schedule."""
        t = self._full_t(x_start, self.num_timesteps - 1)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, seed=None, progress=False, model_kwargs=None):
        """The negative log-likelihood bound L = L_T + sum_t L_{t-1} (Eq. 5) in bits/dim (Table 2).

        Returns a dict of arrays: "total_bpd" (N,), "prior_bpd" (N,), "vb" (N, T) with column t the
        term for timestep t (column 0 is the decoder L_0, Eq. 13), and "mse" (N, T), the
        noise-prediction error at each t. One model call per timestep, each with fresh noise.
        `model_kwargs` (labels) give a class-conditional model's bound on log p(x | y); no guidance
        here: a guided eps is not a likelihood model's.
        """
        x_start = _data(x_start)
        generator = _generator(seed)
        xp = backend.xp_of(x_start)
        vb, mse = [None] * self.num_timesteps, [None] * self.num_timesteps
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), desc="bpd", disable=not progress):
            t = self._full_t(x_start, i)
            noise = generator.normal(x_start.shape, dtype=x_start.dtype, like=x_start)
            x_t = self.q_sample(x_start, t, noise)
            with no_grad():
                output = self._call_model(model, x_t, t, model_kwargs, with_variance=True)
                terms, pred_xstart = self._vb_terms_bpd(output, x_start, x_t, t, clip_denoised)
            vb[i] = terms.data
            eps = self.predict_noise_from_start(x_t, t, _data(pred_xstart))
            mse[i] = mean_flat((eps - noise) ** 2)
        vb, mse = xp.stack(vb, axis=1), xp.stack(mse, axis=1)  # (N, T) each
        prior_bpd = self.prior_bpd(x_start)
        return {"total_bpd": vb.sum(axis=1) + prior_bpd, "prior_bpd": prior_bpd, "vb": vb, "mse": mse}

    # ------------------------------------------------------------------ interpolation

    def truncated(self, t):
        """The chain of code steps 0 .. t alone (the same alpha_bars and model timesteps): its sampler run from
        noise=x_t decodes x_t, e.g. an interpolation's mix, with any sampler."""
        if not 1 <= t < self.num_timesteps:
            raise ValueError(f"t must lie in 1 .. {self.num_timesteps - 1} for a chain of its first t + 1 steps, "
                             f"got {t}")
        short = self._with_betas(self.betas[:t + 1])
        short.timestep_map = None if self.timestep_map is None else self.timestep_map[:t + 1]
        return short

    def interpolate(self, model, x_a, x_b, t, lambdas, noise=None, seed=None, clip_denoised=True, progress=False,
                    model_kwargs=None, guidance=0.0, decode=None):
        """Interpolate in latent space (Sec. 4.4, Fig. 8): returns x_0 for each lambda, shape (L, N, ...).

        Both batches are encoded with q at timestep t using the same noise (Eq. 4), mixed as
        (1 - lambda) x_t + lambda x'_t, and decoded by the reverse process from t down to 0. The
        reverse noise is shared across lambdas, so only the mix differs between the outputs.
        model_kwargs["y"] (N,) labels the N pairs (the same label for every lambda), with `guidance` as in p_sample.
        `decode(x_t, model_kwargs)` -> x_0 replaces the ancestral decoder, e.g. a deterministic sampler run
        on truncated(t) (which needs no shared noise).
        """
        x_a, x_b = _data(x_a), _data(x_b)
        xp = backend.xp_of(x_a)
        generator = _generator(seed)
        if noise is None:
            noise = generator.normal(x_a.shape, dtype=x_a.dtype, like=x_a)
        t_batch = self._full_t(x_a, t)
        xt_a, xt_b = self.q_sample(x_a, t_batch, noise), self.q_sample(x_b, t_batch, _data(noise))
        lambdas = [float(lam) for lam in lambdas]
        mixed = xp.concatenate([(1.0 - lam) * xt_a + lam * xt_b for lam in lambdas])  # (L * N, ...)
        x = mixed
        if model_kwargs and model_kwargs.get("y") is not None:   # one label per pair, repeated for each lambda
            model_kwargs = {**model_kwargs, "y": xp.concatenate([xp.asarray(_data(model_kwargs["y"]))] * len(lambdas))}
        if decode is not None:
            return decode(x, model_kwargs).reshape(len(lambdas), *x_a.shape)
        for i in tqdm(range(int(t), -1, -1), desc="sampling", disable=not progress):   # Algorithm 2 from step t
            z = xp.concatenate([generator.normal(x_a.shape, dtype=x_a.dtype, like=x_a)] * len(lambdas))  # one z, every lambda
            x = self.p_sample(model, x, self._full_t(x, i), z, clip_denoised, model_kwargs, guidance)["sample"]
        return x.reshape(len(lambdas), *x_a.shape)
