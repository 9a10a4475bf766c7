"""Training: Algorithm 1 of Ho et al. 2020 (arXiv:2006.11239) as a generator of per-step records.

The algorithm itself is `algorithm_1_step`: t, eps and one Adam step on L_simple =
|eps - eps_theta(x_t, t)|^2 (Eq. 14). `train(config, out_dir)` feeds it batches x_0, updates
the EMA of the weights after it, and yields {"step", "loss", "lr", "grad_norm", ...}.
With an `out_dir` it also writes the checkpoint, the metrics log, the loss curve and EMA
sample grids there. Every knob is a commented field of `TrainConfig`; presets bundle them.
With `conditional`, the model is eps_theta(x_t, t, y) on the data's labels, each replaced by
"no label" with probability p_uncond (Ho & Salimans 2022, Algorithm 1), for classifier-free guidance.
Under `mpiexec -n N` (mpi4py installed) the run is data-parallel over N ranks: see distributed.py.
May import: backend, optim, schedule, diffusion, unet, data, images, checkpoint, distributed.
"""
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

from . import backend, checkpoint, data, distributed, images
from .diffusion import LOSS_TYPES, MEAN_TYPES, NO_LABEL, VAR_TYPES, GaussianDiffusion
from .optim import EMA, Adam
from .schedule import NAMES as BETA_SCHEDULES
from .schedule import get_named_beta_schedule
from .unet import MLPDenoiser, UNet

CHECKPOINT = checkpoint.FILENAME  # DIR/checkpoint.safetensors
GRID_STEPS = 50  # DDIM steps for the periodic sample grids: ~20x cheaper than the full chain


def _knob(default, help, **extra):
    """A dataclass field with its help text (read by cli.py to build the argparse options)."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Every knob of a training run. The defaults are the "digits" preset (see PRESETS).

    The paper's values (Ho et al. 2020, App. B) are noted where a preset differs: they are
    tuned for 800k steps on a TPU, the presets for minutes on a laptop CPU.
    """

    preset: str = _knob("digits", "named bundle of defaults: digits (8x8, minutes on a CPU), mnist (32x32, "
                                  "GPU recommended) or toy2d (2-D points, an MLP denoiser)",
                    choices=("digits", "mnist", "toy2d"))
    # --- data
    data: str = _knob("digits", "bundled set (digits, mnist), 2-D toy (swissroll, 8gaussians, moons, "
                                "checkerboard) or a PATH (image folder, .npz/.npy, MNIST IDX, CIFAR-10 batches)")
    image_size: int = _knob(0, "image side in pixels; 0 keeps the data's own (8 for digits, 32 for mnist)")
    hflip: bool = _knob(False, "random horizontal flips (the paper's CIFAR-10 setting; wrong for digits)")
    # --- model: the U-Net of Ho et al. App. B (or an MLP for 2-D points)
    ch: int = _knob(32, "base channel count of the U-Net (paper: 128 for CIFAR-10)")
    ch_mult: tuple = _knob((1, 2), "channel multiplier per resolution; len = number of levels (paper: 1 2 2 2)",
                           nargs="+", type=int)
    num_res_blocks: int = _knob(1, "residual blocks per resolution (paper: 2)")
    attn_resolutions: tuple = _knob((4,), "feature-map sides that get self-attention (paper: 16)",
                                    nargs="*", type=int)
    dropout: float = _knob(0.0, "dropout in the residual blocks (paper: 0.1 on CIFAR-10)")
    mlp_hidden: int = _knob(128, "hidden width of the MLP denoiser (2-D data only)")
    mlp_layers: int = _knob(3, "residual layers of the MLP denoiser (2-D data only)")
    conditional: bool = _knob(False, "class-conditional model on the data's labels, for classifier-free guidance "
                                     "(Ho & Salimans 2022): 'minidiff sample --label 7'")
    p_uncond: float = _knob(0.1, "with --conditional: probability of training a sample with 'no label' instead "
                                 "of its own (Ho & Salimans: 0.1 or 0.2)")
    guidance: float = _knob(2.0, "with --conditional: guidance weight w of the sample grids, drawn one row per class")
    # --- diffusion
    schedule: str = _knob("linear", "beta schedule: linear (paper), quad, cosine or sigmoid", choices=BETA_SCHEDULES)
    num_timesteps: int = _knob(1000, "T, the number of diffusion steps (paper: 1000)")
    mean_type: str = _knob("eps", "what the network predicts: eps (paper), x0 or v", choices=MEAN_TYPES)
    var_type: str = _knob("fixed_large", "reverse variance sigma_t^2: fixed_large (beta_t, the paper's CIFAR-10 "
                                         "setting) or fixed_small (beta_tilde_t)", choices=VAR_TYPES)
    loss_type: str = _knob("mse", "mse (L_simple, Eq. 14) or kl (the variational bound, Eq. 5)", choices=LOSS_TYPES)
    # --- optimisation: Adam, linear warmup, clipping, EMA (Algorithm 1, App. B)
    batch_size: int = _knob(128, "images per step (paper: 128)")
    steps: int = _knob(2600, "optimizer steps in total (paper: 800k on CIFAR-10)")
    lr: float = _knob(1e-3, "peak learning rate of Adam (paper: 2e-4)")
    warmup: int = _knob(100, "steps of linear learning-rate warmup from 0 (paper: 5000)")
    grad_clip: float = _knob(1.0, "clip gradients to this global norm (paper: 1.0)")
    weight_decay: float = _knob(0.0, "decoupled weight decay (AdamW); the paper uses none")
    ema_decay: float = _knob(0.999, "decay of the EMA of the weights used for sampling (paper: 0.9999)")
    ema_warmup: bool = _knob(True, "ramp the EMA decay as min(decay, (1 + n) / (10 + n)) so early weights fade fast")
    # --- run
    seed: int = _knob(0, "seed of the weights, the data order, t, the noise and dropout")
    backend: str = field(default_factory=backend.default_name,  # MINIDIFF_BACKEND when set, read at creation
                         metadata={"help": "array backend: numpy (CPU) or cupy (NVIDIA GPU); default $MINIDIFF_BACKEND "
                                           "or numpy", "choices": backend.NAMES})
    log_every: int = _knob(1, "write one line of the metrics log every this many steps")
    log_format: str = _knob("jsonl", "metrics log format: jsonl (metrics.jsonl) or csv (metrics.csv)",
                            choices=("jsonl", "csv"))
    checkpoint_every: int = _knob(500, "write DIR/checkpoint.safetensors every this many steps (and at the end)")
    sample_every: int = _knob(500, "write an EMA sample grid DIR/samples/step_N.png every this many steps, "
                                    "drawn with 50 DDIM steps to stay cheap (0: off)")
    num_samples: int = _knob(64, "images in the final DIR/samples.png (and, up to 64, in the periodic grids)")
    sample_steps: int = _knob(0, "reverse steps for the final DIR/samples.png: 0 = all T (DDPM, Algorithm 2); "
                                 "K < T uses DDIM with K steps (faster)")


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


def validate(config):
    """Raise ValueError with one clear sentence for an impossible configuration."""
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
    if not config.lr > 0 or not config.grad_clip > 0:
        raise ValueError(f"lr and grad_clip must be positive, got lr={config.lr}, grad_clip={config.grad_clip}")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {config.ema_decay}")
    if not 0 <= config.p_uncond < 1:
        raise ValueError(f"p_uncond must lie in [0, 1) (some labels must be kept), got {config.p_uncond}")
    if not math.isfinite(config.guidance):
        raise ValueError(f"guidance must be a finite number, got {config.guidance}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {config.dropout}")
    if config.log_format not in ("jsonl", "csv"):
        raise ValueError(f"log_format must be jsonl or csv, got {config.log_format!r}")
    if config.backend not in ("numpy", "cupy"):
        raise ValueError(f'unknown backend {config.backend!r}: use "numpy" or "cupy"')


def config_to_dict(config):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(values):
    """A TrainConfig from a checkpoint's JSON (lists back to tuples; unknown keys are an error)."""
    names = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown training options in checkpoint: {', '.join(unknown)}")
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ---------------------------------------------------------------- models


def build_model(config, channels, image_size, num_classes=None):
    """The denoiser a config asks for: the U-Net for images, the MLP for 2-D points (channels=None).

    A conditional config's U-Net gets `num_classes` (the data's) and a label embedding."""
    if channels is None:
        return MLPDenoiser(2, config.mlp_hidden, config.mlp_layers)
    extra = {"num_classes": num_classes} if config.conditional else {}
    return UNet(image_size=image_size, in_channels=channels, ch=config.ch, ch_mult=tuple(config.ch_mult),
                num_res_blocks=config.num_res_blocks, attn_resolutions=tuple(config.attn_resolutions),
                dropout=config.dropout, **extra)


def build_diffusion(config, num_bins=256):
    """The GaussianDiffusion of a run; `num_bins` is the data's grey levels for the decoder L_0 (Eq. 13)."""
    betas = get_named_beta_schedule(config.schedule, config.num_timesteps)
    return GaussianDiffusion(betas, model_mean_type=config.mean_type, model_var_type=config.var_type,
                             loss_type=config.loss_type, num_bins=num_bins)


LABELLED_DATA = ("the bundled digits and mnist, MNIST IDX files with their labels file beside them, CIFAR-10 "
                 "batches, .npz files with a 'labels' array, or an image folder with one subfolder per class")


def load_data(config):
    """Training data as a host float32 array, its labels (None without) and its info dict
    (2-D toys: 20,000 fixed points). A conditional config on data without labels is a DataError."""
    if config.data in data.TOY_DATASETS:
        if config.conditional:
            raise data.DataError(f"--conditional needs labelled images; {config.data!r} is unlabelled 2-D points. "
                                 f"Labelled data: {LABELLED_DATA}")
        points = data.sample_toy(config.data, 20000, rng=backend.host.random.default_rng([config.seed, 7]))
        return points, None, {"name": config.data, "image_size": None, "channels": None, "grey_levels": None,
                              "hflip": False}
    images_, labels, info = data.load_images(config.data, "train", image_size=config.image_size or None)
    if config.conditional and labels is None:
        raise data.DataError(f"--conditional needs labels, and {config.data} has none. Labelled data: "
                             f"{LABELLED_DATA}")
    return images_, labels, info


# ---------------------------------------------------------------- the training run


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient became NaN or infinite: training stops and nothing more is saved."""


def algorithm_1_step(diffusion, model, optimizer, x_start, rng, model_kwargs=None, world=None, step=None):
    """One gradient step of Algorithm 1 (Ho et al. 2020) on a batch x_0 ~ q(x_0) (line 2):

        3: t ~ Uniform({1, ..., T})
        4: eps ~ N(0, I)
        5: take a gradient descent step on grad_theta || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2

    Code t runs over 0 .. T - 1 (the paper's 1 .. T); the loss is L_simple (Eq. 14) or whatever
    `diffusion.loss_type` asks for, and the step is `optimizer`'s (Adam with warmup and clipping).
    Under MPI (`world`) the loss is the global batch's and the gradient is averaged over the ranks.
    Returns (loss, grad_norm) as Python floats; a NaN stops the run before it reaches the weights.
    """
    t = rng.integers(0, diffusion.num_timesteps, (len(x_start),))                     # line 3
    noise = rng.normal(x_start.shape)                                                  # line 4
    loss = diffusion.training_losses(model, x_start, t, noise=noise, model_kwargs=model_kwargs)["loss"].mean()
    value = float(loss.data)   # GPU sync: needed every step to stop on NaN before it reaches the weights
    value = world.global_loss(value) if world is not None else value   # the same on every rank
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss is {value} at step {step}")
    optimizer.zero_grad()
    loss.backward()                                                                    # line 5: the gradient
    if world is not None:
        world.mean_gradients_(optimizer.flat)   # one Allreduce over the flat gradient buffer (N > 1)
    grad_norm = optimizer.step()                                                       # line 5: the step
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(f"gradient norm is {grad_norm} at step {step}")
    return value, grad_norm


class Trainer:
    """Everything a run holds: data stream, model, EMA, optimizer and random streams.

    Its `state_dict` is the whole run, so a resumed run continues bit for bit. With a
    `world` of N > 1 ranks (default: distributed.world(), MPI under mpiexec) this rank
    trains on its share of each global batch, with that share's random numbers, and the
    gradients are averaged over ranks; the state_dict is the same on every rank and
    holds nothing per rank, so any N resumes it.
    """

    def __init__(self, config, world=None):
        validate(config)
        self.world = world or distributed.world()
        self.world.check_batch(config.batch_size)
        backend.use_backend(config.backend)
        self.config = config
        self.data, labels, self.info = load_data(config)
        # int64: NO_LABEL (-1) must fit (an .npz may hold uint8 labels)
        self.labels = labels.astype(backend.host.int64) if config.conditional else None
        self.batches = data.Batches(self.data, config.batch_size, rng=[config.seed, 1], hflip=config.hflip,
                                    labels=self.labels)
        backend.manual_seed(config.seed)   # the default generator: weight init here, dropout masks later
        self.model = build_model(config, self.info["channels"], self.info["image_size"], self.num_classes)
        # Each rank keeps its rows of every global draw (dropout masks here, t and eps below).
        backend.set_default_generator(self.world.sharded(backend.default_generator()))
        self.model.train()
        self.diffusion = build_diffusion(config)
        self.optimizer = Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                              warmup_steps=config.warmup, grad_clip=config.grad_clip)
        self.ema = EMA(self.model, decay=config.ema_decay)
        self.rng = self.world.sharded(backend.Generator([config.seed, 2]))   # t and eps of Algorithm 1
        self.step = 0
        self.stop = False   # MPI: set when some rank asked to stop after the current step

    @property
    def num_classes(self):
        """K of a conditional run (the data's labels 0 .. K-1), else None."""
        return self.info.get("num_classes") if self.config.conditional else None

    def grid_width(self, num):
        """Images per grid row: one row per class for a conditional run's `num` samples, else square."""
        return None if self.num_classes is None else num // self.num_classes

    def train_step(self):
        """One step of Algorithm 1 (algorithm_1_step) and the run's bookkeeping; returns (loss, grad_norm, lr)."""
        cfg, world = self.config, self.world
        batch = next(self.batches)                                     # line 2: x_0 ~ q(x_0), this rank's rows
        x_start = backend.to_active(world.shard(batch[0] if self.labels is not None else batch))
        kwargs = None
        if self.labels is not None:   # Ho & Salimans, Algorithm 1: c <- no label with probability p_uncond
            y = backend.to_active(world.shard(batch[1]))
            drop = self.rng.uniform((len(x_start),)) < cfg.p_uncond   # per sample, like t and eps (any rank count)
            kwargs = {"y": backend.xp_of(y).where(drop, NO_LABEL, y)}
        lr = self.optimizer.current_lr()
        loss, grad_norm = algorithm_1_step(self.diffusion, self.model, self.optimizer, x_start, self.rng,
                                           model_kwargs=kwargs, world=world, step=self.step + 1)
        self.stop = world.stop_agreed   # MPI: some rank asked to stop (Ctrl-C); all stop after this same step
        if cfg.ema_warmup:   # early on, average over the ~n steps taken so far instead of the init weights
            self.ema.decay = min(cfg.ema_decay, (1 + self.ema.num_updates) / (10 + self.ema.num_updates))
        self.ema.update(self.model)
        self.step += 1
        return loss, grad_norm, lr

    def state_dict(self):
        return {
            "format": "minidiff-train", "step": self.step, "config": config_to_dict(self.config),
            "data_info": self.info, "model_config": self.model.config,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": {"train": self.rng.get_state(), "default": backend.default_generator().get_state(),
                    "batches": self.batches.state_dict()},
        }

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"]["train"])
        backend.default_generator().set_state(state["rng"]["default"])
        self.batches.load_state_dict(state["rng"]["batches"])
        self.step = int(state["step"])

    def save(self, path):
        checkpoint.save(path, self.state_dict())

    def replicated_arrays(self):
        """The arrays every MPI rank must hold bit for bit: weights, Adam's moments, the EMA."""
        opt = self.optimizer
        return [opt.flat.data, opt.flat_exp_avg, opt.flat_exp_avg_sq, self.ema.flat_shadow]

    def sample(self, num, seed, steps=0, progress=False):
        """`num` samples from the EMA weights, with their own seed (the training streams are untouched).

        steps 0 runs all T steps of Algorithm 2; fewer run DDIM (sampling_plan's policy). A conditional
        run draws num // K of every class in label order (a grid row per class when num // K is its
        width), guided with config.guidance."""
        shape = (2,) if self.info["channels"] is None else (
            self.info["channels"], self.info["image_size"], self.info["image_size"])
        labels = None if self.num_classes is None else every_class(self.num_classes, num)
        with self.ema.swapped(self.model):
            self.model.eval()
            try:
                return draw_samples(self.diffusion, self.model, shape, len(labels) if labels is not None else num,
                                    seed, steps=steps, progress=progress, labels=labels,
                                    guidance=self.config.guidance if labels is not None else 0.0)
            finally:
                self.model.train()


SAMPLERS = ("ddpm", "ddim")


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


def train(config, out_dir=None, resume=False, progress=False, world=None):
    """Run Algorithm 1 and yield one record per step: {"step", "loss", "lr", "grad_norm", "time", ...}.

    With `out_dir`: resume from DIR/checkpoint.safetensors if `resume`; write the checkpoint
    every `checkpoint_every` steps and at the end (atomically), the metrics log, loss.png and
    sample grids; after the last record, DIR/samples.png (`progress` shows its sampling bar).
    A record also carries "checkpoint" or "samples" (a path) on the steps that wrote one.
    Closing the generator early (Ctrl-C in the CLI) saves a checkpoint of the last finished
    step. A NaN loss raises TrainingDiverged and leaves the last good checkpoint in place.

    Under MPI (`world`, default distributed.world()) every rank runs this; rank 0 alone reads
    the checkpoint to resume (and sends it to the others) and writes files. At each checkpoint
    the ranks compare a checksum of their weights. An error on one rank ends every rank
    (MPI_Abort) with a message naming it; the last checkpoint stays valid. A record carries
    "stop" when some rank asked to stop (distributed.World.stop_requested) after this step.
    """
    trainer = Trainer(config, world)
    world = trainer.world
    write = out_dir is not None and world.is_root   # rank 0 alone writes files
    start = 0
    if out_dir is not None:
        ckpt_path = os.path.join(out_dir, CHECKPOINT)
        if write:
            os.makedirs(out_dir, exist_ok=True)
        if resume:
            state = world.from_root(lambda: checkpoint.load(ckpt_path))   # rank 0's file, sent to every rank
            check_resumable(state, config)
            trainer.load_state_dict(state)
            start = trainer.step
        if write:
            log = MetricsLog(out_dir, config.log_format, keep_until=start)
    saved_step = start

    def failure():   # what rank 0 adds when some rank fails (MPI only)
        kept = f"the last checkpoint (step {saved_step}) in {out_dir} is intact" if out_dir is not None and \
            saved_step else "no checkpoint was written yet"
        return (f"all {world.size} ranks are stopped (MPI_Abort) at step {trainer.step + 1}; {kept}"
                + (f"; continue with 'minidiff train --out {out_dir} --resume'" if saved_step else ""))

    began = time.perf_counter()
    try:
        while trainer.step < config.steps:
            try:
                loss, grad_norm, lr = trainer.train_step()
            except TrainingDiverged as err:
                where = f"; the last good checkpoint (step {saved_step}) is kept in {out_dir}" if out_dir else ""
                raise TrainingDiverged(f"{err}: training stopped{where}. Try a lower --lr") from None
            step = trainer.step
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "time": time.perf_counter() - began}
            if write:
                if step % config.log_every == 0 or step == config.steps:
                    log.write(record)
                if config.sample_every and step % config.sample_every == 0 and step < config.steps:
                    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
                    path = os.path.join(out_dir, "samples", f"step_{step:07d}.png")
                    grid = trainer.sample(min(config.num_samples, 64), seed=config.seed,
                                          steps=min(GRID_STEPS, config.num_timesteps - 1))
                    _save_picture(grid, path, trainer.data, trainer.grid_width(len(grid)))
                    record["samples"] = path
            if out_dir is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                world.check_replicas(trainer.replicated_arrays(), step)   # every rank (MPI only)
                if write:
                    trainer.save(ckpt_path)
                    log.flush()
                    log.plot(os.path.join(out_dir, "loss.png"))
                saved_step = step
                record["checkpoint"] = ckpt_path
            if trainer.stop:
                record["stop"] = True
            yield record
    except GeneratorExit:  # the consumer stopped early (Ctrl-C): the last step is complete, save it
        if write and trainer.step > saved_step:
            trainer.save(ckpt_path)
            log.flush()
            log.plot(os.path.join(out_dir, "loss.png"))
        raise
    except (TrainingDiverged, distributed.DistributedError):   # raised by every rank together
        raise
    except (Exception, KeyboardInterrupt) as err:   # MPI: one rank failed; rank 0 reports it, all ranks end
        world.fail(err, failure())
        raise
    finally:
        if write:
            log.close()
    if write:  # the final grid, drawn once the last step's record is out
        samples = trainer.sample(config.num_samples, seed=config.seed, steps=config.sample_steps, progress=progress)
        _save_picture(samples, os.path.join(out_dir, "samples.png"), trainer.data, trainer.grid_width(len(samples)))


def check_resumable(state, config):
    """Refuse to resume with a changed model, data or recipe (only step counts and outputs may change)."""
    saved = state["config"]
    free = {"steps", "backend", "log_every", "checkpoint_every", "sample_every", "num_samples", "sample_steps",
            "log_format", "guidance"}
    now = config_to_dict(config)
    defaults = config_to_dict(TrainConfig())   # a checkpoint older than an option ran with its default
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    changed = [f"{k} ({saved.get(k)!r} -> {now[k]!r})" for k in now if k not in free and saved.get(k) != now[k]]
    if changed:
        raise ValueError(f"cannot resume with a different configuration: {', '.join(changed)}")
    if state["step"] >= config.steps:
        raise ValueError(f"the checkpoint has already trained {state['step']} steps; pass --steps above that to continue")


def _save_picture(samples, path, data_points=None, nrow=None):
    """A grid for images (`nrow` per row), a scatter plot (against the data) for 2-D points."""
    if samples.ndim == 2:
        reference = data_points[:len(samples)] if data_points is not None else samples
        images.scatter_2d([reference, samples], path, titles=["data", "samples"])
    else:
        images.save_grid(samples, path, nrow=nrow)


class MetricsLog:
    """The per-step metrics file (JSON lines or CSV) and the loss curve drawn from it.

    On resume the lines after the checkpoint's step are dropped: those steps run again.
    """

    FIELDS = ("step", "loss", "lr", "grad_norm", "time")

    def __init__(self, out_dir, fmt, keep_until=0):
        self.path = os.path.join(out_dir, "metrics." + fmt)
        self.fmt = fmt
        self.steps, self.losses = [], []
        kept = []
        if keep_until and os.path.exists(self.path):
            for row in read_metrics(self.path):
                if row["step"] <= keep_until:
                    kept.append(row)
        self.file = open(self.path, "w")
        if fmt == "csv":
            self.file.write(",".join(self.FIELDS) + "\n")
        for row in kept:
            self.write(row)

    def write(self, record):
        row = {k: record[k] for k in self.FIELDS}
        if self.fmt == "csv":
            self.file.write(",".join(repr(row[k]) for k in self.FIELDS) + "\n")
        else:
            self.file.write(json.dumps(row) + "\n")
        self.steps.append(row["step"])
        self.losses.append(row["loss"])

    def flush(self):
        self.file.flush()

    def plot(self, path):
        if self.steps:
            images.plot_curve(self.steps, self.losses, path, title="training loss (L_simple)", log_y=True)

    def close(self):
        self.file.close()


def read_metrics(path):
    """The rows of a metrics.jsonl or metrics.csv file as dicts of numbers."""
    rows = []
    with open(path) as f:
        if path.endswith(".csv"):
            header = f.readline().strip().split(",")
            for line in f:
                if line.strip():
                    rows.append({k: float(v) if k != "step" else int(v) for k, v in zip(header, line.strip().split(","))})
        else:
            rows = [json.loads(line) for line in f if line.strip()]
    return rows


# ---------------------------------------------------------------- using a trained model


def load_model(path, use_ema=True):
    """(model, diffusion, config, info) from a checkpoint file or run folder, ready to sample.

    `use_ema` loads the EMA weights (the paper samples from them) instead of the live ones.
    """
    state = checkpoint.load(path)
    if state.get("format") != "minidiff-train":
        raise checkpoint.CheckpointError(f"{checkpoint.resolve(path)}: not a minidiff training checkpoint")
    config = config_from_dict(state["config"])
    info = state["data_info"]
    model = build_model(config, info["channels"], info["image_size"], info.get("num_classes"))
    if use_ema:
        shadow = {k[len("shadow."):]: v for k, v in state["ema"].items() if k.startswith("shadow.")}
        model.load_state_dict(shadow)
    else:
        model.load_state_dict(state["model"])
    model.eval()
    return model, build_diffusion(config), config, info
