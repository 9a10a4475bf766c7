"""Sampling for callers: load a finished model and draw from it (Algorithm 2, or DDIM with fewer steps).

`load_model` rebuilds the model and diffusion of a checkpoint: a training run's (its EMA
weights by default, as the paper samples) or a converted diffusers model's. `sampling_plan`
is the one policy for "sample with fewer steps"; `draw_samples` applies it in seeded
batches, for the CLI, the examples, the benchmarks and the Trainer's sample grids alike.
May import: backend, checkpoint, config, pretrained.
"""
from . import backend, checkpoint, pretrained
from .checkpoint import CheckpointError
from .config import build_diffusion, build_model, config_from_dict

SAMPLERS = ("ddpm", "ddim")


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


def sampling_plan(diffusion, sampler=None, steps=0):
    """The one policy for "sample with fewer steps": (diffusion to run, its number of steps, DDIM?).

    All T steps (steps 0 or T) run Algorithm 2 unless sampler="ddim" (then 50 DDIM steps). Fewer
    steps run DDIM (Song et al. 2021) by default, whose 50 steps match the full chain's quality
    (BENCHMARKS.md); sampler="ddpm" respaces the ancestral chain instead (Nichol & Dhariwal 2021).
    """
    T = diffusion.num_timesteps
    if not 0 <= steps <= T:
        raise ValueError(f"steps must be between 1 and T = {T} (0: the sampler's default), got {steps}")
    if sampler is None:
        sampler = "ddim" if 0 < steps < T else "ddpm"
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if sampler == "ddim":
        return diffusion, steps or min(50, T), True
    if steps and steps < T:
        return diffusion.respaced(steps), steps, False
    return diffusion, T, False


def every_class(num_classes, num):
    """Labels 0, .., 0, 1, .., K-1: num // K of each class (at least one), for one grid row per class."""
    return backend.host.repeat(backend.host.arange(num_classes), max(1, num // num_classes))


def draw_samples(diffusion, model, shape, num, seed, sampler=None, steps=0, eta=0.0, batch_size=256,
                 clip_denoised=True, progress=False, labels=None, guidance=0.0):
    """`num` samples of `shape` (per sample) as one host array, drawn in batches by sampling_plan's policy.

    Batch i has its own stream [seed, i], so the first samples are the same whatever `num` is (and
    whatever the labels are). Images clip the x_0 prediction to their range [-1, 1] unless
    clip_denoised=False (a pretrained scheduler's clip_sample=False); 2-D points (shape (2,)) are never
    clipped. `labels` (num,) ask a class-conditional model for those classes, with classifier-free
    guidance weight `guidance` (Ho & Salimans 2022, Eq. 6; 0: plain conditional sampling).
    """
    diffusion, steps, ddim = sampling_plan(diffusion, sampler, steps)
    clip = clip_denoised and len(shape) > 1
    if labels is not None and len(labels) != num:
        raise ValueError(f"{len(labels)} labels for {num} samples: give one label per sample")
    if guidance and labels is None:
        raise ValueError("guidance needs labels: classifier-free guidance steers towards a class")
    chunks = []
    for i, start in enumerate(range(0, num, batch_size)):
        batch = (min(batch_size, num - start), *shape)
        kwargs = dict(seed=[seed, i], clip_denoised=clip, progress=progress, guidance=guidance)
        if labels is not None:
            kwargs["model_kwargs"] = {"y": backend.to_active(backend.host.asarray(labels[start:start + batch[0]]))}
        if ddim:
            x = diffusion.ddim_sample_loop(model, batch, num_steps=steps, eta=eta, **kwargs)
        else:
            x = diffusion.p_sample_loop(model, batch, **kwargs)
        chunks.append(backend.to_numpy(x))  # host copy (GPU sync)
    return backend.host.concatenate(chunks)
