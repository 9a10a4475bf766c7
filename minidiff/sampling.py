"""Sampling for callers: load a finished model and draw from it (Algorithm 2, DDIM, DPM-Solver++, Heun, Euler).

`load_model` rebuilds the model and diffusion of a checkpoint: a training run's (its EMA
weights by default, as the paper samples) or a converted diffusers model's. `sampling_plan`
is the one policy for "sample with fewer steps"; `draw_samples` applies it in seeded
batches, for the CLI, the examples, the benchmarks and the Trainer's sample grids alike.
May import: backend, checkpoint, config, pretrained, schedule.
"""
from typing import NamedTuple

from tqdm.auto import tqdm

from . import backend, checkpoint, pretrained
from .checkpoint import CheckpointError
from .config import build_diffusion, build_model, config_from_dict
from .diffusion import SAMPLERS
from .schedule import SPACINGS, dpm_solver_timesteps

DEFAULT_STEPS = {"ddim": 50, "dpm++": 20, "heun": 10, "euler": 20}   # the few-step samplers' defaults (BENCHMARKS.md)
ORDERS = (1, 2, 3)


class SamplingPlan(NamedTuple):
    """What to run: `sampler` on `diffusion` (a respaced chain for ddpm with fewer steps) with `steps` steps.

    `options` are the sampler's own settings (eta, order, spacing, ...), keyword arguments of its loop.
    """
    diffusion: object
    sampler: str
    steps: int
    options: dict

    @property
    def network_calls(self):
        """Model evaluations per sample batch (doubled batch under guidance, still one call): Heun 2 n - 1."""
        return 2 * self.steps - 1 if self.sampler == "heun" else self.steps

    def describe(self):
        """A short name for reports and picture titles, e.g. 'dpm++ 20 steps (order 2)'."""
        extra = {k: v for k, v in self.options.items() if k in ("eta", "order", "spacing") and
                 not (k == "eta" and v == 0.0)}
        return f"{self.sampler} {self.steps} steps" + (f" ({', '.join(f'{k} {v}' for k, v in extra.items())})"
                                                       if extra else "")

    def run(self, model, shape, progressive=False, **kwargs):
        """The sampler's loop (its _progressive twin with progressive=True) with kwargs such as seed,
        noise, clip_denoised, progress, model_kwargs and guidance."""
        d, name = self.diffusion, self.sampler
        if name == "ddpm":
            loop = d.p_sample_loop_progressive if progressive else d.p_sample_loop
            return loop(model, shape, **kwargs)
        if name == "ddim":
            loop = d.ddim_sample_loop_progressive if progressive else d.ddim_sample_loop
        elif name == "dpm++":
            loop = d.dpm_solver_sample_loop_progressive if progressive else d.dpm_solver_sample_loop
        else:
            loop = d.karras_sample_loop_progressive if progressive else d.karras_sample_loop
        return loop(model, shape, num_steps=self.steps, **self.options, **kwargs)


def load_model(path, use_ema=True):
    """(model, diffusion, config, info) from a checkpoint file or run folder, ready to sample.

    A training checkpoint gives its TrainConfig, and `use_ema` chooses the EMA weights (the
    paper samples from them) over the live ones. A converted diffusers model (`minidiff
    convert`) holds one set of weights and has no TrainConfig: config is None, and
    use_ema=False is an error. A file that cannot be rebuilt is a CheckpointError naming it.
    """
    if pretrained.is_converted(path):
        if not use_ema:
            raise CheckpointError(f"{path} holds one set of weights (a converted model): drop --no-ema "
                                  f"(use_ema=False)")
        model, diffusion, info = pretrained.load_converted(path)
        return model, diffusion, None, info
    state = checkpoint.load(path)
    if state.get("format") != "minidiff-train":
        raise CheckpointError(f"{checkpoint.resolve(path)}: not a minidiff training checkpoint")
    try:
        config = config_from_dict(state["config"])
        info = state["data_info"]
        model = build_model(config, info["channels"], info["image_size"], info.get("num_classes"))
        if use_ema:
            shadow = {k[len("shadow."):]: v for k, v in state["ema"].items() if k.startswith("shadow.")}
            model.load_state_dict(shadow)
        else:
            model.load_state_dict(state["model"])
    except (ValueError, KeyError, TypeError) as err:   # written by another version, or damaged
        raise CheckpointError(f"{checkpoint.resolve(path)}: cannot rebuild the model ({err})") from None
    model.eval()
    return model, build_diffusion(config), config, info


def sampling_plan(diffusion, sampler=None, steps=0, eta=0.0, order=None, spacing=None, ddim_settings=None):
    """The one policy for "sample with fewer steps": a SamplingPlan.

    All T steps (steps 0 or T) run Algorithm 2 unless another sampler is named. Fewer steps (or an
    eta) run DDIM (Song et al. 2021) by default, whose 50 steps match the full chain's quality (BENCHMARKS.md);
    sampler="ddpm" respaces the ancestral chain instead (Nichol & Dhariwal 2021). "dpm++" (order 2
    unless `order` says otherwise), "heun" and "euler" are the ODE samplers; steps 0 means each one's
    DEFAULT_STEPS (heun's n steps cost 2 n - 1 network calls). `spacing` places DDIM's and
    DPM-Solver++'s timesteps (schedule.SPACINGS; DDIM "leading", DPM-Solver++ "linspace" by default);
    `ddim_settings` are a diffusers DDIMScheduler's spacing, set_alpha_to_one and steps_offset
    (pretrained.scheduler_settings), the defaults of a converted model's DDIM. An option the sampler
    does not have is a ValueError naming it.
    """
    T = diffusion.num_timesteps
    if isinstance(steps, bool) or int(steps) != steps or not 0 <= steps <= T:
        raise ValueError(f"steps must be between 1 and T = {T} (0: the sampler's default), got {steps}")
    steps = int(steps)
    if sampler is None:
        sampler = "ddim" if 0 < steps < T or eta else "ddpm"   # eta alone asks for DDIM's noise
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta is DDIM's noise; the {sampler} sampler has none: drop it or use sampler ddim")
    if order is not None and sampler != "dpm++":
        raise ValueError(f"order is DPM-Solver++'s; the {sampler} sampler has one order: drop it or use dpm++")
    if order is not None and order not in ORDERS:
        raise ValueError(f"order must be 1, 2 or 3 (DPM-Solver++), got {order}")
    if spacing is not None and sampler not in ("ddim", "dpm++"):
        raise ValueError(f"spacing places DDIM's and DPM-Solver++'s timesteps; {sampler} "
                         + ("keeps evenly strided steps (Nichol & Dhariwal 2021)" if sampler == "ddpm" else
                            "uses the Karras sigma schedule"))
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
    if sampler == "ddpm":
        if steps and steps < T:
            return SamplingPlan(diffusion.respaced(steps), "ddpm", steps, {})
        return SamplingPlan(diffusion, "ddpm", T, {})
    steps = steps or min(DEFAULT_STEPS[sampler], T - 1 if sampler == "dpm++" else T)   # dpm++ drops a point of n + 1
    if sampler == "ddim":
        options = {"eta": float(eta), **dict(ddim_settings or {})}
        if spacing is not None:
            options["spacing"] = spacing
        diffusion.ddim_timesteps(steps, options.get("spacing", "leading"), options.get("steps_offset", 0))
    elif sampler == "dpm++":
        options = {"order": 2 if order is None else int(order), "spacing": spacing or "linspace"}
        dpm_solver_timesteps(T, steps, options["spacing"])            # n distinct timesteps, or the error now
    else:
        options = {"solver": sampler}
        diffusion.karras_sigmas(steps)                                # zero terminal SNR refused now
    return SamplingPlan(diffusion, sampler, steps, options)


def every_class(num_classes, num):
    """Labels 0, .., 0, 1, .., K-1: num // K of each class (at least one), for one grid row per class."""
    return backend.host.repeat(backend.host.arange(num_classes), max(1, num // num_classes))


def draw_samples(diffusion, model, shape, num, seed, sampler=None, steps=0, eta=0.0, batch_size=256,
                 clip_denoised=True, progress=False, labels=None, guidance=0.0, plan=None):
    """`num` samples of `shape` (per sample) as one host array, drawn in batches by sampling_plan's policy.

    Batch i has its own stream [seed, i], so the first samples are the same whatever `num` is (and
    whatever the labels are). Images clip the x_0 prediction to their range [-1, 1] unless
    clip_denoised=False (a pretrained scheduler's clip_sample=False); 2-D points (shape (2,)) are never
    clipped. `labels` (num,) ask a class-conditional model for those classes, with classifier-free
    guidance weight `guidance` (Ho & Salimans 2022, Eq. 6; 0: plain conditional sampling). A given
    `plan` (sampling_plan's, with order, spacing, ...) replaces sampler, steps and eta.
    """
    plan = plan or sampling_plan(diffusion, sampler, steps, eta)
    clip = clip_denoised and len(shape) > 1
    if labels is not None and len(labels) != num:
        raise ValueError(f"{len(labels)} labels for {num} samples: give one label per sample")
    if guidance and labels is None:
        raise ValueError("guidance needs labels: classifier-free guidance steers towards a class")
    chunks, starts = [], range(0, num, batch_size)
    # One bar for the whole draw: several batches count samples (a per-batch step bar would restart each batch)
    overall = tqdm(total=num, unit="sample", desc=plan.describe(),
                   disable=not progress or len(starts) < 2)
    for i, start in enumerate(starts):
        batch = (min(batch_size, num - start), *shape)
        kwargs = dict(seed=[seed, i], clip_denoised=clip, progress=progress and len(starts) < 2, guidance=guidance)
        if labels is not None:
            kwargs["model_kwargs"] = {"y": backend.to_active(backend.host.asarray(labels[start:start + batch[0]]))}
        chunks.append(backend.to_numpy(plan.run(model, batch, **kwargs)))  # host copy (GPU sync)
        overall.update(batch[0])
    overall.close()
    return backend.host.concatenate(chunks)
