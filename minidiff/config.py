"""What a training run is: every knob (`TrainConfig`), the presets, and the model and diffusion they build.

Each knob is a dataclass field made by `option`: its default and its help text, which
cli.py turns into a command-line option (the other commands' configs in cli.py use the
same helper). `build_model` and `build_diffusion` turn a config into the denoiser and the
GaussianDiffusion, for the Trainer and for loading a finished run alike (sampling.py).
May import: backend, schedule, data, diffusion, resample, unet.
"""
import dataclasses
import math
from dataclasses import dataclass, field

from . import backend, data
from .diffusion import (LEARNED_VAR_TYPES, LOSS_TYPES, MEAN_TYPES, SAMPLERS, VAR_TYPES, VLB_WEIGHT, GaussianDiffusion,
                        check_variance_and_loss)
from .resample import TIMESTEP_SAMPLERS
from .schedule import NAMES as BETA_SCHEDULES
from .schedule import get_named_beta_schedule, rescale_zero_terminal_snr
from .unet import MLPDenoiser, UNet


def option(default, help, **extra):
    """A dataclass field that is also a command-line option (cli.py reads its metadata).

    `extra` holds what argparse needs beyond the default's type: choices, nargs and type for
    lists, positional, required. A list or tuple default becomes a fresh tuple per config; a
    function as the default is called whenever a config is created (so an environment
    variable is read then, not at import).
    """
    metadata = {"help": help, **extra}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def backend_option():
    """--backend of every command: $MINIDIFF_BACKEND when set (read when the config is created), else numpy."""
    return option(backend.default_name, "array backend: numpy (CPU) or cupy (NVIDIA GPU) (default: "
                                        "$MINIDIFF_BACKEND when set, else numpy)", choices=backend.NAMES)


FINAL_SAMPLER = "dpm++"   # the final samples.png (and eval): DDPM-1000's confidence at 20 calls (BENCHMARKS.md)


@dataclass
class TrainConfig:
    """Every knob of a training run. The defaults are the "digits" preset (see PRESETS).

    The paper's values (Ho et al. 2020, App. B) are noted where a preset differs: they are
    tuned for 800k steps on a TPU, the presets for minutes on a laptop CPU.
    """

    preset: str = option("digits", "named bundle of defaults: digits (8x8, minutes on a CPU), mnist (32x32, "
                                   "GPU recommended) or toy2d (2-D points, an MLP denoiser)",
                     choices=("digits", "mnist", "toy2d"))
    # --- data
    data: str = option("digits", "bundled set (digits, mnist), 2-D toy (swissroll, 8gaussians, moons, "
                                 "checkerboard) or a PATH (image folder, .npz/.npy, MNIST IDX, CIFAR-10 batches)")
    image_size: int = option(0, "image side in pixels; 0 keeps the data's own (8 for digits, 32 for mnist)")
    hflip: bool = option(False, "random horizontal flips (the paper's CIFAR-10 setting; wrong for digits)")
    # --- model: the U-Net of Ho et al. App. B (or an MLP for 2-D points)
    ch: int = option(32, "base channel count of the U-Net (paper: 128 for CIFAR-10)")
    ch_mult: tuple = option((1, 2), "channel multiplier per resolution; len = number of levels (paper: 1 2 2 2)",
                            nargs="+", type=int)
    num_res_blocks: int = option(1, "residual blocks per resolution (paper: 2)")
    attn_resolutions: tuple = option((4,), "feature-map sides that get self-attention (paper: 16)",
                                     nargs="*", type=int)
    dropout: float = option(0.0, "dropout in the residual blocks (paper: 0.1 on CIFAR-10)")
    mlp_hidden: int = option(128, "hidden width of the MLP denoiser (2-D data only)")
    mlp_layers: int = option(3, "residual layers of the MLP denoiser (2-D data only)")
    conditional: bool = option(False, "class-conditional model on the data's labels, for classifier-free guidance "
                                      "(Ho & Salimans 2022): 'minidiff sample --label 7'")
    p_uncond: float = option(0.1, "with --conditional: probability of training a sample with 'no label' instead "
                                  "of its own (Ho & Salimans: 0.1 or 0.2)")
    guidance: float = option(2.0, "with --conditional: guidance weight w of the sample grids, drawn one row per class")
    # --- diffusion
    schedule: str = option("linear", "beta schedule: linear (paper), quad, cosine or sigmoid", choices=BETA_SCHEDULES)
    num_timesteps: int = option(1000, "T, the number of diffusion steps (paper: 1000)")
    mean_type: str = option("eps", "what the network predicts: eps (paper), x0 or v", choices=MEAN_TYPES)
    zero_terminal_snr: bool = option(False, "rescale the schedule so alpha_bar_T = 0: the last step sees pure noise, "
                                            "as sampling starts from it (Lin et al. 2023); needs --mean-type v")
    var_type: str = option("fixed_large", "reverse variance sigma_t^2: fixed_large (beta_t, the paper's CIFAR-10 "
                                          "setting), fixed_small (beta_tilde_t), or learned by the network (Improved "
                                          "DDPM): learned_range (Eq. 15's interpolation; --learn-sigma) or learned "
                                          "(log sigma^2 itself)", choices=VAR_TYPES)
    loss_type: str = option("mse", "mse (L_simple, Eq. 14), kl (the variational bound, Eq. 5) or hybrid (L_simple + "
                                   "lambda L_vlb, Improved DDPM; needs a learned --var-type)", choices=LOSS_TYPES)
    vlb_weight: float = option(VLB_WEIGHT, "lambda of the hybrid loss L_simple + lambda L_vlb (Improved DDPM: 0.001)")
    timestep_sampler: str = option("uniform", "how Algorithm 1 draws t: uniform (the paper) or importance (p_t ~ "
                                              "sqrt(E[L_t^2]), Improved DDPM Eq. 18, for the kl and hybrid losses)",
                                   choices=TIMESTEP_SAMPLERS)
    # --- optimisation: Adam, linear warmup, clipping, EMA (Algorithm 1, App. B)
    batch_size: int = option(128, "images per step (paper: 128)")
    steps: int = option(2600, "optimizer steps in total (paper: 800k on CIFAR-10)")
    lr: float = option(1e-3, "peak learning rate of Adam (paper: 2e-4)")
    warmup: int = option(100, "steps of linear learning-rate warmup from 0 (paper: 5000)")
    grad_clip: float = option(1.0, "clip gradients to this global norm (paper: 1.0)")
    weight_decay: float = option(0.0, "decoupled weight decay (AdamW); the paper uses none")
    ema_decay: float = option(0.999, "decay of the EMA of the weights used for sampling (paper: 0.9999)")
    ema_warmup: bool = option(True, "ramp the EMA decay as min(decay, (1 + n) / (10 + n)) so early weights fade fast")
    # --- run
    seed: int = option(0, "seed of the weights, the data order, t, the noise and dropout")
    backend: str = backend_option()
    log_every: int = option(1, "write one line of the metrics log every this many steps")
    log_format: str = option("jsonl", "metrics log format: jsonl (metrics.jsonl) or csv (metrics.csv)",
                             choices=("jsonl", "csv"))
    checkpoint_every: int = option(500, "write DIR/checkpoint.safetensors every this many steps (and at the end)")
    sample_every: int = option(500, "write an EMA sample grid DIR/samples/step_N.png every this many steps, "
                                     "drawn with 50 DDIM steps to stay cheap (0: off)")
    num_samples: int = option(64, "images in the final DIR/samples.png (and, up to 64, in the periodic grids)")
    sampler: str = option(FINAL_SAMPLER, "sampler of the final DIR/samples.png: ddpm (Algorithm 2), ddim, dpm++, "
                                         "heun or euler (see 'minidiff sample --help'; the default: docs/CLI.md)",
                          choices=SAMPLERS)
    sample_steps: int = option(0, "reverse steps for the final DIR/samples.png: 0 = the sampler's default (all T for "
                                  "ddpm, 20 for dpm++)")


# Presets: overrides of the defaults above (the "digits" preset is the defaults themselves).
# How the digits values were chosen is written in docs/CLI.md ("The default preset").
PRESETS = {
    "digits": {},
    "mnist": dict(data="mnist", ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                  dropout=0.1, batch_size=128, steps=30000, lr=2e-4, warmup=1000, ema_decay=0.9995,
                  checkpoint_every=2000, sample_every=5000, num_samples=64),
    "toy2d": dict(data="swissroll", batch_size=256, steps=8000, lr=3e-3, warmup=100, ema_decay=0.995,
                  num_samples=2000, checkpoint_every=2000, sample_every=2000),
}


def preset_for(data_name):
    """The preset that suits a data set: toy2d for 2-D points, mnist for MNIST, else digits."""
    if data_name in data.TOY_DATASETS:
        return "toy2d"
    return "mnist" if data_name == "mnist" else "digits"


def make_config(preset=None, **overrides):
    """A TrainConfig from a preset (default: the one that suits overrides["data"]) plus overrides."""
    if preset is None:
        preset = preset_for(overrides.get("data", "digits"))
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **overrides, "preset": preset}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown training options: {', '.join(unknown)}")
    config = TrainConfig(**values)
    validate(config)
    return config


# Upper bounds of what a run may ask for: beyond them a setting is a typo or a hostile file, and
# would hang or allocate before anything else is checked. T and the image side are the checkpoint
# reader's limits (checkpoint.MAX_TIMESTEPS, checkpoint.MAX_IMAGE_SIZE: equal by test_config).
MAX_TIMESTEPS = 100_000
MAX_IMAGE_SIZE = 1024
MAX_WIDTH = 1 << 16        # channels of any one layer: ch * max(ch_mult), mlp_hidden
MAX_LEVELS = 11            # resolutions of a U-Net: 1024 down to 1
MAX_RES_BLOCKS = 64
MAX_MLP_LAYERS = 1024
MAX_BATCH = 1 << 20
MAX_LR = 10.0              # Adam's step is ~lr per weight: above 1 it is always wrong, 10 leaves room to try
MAX_GUIDANCE = 100.0       # beyond it w eps(x) in (1 + w) eps(x, y) - w eps(x) dwarfs the image (Ho & Salimans Eq. 6)


def _check_types(config):
    """Each field holds the type its default has (bool is no int here), so a checkpoint's junk fails by name."""
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, tuple):
            ok = isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        else:
            ok = isinstance(value, str)
        if not ok:
            kind = {bool: "true or false", int: "a whole number", float: "a number", tuple: "a list of whole numbers",
                    str: "a string"}[type(default)]
            raise ValueError(f"{f.name} must be {kind}, got {value!r}")


def validate(config):
    """Raise ValueError with one clear sentence for an impossible configuration: wrong types,
    non-finite numbers, values out of range or beyond what a machine can hold (the MAX_ limits)."""
    _check_types(config)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")
    bounded = {"num_timesteps": MAX_TIMESTEPS, "image_size": MAX_IMAGE_SIZE, "ch": MAX_WIDTH,
               "num_res_blocks": MAX_RES_BLOCKS, "mlp_hidden": MAX_WIDTH, "mlp_layers": MAX_MLP_LAYERS,
               "batch_size": MAX_BATCH, "num_samples": MAX_BATCH}
    for name, limit in bounded.items():
        if getattr(config, name) > limit:
            raise ValueError(f"{name} must be at most {limit:,}, got {getattr(config, name):,}")
    if config.num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2 (the chain needs a noisy step and the decoder's "
                         f"last one), got {config.num_timesteps}")
    if not config.ch_mult or len(config.ch_mult) > MAX_LEVELS or min(config.ch_mult) < 1:
        raise ValueError(f"ch_mult must hold 1 to {MAX_LEVELS} positive multipliers, got {tuple(config.ch_mult)}")
    if config.ch * max(config.ch_mult) > MAX_WIDTH:
        raise ValueError(f"ch_mult must keep every layer within {MAX_WIDTH:,} channels, got ch {config.ch} "
                         f"x {max(config.ch_mult)}")
    if any(r < 1 for r in config.attn_resolutions):
        raise ValueError(f"attn_resolutions must be positive feature-map sides, got {tuple(config.attn_resolutions)}")
    if config.seed < 0:
        raise ValueError(f"seed must be >= 0, got {config.seed}")
    if not config.lr <= MAX_LR:
        raise ValueError(f"lr must be at most {MAX_LR:g} (Adam moves each weight by about lr per step), got {config.lr}")
    if config.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if not -1 <= config.guidance <= MAX_GUIDANCE:
        raise ValueError(f"guidance must lie in [-1, {MAX_GUIDANCE:g}], got {config.guidance}")
    positive = ("batch_size", "steps", "num_timesteps", "num_samples", "log_every", "checkpoint_every", "ch",
                "num_res_blocks", "mlp_hidden", "mlp_layers")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(config, name)}")
    for name in ("warmup", "sample_every", "sample_steps", "image_size"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.sample_steps > config.num_timesteps:
        raise ValueError(f"sample_steps ({config.sample_steps}) cannot exceed num_timesteps ({config.num_timesteps})")
    for name in ("lr", "grad_clip"):
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {config.ema_decay}")
    if not 0 <= config.p_uncond < 1:
        raise ValueError(f"p_uncond must lie in [0, 1) (some labels must be kept), got {config.p_uncond}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {config.dropout}")
    if config.log_format not in ("jsonl", "csv"):
        raise ValueError(f"log_format must be jsonl or csv, got {config.log_format!r}")
    if config.backend not in ("numpy", "cupy"):
        raise ValueError(f'unknown backend {config.backend!r}: use "numpy" or "cupy"')
    if config.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {config.sampler!r}: use one of {', '.join(SAMPLERS)}")
    if config.var_type not in VAR_TYPES or config.loss_type not in LOSS_TYPES or config.mean_type not in MEAN_TYPES:
        check_variance_and_loss(config.mean_type, config.var_type, config.loss_type)   # the unknown name
    if config.loss_type == "hybrid" and config.var_type not in LEARNED_VAR_TYPES:
        raise ValueError(f"loss_type hybrid trains a learned variance, but var_type is {config.var_type}: use "
                         f"--learn-sigma (var_type learned_range, loss_type hybrid), or loss_type mse")
    if config.loss_type == "mse" and config.var_type in LEARNED_VAR_TYPES:
        raise ValueError(f"var_type {config.var_type} is learned, and loss_type mse (L_simple) gives it no gradient: "
                         f"use --learn-sigma (loss_type hybrid) or --loss-type kl")
    if not config.vlb_weight > 0:
        raise ValueError(f"vlb_weight must be positive, got {config.vlb_weight}")
    if config.timestep_sampler not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep_sampler {config.timestep_sampler!r}: use one of "
                         f"{', '.join(TIMESTEP_SAMPLERS)}")
    if config.zero_terminal_snr and config.mean_type == "eps":
        raise ValueError("zero_terminal_snr needs mean_type v (or x0): at alpha_bar_T = 0 an eps model cannot give "
                         "x_0 (Lin et al. 2023 train v); add --mean-type v")
    if config.zero_terminal_snr and config.sampler in ("heun", "euler"):
        raise ValueError(f"sampler {config.sampler} starts at sigma_max, which zero terminal SNR makes infinite: "
                         f"use dpm++ or ddim")


def config_to_dict(config):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(values):
    """A TrainConfig from a checkpoint's JSON (lists back to tuples; unknown keys are an error)."""
    names = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown training options in checkpoint: {', '.join(unknown)}")
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ---------------------------------------------------------------- what a config builds


def check_fits(config, image_size):
    """ValueError unless the U-Net of `config` fits images of side `image_size` (None: 2-D points):
    each of its len(ch_mult) levels halves the side, and every attention resolution must occur."""
    if image_size is None:
        return
    if image_size < 2:
        raise ValueError(f"image_size must be at least 2 pixels for a U-Net, got {image_size}x{image_size} images")
    levels = len(config.ch_mult)
    if image_size % 2 ** (levels - 1):
        most = 1 + max(k for k in range(levels) if image_size % 2 ** k == 0)
        raise ValueError(f"ch_mult has {levels} levels, but {image_size}x{image_size} images can be halved evenly "
                         f"only {most - 1} times: use at most {most} multipliers (or --image-size)")
    sides = [image_size >> k for k in range(levels)]
    missing = sorted(set(config.attn_resolutions) - set(sides))
    if missing:
        raise ValueError(f"attn_resolutions {' '.join(map(str, missing))} never occur: at image size {image_size} "
                         f"with {levels} levels the feature maps are {', '.join(map(str, sides))} pixels wide; "
                         f"choose among those (or none)")


def build_model(config, channels, image_size, num_classes=None):
    """The denoiser a config asks for: the U-Net for images, the MLP for 2-D points (channels=None).

    A conditional config's U-Net gets `num_classes` (the data's) and a label embedding."""
    learned = config.var_type in LEARNED_VAR_TYPES   # the variance takes a second set of output channels
    if channels is None:
        return MLPDenoiser(2, config.mlp_hidden, config.mlp_layers, **({"out_dim": 4} if learned else {}))
    check_fits(config, image_size)
    extra = {"num_classes": num_classes} if config.conditional else {}
    if learned:
        extra["out_channels"] = 2 * channels
    return UNet(image_size=image_size, in_channels=channels, ch=config.ch, ch_mult=tuple(config.ch_mult),
                num_res_blocks=config.num_res_blocks, attn_resolutions=tuple(config.attn_resolutions),
                dropout=config.dropout, **extra)


def build_diffusion(config, num_bins=256):
    """The GaussianDiffusion of a run; `num_bins` is the data's grey levels for the decoder L_0 (Eq. 13)."""
    betas = get_named_beta_schedule(config.schedule, config.num_timesteps)
    if config.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)   # Lin et al. 2023, Algorithm 1
    return GaussianDiffusion(betas, model_mean_type=config.mean_type, model_var_type=config.var_type,
                             loss_type=config.loss_type, num_bins=num_bins, vlb_weight=config.vlb_weight)
