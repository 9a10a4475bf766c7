"""The `minidiff` command line: train, sample, forward, interpolate, eval, convert.

Each subcommand's options come from a dataclass (config.TrainConfig, the others below):
one field made by config.option, one option, its help text in the field's metadata. Bad arguments
print one line on stderr and exit with code 2 before anything is written.
May import: every minidiff module.
"""
import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

from . import __version__, backend, checkpoint, data, distributed, explainer, images, inception, kernels, metrics, pretrained, sampling
from . import train as training
from .kernels import tuning as kernel_tuning
from .checkpoint import CheckpointError
from .config import (FINAL_SAMPLER, MAX_GUIDANCE, TrainConfig, backend_option, build_diffusion, check_fits,
                     config_from_dict, make_config, option, validate)
from .data import DataError
from .schedule import SPACINGS, get_named_beta_schedule

EXIT_USAGE = 2         # bad arguments, missing or corrupt inputs (argparse's own code)
EXIT_INTERRUPTED = 130  # Ctrl-C, after the checkpoint was saved (128 + SIGINT; SIGTERM 143, SIGHUP 129)


class UsageError(Exception):
    """A bad argument or input: reported as one line on stderr with exit code 2."""


# ---------------------------------------------------------------- the subcommands' configs


LABEL_HELP = ("class-conditional model (trained with --conditional): the class to draw, 0 .. K-1, or 'all' for "
              "the same number of every class (one grid row per class). Without it such a model samples "
              "unconditionally")
GUIDANCE_HELP = ("with --label: classifier-free guidance weight w, eps = (1 + w) eps(x, label) - w eps(x) (Ho & "
                 "Salimans 2022, Eq. 6); 0 is plain conditional sampling, larger w gives more typical, less varied "
                 "images (default 2; see BENCHMARKS.md)")
DEFAULT_GUIDANCE = 2.0
SAMPLER_HELP = ("ddpm: ancestral sampling (Algorithm 2); ddim: Song et al. 2021; dpm++: DPM-Solver++ (Lu et al. "
                "2022); heun, euler: the Karras et al. 2022 ODE sampler (heun's N steps cost 2N - 1 network calls). "
                "Default: ddpm with all T steps, ddim when --steps asks for fewer (docs/CLI.md compares them)")
EVAL_SAMPLER_HELP = SAMPLER_HELP.split(". Default:")[0] + (". Default: dpm++ with 20 steps (the final samples.png's "
                                                          "sampler: BENCHMARKS.md), ddim when --steps is given")
ORDER_HELP = "dpm++ only: the solver's order, 1 (= DDIM), 2 (default) or 3"
SPACING_HELP = ("ddim and dpm++ only: where the steps go, as diffusers names them: leading (ddim's default), "
                "trailing or linspace (dpm++'s default)")
STEPS_HELP = ("reverse steps: 0 means each sampler's default (ddpm all T, ddim 50, dpm++ 20, heun 10, euler 20); "
              "fewer than T run ddim unless --sampler says otherwise; --sampler ddpm respaces the ancestral chain "
              "(Nichol & Dhariwal 2021)")
PRETRAINED_HELP = ("a diffusers DDPM folder instead of --checkpoint, e.g. one of the paper's models fetched with "
                   "'hf download google/ddpm-cifar10-32 --local-dir DIR'")


@dataclass
class SampleConfig:
    checkpoint: str = option(None, "checkpoint file or run folder (DIR means DIR/checkpoint.safetensors)")
    pretrained: str = option(None, PRETRAINED_HELP)
    num: int = option(64, "number of samples (with --label all: num // K of each of the K classes)")
    out: str = option("samples.png", ".png writes a grid; .npz writes arr_0, uint8 (N, H, W, C), for FID tools, "
                                     "and with --label the labels as arr_1")
    label: str = option(None, LABEL_HELP)
    guidance: float = option(None, GUIDANCE_HELP, type=float)
    sampler: str = option(None, SAMPLER_HELP, choices=sampling.SAMPLERS)
    steps: int = option(0, STEPS_HELP)
    order: int = option(None, ORDER_HELP, type=int, choices=sampling.ORDERS)
    spacing: str = option(None, SPACING_HELP, choices=SPACINGS)
    eta: float = option(0.0, "DDIM noise: 0 is deterministic, 1 is DDPM-like")
    ema: bool = option(True, "sample from the EMA weights (the paper's choice) or, with --no-ema, the live ones")
    progressive: bool = option(False, "write the x_0 predictions along the chain as a strip (Fig. 6) instead of a grid")
    frames: int = option(10, "columns of the --progressive strip")
    batch_size: int = option(256, "images per sampling batch (memory)")
    seed: int = option(0, "seed of the noise")
    backend: str = backend_option()


@dataclass
class ForwardConfig:
    image: str = option(None, "an image file, or 'mondrian' for a procedural picture (default without --checkpoint)",
                        positional=True)
    steps: int = option(30, "frames after the first one, evenly spaced over the T = 1000 steps "
                            "(.html: where its slider starts, 10 .. 50 in steps of 5)")
    beta_scale: float = option(1.0, "multiply the paper's betas (1e-4 .. 0.02) by this: the noise strength "
                                    "(.html: where its slider starts, 0.3 .. 1.5 in steps of 0.1)")
    out: str = option("forward.png", ".png writes a filmstrip, .gif an animation, .html a page with sliders "
                                     "(direction, steps, noise scale) that works offline")
    checkpoint: str = option(None, "show the reverse process of this model instead: noise becoming images")
    num: int = option(4, "images (rows) for --checkpoint")
    image_size: int = option(0, "side of the picture for an IMAGE file or mondrian; 0 means 64 (32 for .html, "
                                "which holds every frame of 13 chains)")
    ema: bool = option(True, "with --checkpoint: use the EMA weights")
    seed: int = option(0, "seed of the noise (and of the mondrian picture)")
    backend: str = backend_option()


@dataclass
class InterpolateConfig:
    checkpoint: str = option(None, "checkpoint file or run folder")
    pretrained: str = option(None, PRETRAINED_HELP + "; needs --data")
    t: int = option(None, "timestep at which the two images are mixed (0 .. T-1); larger t, freer interpolation "
                          "but less of the sources kept. Default per image size: T/4 (250) for images of 16 pixels "
                          "or fewer a side (at 500 an 8x8 digit is erased), T/2 (500, the paper's Fig. 8) for larger",
                    type=int)
    pairs: int = option(4, "pairs of held-out images (rows)")
    lambdas: int = option(9, "mixing weights from 0 to 1 (columns between the two sources)")
    data: str = option(None, "images to interpolate: default the checkpoint's data set (its held-out split); "
                             "with --pretrained, a folder, .npz or CIFAR-10 batch (resized to the model's size)")
    out: str = option("interpolate.png", ".png picture")
    label: str = option(None, "class-conditional model: decode every pair as this class (0 .. K-1); without it the "
                              "decoding is unconditional")
    sampler: str = option("ddpm", "the decoder from t: ddpm (Algorithm 2 from step t, the paper's Fig. 8) or a "
                                  "deterministic one, ddim, dpm++, heun or euler, on the chain's first t + 1 steps",
                          choices=sampling.SAMPLERS)
    steps: int = option(0, "decoder steps from t to 0 (0: all t + 1 for ddpm, the sampler's default otherwise)")
    order: int = option(None, "dpm++ only: 1, 2 (default) or 3", type=int, choices=sampling.ORDERS)
    spacing: str = option(None, "ddim and dpm++ only: trailing (default here: the first step is t itself) or "
                                "linspace", choices=SPACINGS)
    guidance: float = option(None, GUIDANCE_HELP, type=float)
    ema: bool = option(True, "use the EMA weights")
    seed: int = option(0, "seed of the pairs and the noise")
    backend: str = backend_option()


@dataclass
class EvalConfig:
    checkpoint: str = option(None, "checkpoint file or run folder: draw --num samples from its model and score them")
    samples: str = option(None, "score these samples instead of drawing them: a .npz whose arr_0 holds uint8 "
                                "(N, H, W, C) images, as 'minidiff sample --out x.npz' writes, from any model "
                                "((N, 2) points for 2-D data); its arr_1, if any, the labels they were drawn for")
    data: str = option(None, "reference data set: digits, mnist or a 2-D toy set; default the checkpoint's, needed "
                             "with --samples and no --checkpoint (with --bpd also an image PATH)")
    num: int = option(None, "samples to draw (default 1000); with --samples, score the first N of the file "
                            "(default all)", type=int)
    sampler: str = option(None, EVAL_SAMPLER_HELP, choices=sampling.SAMPLERS)
    steps: int = option(0, STEPS_HELP)
    order: int = option(None, ORDER_HELP, type=int, choices=sampling.ORDERS)
    spacing: str = option(None, SPACING_HELP, choices=SPACINGS)
    eta: float = option(0.0, "DDIM noise: 0 is deterministic, 1 is DDPM-like")
    label: str = option(None, LABEL_HELP + "; the report adds how often minidiff's classifier agrees with the label, "
                                           "per class (--samples: read from the file's arr_1)")
    guidance: float = option(None, GUIDANCE_HELP, type=float)
    ema: bool = option(True, "use the EMA weights (the paper's choice) or, with --no-ema, the live ones")
    metrics: bool = option(True, "sample-quality metrics (Frechet distance, precision/recall, class coverage, "
                                 "confidence, memorisation; 2-D: energy distance, sliced Wasserstein)")
    bpd: bool = option(False, "also bits/dim of the variational bound on --split (Table 2; needs --checkpoint; slow: "
                              "T network calls per batch); --bpd --no-metrics skips sampling")
    split: str = option("heldout", "with --bpd: which split of the data: heldout (never trained on), train or all",
                        choices=("heldout", "train", "all"))
    bpd_num: int = option(0, "with --bpd: score at most this many images (0: the whole split)")
    inception: str = option(None, "also FID, KID and IS in the FID Inception's feature space (the field's "
                                  "yardstick): pytorch-fid's weights file pt_inception-2015-12-05-6726825d.pth; "
                                  "needs --ref")
    ref: str = option(None, "with --inception: the real data to compare with, a stats .npz of mu and sigma (from "
                            "'minidiff fid-stats' or pytorch-fid; FID only) or a data set / image PATH (FID, KID, "
                            "precision/recall and the data's own IS)")
    batch_size: int = option(256, "images per sampling or bits/dim batch (memory)")
    out: str = option(None, "also write the report as JSON to this file")
    seed: int = option(0, "seed of the sampling noise (the same samples as 'minidiff sample' with equal options), "
                          "of the floor's draws and of the bound's Monte Carlo terms")
    backend: str = backend_option()


@dataclass
class FidStatsConfig:
    data: str = option(None, "the real images: a bundled set (digits, mnist) or a PATH minidiff loads (an image "
                             "folder, .npz/.npy, MNIST IDX, a CIFAR-10 batch or its cifar-10-batches-py folder)",
                       required=True)
    inception: str = option(None, "pytorch-fid's Inception weights, pt_inception-2015-12-05-6726825d.pth",
                            required=True)
    out: str = option(None, "the statistics file to write (.npz with mu and sigma, pytorch-fid's format)",
                      required=True)
    split: str = option("all", "which split of --data: all (the FID convention: CIFAR-10's whole training set), "
                               "train or heldout (minidiff's seeded 90/10 split)", choices=("heldout", "train", "all"))
    num: int = option(0, "use at most this many images (0: all)")
    batch_size: int = option(50, "images per Inception batch (memory: about 60 MB each on the CPU)")
    backend: str = backend_option()


@dataclass
class ConvertConfig:
    pretrained: str = option(None, "the diffusers DDPM folder to convert (flat, or model_index.json with unet/ and "
                                   "scheduler/)", required=True)
    out: str = option(None, "the minidiff checkpoint to write (.safetensors); sample from it with --checkpoint",
                      required=True)


@dataclass
class ExportConfig:
    checkpoint: str = option(None, "the minidiff run folder or checkpoint file to export (or a converted model)",
                             required=True)
    out: str = option(None, "the diffusers pipeline folder to write (DDPMPipeline.from_pretrained(DIR) loads it)",
                      required=True)
    raw: bool = option(False, "export the trained weights instead of their EMA (the paper samples from the EMA)")
    force: bool = option(False, "replace --out if it holds an earlier export (nothing else is ever replaced)")
    license: str = option(None, "the model card's licence (a Hub licence id); default: the bundled data's "
                                "(digits cc-by-4.0, mnist cc-by-sa-3.0), else 'other'")
    report: str = option(None, "a 'minidiff eval --out' JSON report whose figures go into the model card")
    backend: str = backend_option()


# ---------------------------------------------------------------- building the parser


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage dump) through UsageError."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message}")


def _add_options(parser, config_cls, suppress=False):
    """One option per dataclass field: --name-with-dashes, its type, default and help.

    suppress=True leaves options that were not given out of the namespace (train uses it
    to tell the user's choices from the preset's defaults).
    """
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        stated = default is None or "(default" in meta["help"]   # a help that states its default says it once
        kwargs = {"help": meta["help"] + ("" if stated else f" (default: {shown})")}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "nargs" in meta:
            kwargs.update(nargs=meta["nargs"], type=meta["type"])
        else:
            kwargs["type"] = meta.get("type") or (type(default) if default is not None else str)
        if kwargs.get("type") in (int, float) and "choices" not in kwargs:
            kwargs["metavar"] = "N" if kwargs["type"] is int else "X"
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="?", default=default, **kwargs)
            continue
        if meta.get("required"):
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS if suppress else default
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


EXAMPLES = {
    "train": "examples:\n  minidiff train                          # bundled 8x8 digits, a few minutes on a CPU\n"
             "  minidiff train --conditional --out runs/digits-cond   # class-conditional, for --label 7\n"
             "  minidiff train --data mnist --backend cupy        # writes runs/mnist\n"
             "  minidiff train --data swissroll --out toy-run     # --out: a new folder in an existing one\n"
             "  minidiff train --out runs/digits --resume --steps 8000\n"
             "  minidiff train --learn-sigma --out runs/digits-iddpm   # Improved DDPM's learned variance",
    "sample": "examples:\n  minidiff sample --checkpoint runs/digits --num 64 --out samples.png\n"
              "  minidiff sample --checkpoint runs/digits --num 1000 --sampler ddim --steps 50 --out samples.npz\n"
              "  minidiff sample --checkpoint runs/digits --num 8 --progressive --out fig6.png\n"
              "  minidiff sample --checkpoint runs/digits-cond --label 7 --guidance 2 --out sevens.png\n"
              "  minidiff sample --checkpoint runs/digits-cond --label all --num 100 --out grid.png\n"
              "  minidiff sample --pretrained ddpm-cifar10-32 --sampler ddim --steps 50 --num 16   # the paper's model",
    "forward": "examples:\n  minidiff forward mondrian --steps 10 --out forward.png\n"
               "  minidiff forward photo.jpg --beta-scale 0.5 --out forward.gif\n"
               "  minidiff forward --checkpoint runs/digits --num 8 --out reverse.gif\n"
               "  minidiff forward mondrian --out explainer.html      (open it in a browser)\n"
               "  minidiff forward --checkpoint runs/digits --out explainer.html",
    "interpolate": "examples:\n  minidiff interpolate --checkpoint runs/digits --out interpolate.png   # at t = 250 for 8x8\n"
                   "  minidiff interpolate --checkpoint runs/digits --t 100 --out close.png   # nearer the sources\n"
                   "  minidiff interpolate --pretrained ddpm-cifar10-32 --data cifar-10-batches-py/test_batch",
    "convert": "example:\n  minidiff convert --pretrained ddpm-cifar10-32 --out cifar10.safetensors\n"
               "  minidiff sample --checkpoint cifar10.safetensors --sampler ddim --steps 50 --num 16",
    "eval": "examples (times for the default digits model on a 2-core CPU):\n"
            "  minidiff eval --checkpoint runs/digits --out report.json   # 1000 samples by DPM-Solver++ in 20 steps, "
            "all metrics: about 10 s\n"
            "  minidiff eval --checkpoint runs/digits --sampler ddim --steps 50 --num 1000   # about 20 s\n"
            "  minidiff eval --checkpoint runs/digits --sampler ddpm   # all 1000 steps (Algorithm 2): about 4 min\n"
            "  minidiff eval --samples other_model.npz --data digits --out other.json\n"
            "  minidiff eval --checkpoint runs/digits-cond --label all --guidance 2 --sampler ddim --steps 50\n"
            "  minidiff eval --checkpoint runs/digits --bpd --no-metrics   # bits/dim only (Table 2): T calls per batch, "
            "minutes\n"
            "  minidiff eval --samples s.npz --inception pt_inception.pth --ref cifar10_train.npz   # FID\n"
            "  minidiff eval --samples s.npz --inception pt_inception.pth --ref cifar-10-batches-py  # FID, KID, IS",
    "export": "examples:\n  minidiff export --checkpoint runs/digits --out digits-ddpm   # EMA weights, model card\n"
              "  minidiff eval --checkpoint runs/digits --out report.json && minidiff export --checkpoint "
              "runs/digits --out digits-ddpm --report report.json --force\n"
              "  python -c \"from diffusers import DDPMPipeline; DDPMPipeline.from_pretrained('digits-ddpm')\"",
    "fid-stats": "example:\n  minidiff fid-stats --data cifar-10-batches-py --inception pt_inception-2015-12-05-6726825d.pth "
                 "--out cifar10_train.npz\n  minidiff eval --samples s.npz --inception pt_inception-2015-12-05-6726825d.pth "
                 "--ref cifar10_train.npz",
}


def build_parser():
    parser = _Parser(prog="minidiff", description="Denoising diffusion probabilistic models (Ho et al. 2020) "
                     "from scratch on NumPy, or CuPy on a GPU.",
                     epilog="Run 'minidiff COMMAND --help' for a command's options. Start with: minidiff train")
    parser.add_argument("--version", action="version", version=f"minidiff {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name, help):
        return commands.add_parser(name, help=help, description=help, epilog=EXAMPLES[name],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("train", "train a model (Algorithm 1); writes checkpoint, metrics, loss curve and samples to --out")
    p.add_argument("--out", default=None, metavar="DIR", help="run folder, created (with its parents) if missing (default: runs/DATA)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    p.add_argument("--learn-sigma", action="store_true",
                   help="learn the reverse variance (Improved DDPM): --var-type learned_range --loss-type hybrid, "
                        "with --vlb-weight (lambda) and optionally --timestep-sampler importance")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    _add_options(p, TrainConfig, suppress=True)
    p.set_defaults(run=cmd_train)
    for name, cls, fn, help in (
            ("sample", SampleConfig, cmd_sample, "draw samples from a trained model (Algorithm 2 or DDIM)"),
            ("forward", ForwardConfig, cmd_forward, "watch the forward process destroy an image "
                                                    "(or, with --checkpoint, the reverse process create one)"),
            ("interpolate", InterpolateConfig, cmd_interpolate, "interpolate between held-out images in "
                                                                "latent space (Fig. 8)"),
            ("eval", EvalConfig, cmd_eval, "score a model's samples (or a .npz of anyone's) against held-out "
                                            "data; --bpd adds bits/dim (Table 2)"),
            ("convert", ConvertConfig, cmd_convert, "convert a diffusers DDPM folder (the paper's own models) to "
                                                    "one minidiff checkpoint file"),
            ("export", ExportConfig, cmd_export, "export a trained model to a diffusers pipeline folder "
                                                 "(DDPMPipeline) with a model card"),
            ("fid-stats", FidStatsConfig, cmd_fid_stats, "Inception statistics (mu, sigma) of real images for FID, "
                                                          "in pytorch-fid's .npz format")):
        p = add(name, help)
        _add_options(p, cls)
        p.set_defaults(run=fn, config_cls=cls)
    return parser


def main(argv=None):
    """Entry point of `minidiff` and `python -m minidiff`; returns the exit code."""
    parser, args = build_parser(), None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        kernels.mode()   # an unknown MINIDIFF_KERNELS is reported before any work starts
        kernel_tuning.check()   # as is a bad MINIDIFF_TUNING
        return args.run(args) or 0
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except (UsageError, CheckpointError, DataError, backend.BackendError, kernels.KernelsError,
            kernel_tuning.TuningError) as err:
        message = str(err)
        if not message.startswith("minidiff"):
            message = f"minidiff {getattr(args, 'command', '') or ''}: error: {message}".replace("  ", " ")
        _print_on_root(message)
        return EXIT_USAGE
    except (training.TrainingDiverged, distributed.DistributedError) as err:
        _print_on_root(f"minidiff train: error: {err}")
        return 1
    except OSError as err:   # the machine, not the arguments: a full disk, a read-only folder, a file in the way
        _print_on_root(f"minidiff {getattr(args, 'command', '') or ''}: error: {_os_error(err)}".replace("  ", " "))
        return EXIT_USAGE
    except MemoryError:
        _print_on_root(f"minidiff {getattr(args, 'command', '') or ''}: error: out of memory; files written "
                       f"earlier are intact: use a smaller --batch-size (or --num), or a machine with more memory")
        return EXIT_USAGE


# What to do about an OSError, by errno: the machine's state, which no argument can fix.
OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space, or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space, or write elsewhere",
    errno.EFBIG: "the file is larger than this system allows (ulimit -f): raise the limit, or write elsewhere",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you may write to, or fix its permissions",
    errno.EPERM: "the operation is not permitted: choose a folder you may write to",
    errno.EISDIR: "a folder stands where a file must go: remove it or choose another name",
    errno.ENOTDIR: "a file stands where a folder must go: remove it or choose another name",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EIO: "the disk reported an input/output error: check the device",
}


def _os_error(err):
    """One line for an OSError: which file, what happened, that earlier results are intact, what to do."""
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    what = err.strerror or str(err) or type(err).__name__
    advice = OS_ADVICE.get(err.errno, "check the file and the disk, then run again")
    return (f"{where + ': ' if where else ''}{what}; files written before (checkpoints, metrics, pictures) are "
            f"intact: {advice}")


def _print_on_root(message):
    """Errors that every MPI rank raises together are printed once, by rank 0."""
    if distributed.is_root():
        print(message, file=sys.stderr)


# ---------------------------------------------------------------- shared checks and helpers


def _config(args):
    """The subcommand's config dataclass from the parsed options."""
    cls = args.config_cls
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _positive(**counts):
    for name, value in counts.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


FORWARD_T = 1000       # the forward demo's T: the paper's linear schedule


def _check_sampling(cfg):
    """The numbers every sampling command shares: finite, in range, checked before any work."""
    if cfg.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {cfg.seed}")
    eta = getattr(cfg, "eta", 0.0)
    if not 0 <= eta <= 1:   # also NaN; eta > 1 asks DDIM for more noise than the step has (sigma^2 > 1 - alpha_bar)
        raise UsageError(f"--eta must be a finite number in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    guidance = getattr(cfg, "guidance", None)
    if guidance is not None and not -1 <= guidance <= MAX_GUIDANCE:
        raise UsageError(f"--guidance must be a finite number in [-1, {MAX_GUIDANCE:g}] (-1: unconditional, 0: plain "
                         f"conditional; the paper's best are 0.1 .. 4), got {guidance}")


def _check_affordable(num, shape, option="--num"):
    """`num` float32 images of `shape` must fit in the memory minidiff allows for data (data.memory_limit)."""
    nbytes = 4 * num * math.prod(shape)
    limit, why = data.memory_limit()
    if nbytes > limit:
        raise UsageError(f"{option} {num}: {num} images of {'x'.join(map(str, shape))} would take "
                         f"{nbytes / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB allowed ({why}); "
                         f"ask for fewer")


def _check_output(path, suffixes, option="--out"):
    """The output must have a known suffix and live in an existing folder."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in suffixes:
        raise UsageError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file name (e.g. {os.path.join(path, 'out' + ext)})")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: the folder {folder} is not writable; choose another")
    return ext


def _model_images(config, info, name, split):
    """Images for a trained model: its own data set by default; sizes must match the model's.

    A pretrained or converted model (config None) has no data set of its own: --data is needed,
    and its images are brought to the model's size and channels.
    """
    if info["channels"] is None:
        raise UsageError(f"the checkpoint's model was trained on 2-D points ({config.data}); this command needs images")
    if config is None:
        if name is None:
            raise UsageError(f"a pretrained model has no data set of its own: give --data, images to bring to "
                             f"its {info['channels']}x{info['image_size']}x{info['image_size']} (e.g. a folder of "
                             f"pictures or a CIFAR-10 batch file)")
        return data.load_images(name, split, image_size=info["image_size"], channels=info["channels"])
    name = name or config.data
    images_, labels, data_info = data.load_images(name, split)
    size, channels = images_.shape[-1], images_.shape[1]
    if (size, channels) != (info["image_size"], info["channels"]):
        raise UsageError(f"{name}: images are {channels}x{size}x{size} (CxHxW) but the checkpoint's model takes "
                         f"{info['channels']}x{info['image_size']}x{info['image_size']}")
    return images_, labels, data_info


# ---------------------------------------------------------------- train


class _GracefulInterrupt:
    """The first Ctrl-C (SIGINT), SIGTERM (how SLURM, Kubernetes and `kill` stop a job) or SIGHUP (the
    terminal went away) only sets `.requested`: the loop then stops at a step boundary and saves.
    A second one interrupts at once (the last periodic checkpoint is still intact).
    `.signum` is the first signal, for the conventional exit code 128 + signum."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __enter__(self):
        self.requested = False
        self.signum = signal.SIGINT
        self.previous = {}
        with contextlib.suppress(ValueError):  # signal only works in the main thread
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        distributed.world().stop_requested = True   # under MPI the ranks agree on it at the next step

    @property
    def exit_code(self):
        return 128 + int(self.signum)

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        return False


def _as_option(message):
    """'steps must be ...' -> '--steps must be ...': config errors in the CLI's own words."""
    return re.sub(r"^([a-z_]+) (must|cannot)", lambda m: f"--{m.group(1).replace('_', '-')} {m.group(2)}", message)


def train_config_from_args(args):
    """(TrainConfig, out_dir, start step) from the options, the preset and, on --resume, the checkpoint."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    if getattr(args, "learn_sigma", False):   # shorthand for the two options it sets; the config stores those
        clash = [f"--{k.replace('_', '-')} {given[k]}" for k, ok in (("var_type", ("learned", "learned_range")),
                                                                      ("loss_type", ("hybrid", "kl")))
                 if k in given and given[k] not in ok]
        if clash:
            raise UsageError(f"--learn-sigma learns the variance, which {' and '.join(clash)} contradicts: "
                             f"drop one of them")
        given.setdefault("var_type", "learned_range")
        given.setdefault("loss_type", "hybrid")
    preset = given.pop("preset", None)
    try:
        base = make_config(preset, **({"data": given["data"]} if "data" in given else {}))
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = args.out or os.path.join("runs", os.path.basename(os.path.normpath(given.get("data", base.data))))
    on_root = distributed.world().from_root   # under MPI only rank 0's files count: it alone reads and writes
    # A run folder is created with its parents when training starts, as every training tool does;
    # only a file standing where a folder must go is an error.

    def file_in_the_way():
        existing = os.path.abspath(out)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        return None if os.path.isdir(existing) else existing

    blocked = on_root(file_in_the_way)
    if blocked is not None:
        raise UsageError(f"--out {out}: {blocked} is a file, not a folder")
    ckpt = os.path.join(out, training.CHECKPOINT)
    if args.resume:
        if args.overwrite:
            raise UsageError("--resume and --overwrite contradict each other")
        state = on_root(lambda: checkpoint.load(ckpt))  # CheckpointError: missing or corrupt, naming the file
        values = {**state["config"], **given}
        if "backend" not in given and os.environ.get("MINIDIFF_BACKEND"):  # this machine's default beats the run's
            values["backend"] = backend.default_name()
        if preset is not None and preset != values["preset"]:
            raise UsageError(f"cannot resume with --preset {preset}: the run was trained with {values['preset']}")
        try:
            config = config_from_dict(values)
            validate(config)
            training.check_resumable(state, config)
        except ValueError as err:
            raise UsageError(str(err)) from None
        return config, out, int(state["step"])
    if not args.overwrite and on_root(lambda: os.path.exists(ckpt)):
        raise UsageError(f"{out} already holds a training run: pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out")
    try:
        config = make_config(base.preset, **given)
    except ValueError as err:
        raise UsageError(_as_option(str(err))) from None
    return config, out, 0


def _train_setup(args, world):
    """The checks of cmd_train that run before anything is written."""
    config, out, start = train_config_from_args(args)
    try:
        world.check_batch(config.batch_size)
    except ValueError as err:
        raise UsageError(_as_option(str(err))) from None
    backend.use_backend(config.backend)
    _, _, info = training.load_data(config)   # bad (or, for --conditional, unlabelled) data fails before any write
    try:
        check_fits(config, info["image_size"])
    except ValueError as err:
        raise UsageError(_as_option(str(err))) from None
    return config, out, start


def cmd_train(args):
    from tqdm.auto import tqdm

    world = distributed.world()   # one rank of N under mpiexec (mpi4py), else a world of one
    error = None
    try:
        config, out, start = _train_setup(args, world)
    except Exception as err:  # noqa: BLE001  (re-raised by first_error, on every rank)
        error = err
    world.first_error(error)   # MPI: all ranks start, or all stop with the first rank's error
    if world.size > 1 and world.is_root and args.progress:
        print(f"data-parallel over {world.size} MPI ranks: {config.batch_size // world.size} of each batch of "
              f"{config.batch_size} per rank", file=sys.stderr)
    began = time.perf_counter()
    run = training.train(config, out, resume=args.resume, progress=args.progress and world.is_root, world=world)
    bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (args.progress and world.is_root), desc=f"train {config.data}", smoothing=0.02)
    step, smoothed, interrupted = start, None, False
    try:
        with _GracefulInterrupt() as stop:
            for record in run:
                step = record["step"]
                smoothed = record["loss"] if smoothed is None else 0.98 * smoothed + 0.02 * record["loss"]
                bar.update(1)
                bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{record['lr']:.1e}", refresh=False)
                if "samples" in record:
                    bar.write(f"step {step}: samples -> {record['samples']}")
                if step == config.steps:
                    bar.close()
                    if args.progress and world.is_root:
                        print(f"drawing {config.num_samples} samples with the EMA weights ...", file=sys.stderr)
                if record.get("stop") or (stop.requested and world.size == 1):  # MPI: all ranks at one step
                    interrupted = True
                    break
    except KeyboardInterrupt:  # a second Ctrl-C inside a step, or one raised by the consumer
        if world.size > 1:  # the ranks may be at different steps now: end them all at once
            world.report_failure(f"minidiff train: interrupted again: every MPI rank stops now (MPI_Abort); "
                                 f"the last periodic checkpoint in {out} is intact")
        interrupted = True
    finally:
        bar.close()
        run.close()  # at a step boundary this saves the checkpoint (train's GeneratorExit path)
    if interrupted:
        cause = "" if stop.signum == signal.SIGINT else f" by {signal.Signals(stop.signum).name}"
        _print_on_root(f"interrupted{cause} after step {step}: checkpoint saved in {out}; continue with "
                       f"'minidiff train --out {out} --resume'")
        return stop.exit_code
    minutes, seconds = divmod(time.perf_counter() - began, 60)
    _print_on_root(f"trained {config.steps} steps in {int(minutes)}m{seconds:02.0f}s; wrote {out}/samples.png, "
                   f"{training.CHECKPOINT}, metrics.{config.log_format} and loss.png"
                   + (f" ({world.size} MPI ranks)" if world.size > 1 else ""))
    if kernel_tuning.setting() != "off":
        _print_on_root(f"kernel tuning ({kernel_tuning.setting()}): {len(kernel_tuning.report())} convolution shapes "
                       f"timed; their slower candidates cost {kernel_tuning.seconds_spent():.1f} s of the run")
    return 0


# ---------------------------------------------------------------- sample


def _sampling_plan(diffusion, cfg, info=None, sampler=None, spacing=None):
    """sampling.sampling_plan for --sampler/--steps/--eta/--order/--spacing (and a converted model's DDIM
    settings), with its error as a usage error naming the option."""
    try:
        return sampling.sampling_plan(diffusion, sampler or cfg.sampler, cfg.steps, getattr(cfg, "eta", 0.0),
                                      cfg.order, spacing or cfg.spacing, (info or {}).get("ddim"))
    except ValueError as err:
        raise UsageError(re.sub(r"^(steps|eta|order|spacing) ", r"--\1 ", str(err))) from None


def _load_source(cfg):
    """(model, diffusion, config, info) from --checkpoint or --pretrained, exactly one of them."""
    if (cfg.checkpoint is None) == (cfg.pretrained is None):
        raise UsageError("exactly one of --checkpoint (a minidiff run or converted model) and --pretrained "
                         "(a diffusers DDPM folder) is required")
    if cfg.checkpoint is not None:
        return sampling.load_model(cfg.checkpoint, cfg.ema)
    if not cfg.ema:
        raise UsageError("--no-ema applies to minidiff training checkpoints; a diffusers folder holds one set of "
                         "weights (the ddpm-ema-* repositories hold EMA weights)")
    model, diffusion, info = pretrained.load_with_info(cfg.pretrained)
    return model, diffusion, None, info


def cmd_sample(args):
    cfg = _config(args)
    _positive(num=cfg.num, batch_size=cfg.batch_size, frames=cfg.frames)
    _check_sampling(cfg)
    ext = _check_output(cfg.out, (".png", ".npz") if not cfg.progressive else (".png",))
    backend.use_backend(cfg.backend)
    model, diffusion, config, info = _load_source(cfg)
    plan = _sampling_plan(diffusion, cfg, info)   # the sampler and the diffusion it runs on (respaced?)
    steps = plan.steps
    labels, guidance, nrow = _requested_labels(cfg, model, cfg.num)
    num = cfg.num if labels is None else len(labels)
    points = info["channels"] is None
    shape = (2,) if points else (info["channels"], info["image_size"], info["image_size"])
    _check_affordable(num * (min(cfg.frames, steps) if cfg.progressive else 1), shape)
    if cfg.progressive:
        if points:
            raise UsageError("--progressive needs an image model; this checkpoint models 2-D points")
        return _sample_progressive(cfg, model, plan, shape, info.get("clip_denoised", True), labels, guidance)
    samples = sampling.draw_samples(diffusion, model, shape, num, cfg.seed, batch_size=cfg.batch_size,
                                    clip_denoised=info.get("clip_denoised", True), progress=True,
                                    labels=labels, guidance=guidance, plan=plan)
    with checkpoint.atomic_path(cfg.out) as tmp:
        if ext == ".npz":
            array = samples if points else images.to_uint8(samples)     # uint8 (N, H, W, C) for images
            arrays = {"arr_0": array} if labels is None else {"arr_0": array, "arr_1": labels}  # guided-diffusion's
            backend.host.savez(tmp, **arrays)
        elif points:
            images.scatter_2d([samples], tmp, titles=[f"{num} samples"])
        else:
            images.save_grid(samples, tmp, nrow=nrow)
    what = "" if labels is None else (f" of label {cfg.label}" if cfg.label != "all" else f" ({nrow} of every class)") \
        + f" with guidance w = {guidance:g}"
    print(f"wrote {num} samples{what} to {cfg.out}", file=sys.stderr)
    return 0


def _requested_labels(cfg, model, num):
    """(labels (N,) int64 or None, guidance w, images per grid row) from --label, --guidance and `num` (--num).

    --label all draws num // K of every class, in label order: one grid row per class.
    """
    num_classes = getattr(model, "num_classes", None)
    if cfg.label is None:
        if cfg.guidance is not None:
            raise UsageError("--guidance steers towards a class: give --label too (without it a conditional "
                             "model samples unconditionally)")
        return None, 0.0, None
    if num_classes is None:
        raise UsageError(f"--label {cfg.label}: this model is unconditional (train with --conditional for a "
                         f"class-conditional one); drop --label")
    guidance = DEFAULT_GUIDANCE if cfg.guidance is None else cfg.guidance
    if not math.isfinite(guidance):
        raise UsageError(f"--guidance must be a finite number, got {guidance}")
    if cfg.label == "all":
        if num < num_classes:
            raise UsageError(f"--label all needs --num of at least {num_classes} (one per class), got {num}")
        return sampling.every_class(num_classes, num), guidance, num // num_classes
    try:
        label = int(cfg.label)
    except ValueError:
        raise UsageError(f"--label must be a class number or 'all', got {cfg.label!r}") from None
    if not 0 <= label < num_classes:
        raise UsageError(f"--label {label} is out of range: this model knows classes 0 .. {num_classes - 1}")
    return backend.host.full(num, label, dtype=backend.host.int64), guidance, None


def _frame_indices(num_steps, frames):
    """Which of num_steps chain outputs (0 = first) to show as `frames` columns, the last one included."""
    return sorted({round(k * (num_steps - 1) / max(frames - 1, 1)) for k in range(frames)})


def _sample_progressive(cfg, model, plan, shape, clip_denoised=True, labels=None, guidance=0.0):
    """Fig. 6: the x_0 prediction at evenly spaced steps of one chain per row."""
    shape = (cfg.num if labels is None else len(labels), *shape)
    diffusion, steps = plan.diffusion, plan.steps
    chain = plan.run(model, shape, progressive=True, seed=[cfg.seed, 0], clip_denoised=clip_denoised, progress=True,
                     guidance=guidance, model_kwargs=None if labels is None else {"y": backend.to_active(labels)})
    keep = set(_frame_indices(steps, min(cfg.frames, steps)))   # at most one column per step
    frames, labels = [], []
    for k, out in enumerate(chain):
        if k in keep:
            frames.append(backend.to_numpy(out["pred_xstart"]))
            t = out["t"] if diffusion.timestep_map is None else int(diffusion.timestep_map[out["t"]])
            labels.append(f"t={t:.0f}")   # the Karras sampler's t lies between grid points
    with checkpoint.atomic_path(cfg.out) as tmp:
        images.filmstrip(frames, tmp, labels=labels)
    print(f"wrote the x_0 predictions of {cfg.num} chains to {cfg.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- forward


def cmd_forward(args):
    cfg = _config(args)
    ext = _check_output(cfg.out, (".png", ".gif", ".html"))
    if cfg.image_size == 0:
        cfg.image_size = 32 if ext == ".html" else 64
    _positive(steps=cfg.steps, num=cfg.num, image_size=cfg.image_size)
    _check_sampling(cfg)
    if cfg.image_size > checkpoint.MAX_IMAGE_SIZE:
        raise UsageError(f"--image-size must be at most {checkpoint.MAX_IMAGE_SIZE}, got {cfg.image_size}")
    if cfg.checkpoint is None and cfg.steps > FORWARD_T:
        raise UsageError(f"--steps must be at most T = {FORWARD_T} (one frame per step of the forward process), "
                         f"got {cfg.steps}")
    if not 0 < cfg.beta_scale <= 49:
        raise UsageError(f"--beta-scale must lie in (0, 49] so that every beta stays below 1, got {cfg.beta_scale}")
    if cfg.checkpoint is not None and cfg.image is not None:
        raise UsageError("give an IMAGE (forward process) or --checkpoint (reverse process), not both")
    backend.use_backend(cfg.backend)
    if ext == ".html":
        return _write_explainer(cfg)
    if cfg.checkpoint is not None:
        frames, labels = _reverse_frames(cfg)
    else:
        frames, labels = _forward_frames(cfg)
    with checkpoint.atomic_path(cfg.out) as tmp:
        if ext == ".gif":
            images.save_gif(frames, tmp, duration_ms=120, hold_last_ms=1500)
        else:
            images.filmstrip(frames, tmp, labels=labels)
    print(f"wrote {len(frames)} frames to {cfg.out}", file=sys.stderr)
    return 0


def _forward_picture(cfg):
    """x_0 for the forward demo: the IMAGE file or a seeded Mondrian, float64 (C, H, W) in [-1, 1].

    The forward demo runs on the host in float64 whatever --backend says: one picture through
    1000 tiny steps, where a GPU would only add a kernel launch per step."""
    host = backend.host
    name = cfg.image or "mondrian"
    if name == "mondrian":
        return data.mondrian(cfg.image_size, rng=host.random.default_rng(cfg.seed)).astype(host.float64)
    if not os.path.exists(name):
        raise UsageError(f"{name}: no such image file (or use 'mondrian')")
    return data.load_path(name, image_size=cfg.image_size)[0][0].astype(host.float64)   # (C, H, W)


def _forward_frames(cfg):
    """x_0, then x_t of the Markov chain x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps (Eq. 2)."""
    betas = get_named_beta_schedule("linear", FORWARD_T) * cfg.beta_scale
    keep = set(explainer.frame_steps(len(betas), cfg.steps))   # steps 0 (x_0) .. T
    frames, steps = explainer.forward_chain(_forward_picture(cfg), betas, keep, cfg.seed)
    return frames, [f"t={t}" for t in steps]


def _write_explainer(cfg):
    """The page of explainer.py: one forward chain per noise scale, and the reverse chain of --checkpoint."""
    if cfg.steps not in explainer.STEPS_CHOICES:
        raise UsageError(f"for .html, --steps is where the slider starts: one of {explainer.STEPS_CHOICES}, "
                         f"got {cfg.steps}")
    if round(cfg.beta_scale, 1) not in explainer.SCALE_CHOICES or abs(cfg.beta_scale - round(cfg.beta_scale, 1)) > 1e-9:
        raise UsageError("for .html, --beta-scale is where the slider starts: 0.3 .. 1.5 in steps of 0.1, "
                         f"got {cfg.beta_scale}")
    chains = []
    if cfg.checkpoint is None:
        x, base = _forward_picture(cfg), get_named_beta_schedule("linear", 1000)
        title = f"The diffusion process on {'a Mondrian' if (cfg.image or 'mondrian') == 'mondrian' else os.path.basename(cfg.image)}"
    else:
        model, diffusion, _, info = sampling.load_model(cfg.checkpoint, cfg.ema)
        if info["channels"] is None:
            raise UsageError("the checkpoint models 2-D points: a page of pictures needs an image model")
        frames, steps = explainer.reverse_chain(model, diffusion, _reverse_shape(cfg, info),
                                                set(explainer.shown_steps(diffusion.num_timesteps)), cfg.seed,
                                                progress=True)
        chains.append(explainer.chain_entry("reverse", 1.0, steps, frames, diffusion.betas))
        x, base = frames[steps.index(0)], diffusion.betas          # forward from the model's own samples
        title = f"The diffusion process of the model in {cfg.checkpoint}"
    keep = set(explainer.shown_steps(len(base)))
    from tqdm.auto import tqdm
    for scale in tqdm(explainer.SCALE_CHOICES, desc="forward chains", unit="scale", file=sys.stderr):
        betas = backend.host.minimum(base * scale, 0.999)   # a scaled cosine schedule could reach 1
        frames, steps = explainer.forward_chain(backend.host.asarray(x, dtype=backend.host.float64), betas, keep,
                                                cfg.seed)
        chains.append(explainer.chain_entry("forward", scale, steps, frames, betas))
    with checkpoint.atomic_path(cfg.out) as tmp:
        explainer.write_page(tmp, chains, len(base), title=title, default_steps=cfg.steps,
                             default_scale=round(cfg.beta_scale, 1))
    print(f"wrote {cfg.out} ({os.path.getsize(cfg.out) / 1e6:.1f} MB): open it in a browser", file=sys.stderr)
    return 0


def _reverse_frames(cfg):
    """x_T, ..., x_0 of the reverse process (Algorithm 2), `steps` + 1 frames."""
    model, diffusion, config, info = sampling.load_model(cfg.checkpoint, cfg.ema)
    if info["channels"] is None:
        raise UsageError("the checkpoint models 2-D points: use 'minidiff sample' for a scatter plot")
    if cfg.beta_scale != 1.0:
        raise UsageError("--beta-scale applies to the forward process; a checkpoint's schedule is fixed")
    T = diffusion.num_timesteps
    if cfg.steps > T:
        raise UsageError(f"--steps must be at most the model's T = {T} (one frame per reverse step), got {cfg.steps}")
    _check_affordable(cfg.num * (cfg.steps + 1), _reverse_shape(cfg, info)[1:])
    keep = {T - t for t in explainer.frame_steps(T, cfg.steps)}   # the paper's t of each frame, from x_T
    frames, steps = explainer.reverse_chain(model, diffusion, _reverse_shape(cfg, info), keep, cfg.seed,
                                            progress=True)
    return frames, [f"t={t}" for t in steps]


def _reverse_shape(cfg, info):
    """(--num, C, H, W): the batch of reverse chains of --checkpoint's model."""
    return (cfg.num, info["channels"], info["image_size"], info["image_size"])


# ---------------------------------------------------------------- interpolate


SMALL_IMAGE = 16   # images this small (8x8 digits) keep too little at T/2 to interpolate: mix at T/4


def interpolation_t(num_timesteps, image_size):
    """interpolate's default --t: T/4 for small images (an 8x8 digit is noise by T/2), T/2 (the paper's) else."""
    return num_timesteps // 4 if image_size is not None and image_size <= SMALL_IMAGE else num_timesteps // 2


def cmd_interpolate(args):
    cfg = _config(args)
    _positive(pairs=cfg.pairs)
    _check_sampling(cfg)
    if cfg.lambdas < 2:
        raise UsageError(f"--lambdas must be at least 2 (0 and 1), got {cfg.lambdas}")
    _check_output(cfg.out, (".png",))
    if cfg.label == "all":
        raise UsageError("--label all does not apply to interpolate: give one class for every pair")
    backend.use_backend(cfg.backend)
    model, diffusion, config, info = _load_source(cfg)
    if cfg.t is None:
        cfg.t = interpolation_t(diffusion.num_timesteps, info["image_size"])
    if not 0 <= cfg.t < diffusion.num_timesteps:
        raise UsageError(f"--t must lie in 0 .. {diffusion.num_timesteps - 1}, got {cfg.t}")
    if info["channels"] is not None:
        _check_affordable(cfg.pairs * (cfg.lambdas + 2), (info["channels"], info["image_size"], info["image_size"]),
                          "--lambdas")
    images_, _, _ = _model_images(config, info, cfg.data, "heldout")
    if len(images_) < 2 * cfg.pairs:
        raise UsageError(f"--pairs {cfg.pairs} needs {2 * cfg.pairs} images; the held-out split has {len(images_)}")
    pick = backend.host.random.default_rng(cfg.seed).choice(len(images_), 2 * cfg.pairs, replace=False)
    x_a = backend.to_active(images_[pick[:cfg.pairs]])
    x_b = backend.to_active(images_[pick[cfg.pairs:]])
    lambdas = [k / (cfg.lambdas - 1) for k in range(cfg.lambdas)]
    labels, guidance, _ = _requested_labels(cfg, model, cfg.pairs)
    clip = info.get("clip_denoised", True)
    decode = None
    if cfg.sampler == "ddpm" and (cfg.steps or cfg.order or cfg.spacing):
        raise UsageError("--sampler ddpm decodes all t + 1 ancestral steps, with the noise shared across the mixing "
                         "weights; for fewer steps choose a deterministic --sampler (ddim, dpm++, heun, euler)")
    if cfg.sampler != "ddpm":   # a deterministic decoder on the chain's first t + 1 steps
        if cfg.t < 1:
            raise UsageError(f"--sampler {cfg.sampler} decodes a chain of t + 1 >= 2 steps: use --t 1 or more, "
                             f"or --sampler ddpm")
        spacing = cfg.spacing or ("trailing" if cfg.sampler in ("ddim", "dpm++") else None)
        if cfg.spacing == "leading":
            raise UsageError("--spacing leading does not start at step t, so the mix would be decoded as a less "
                             "noisy image: use trailing or linspace")
        plan = _sampling_plan(diffusion.truncated(cfg.t), cfg, info, spacing=spacing)

        def decode(x_t, model_kwargs):
            return plan.run(model, x_t.shape, noise=x_t, seed=[cfg.seed, 1], clip_denoised=clip, progress=True,
                            model_kwargs=model_kwargs, guidance=guidance)
    mixed = diffusion.interpolate(model, x_a, x_b, cfg.t, lambdas, seed=[cfg.seed, 1], progress=True,
                                  clip_denoised=clip, guidance=guidance, decode=decode,
                                  model_kwargs=None if labels is None else {"y": backend.to_active(labels)})
    columns = [x_a] + [mixed[k] for k in range(len(lambdas))] + [x_b]
    labels = ["source"] + [f"{lam:.2g}" for lam in lambdas] + ["source"]
    with checkpoint.atomic_path(cfg.out) as tmp:
        images.filmstrip([backend.to_numpy(c) for c in columns], tmp, labels=labels)
    print(f"wrote {cfg.pairs} interpolations at t={cfg.t} to {cfg.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- eval


# eval's sampler when none is asked for: the final samples.png's, chosen by the same benchmark (BENCHMARKS.md)
EVAL_SAMPLER = FINAL_SAMPLER
DEFAULT_EVAL_NUM = 1000   # samples eval draws by default: the size BENCHMARKS.md's quality targets are stated at
MIN_EVAL_SAMPLES = 4      # k + 1 for the k = 3 nearest-neighbour precision/recall


def _read_samples(path, points, images_allowed=False):
    """(arr_0, arr_1 or None) of a .npz (or the array of a .npy, None): uint8 (N, H, W[, C]) images, or
    (N, 2) points, and the labels they were drawn for (guided-diffusion's convention). With
    images_allowed (--inception), also a folder of images or any image file minidiff loads."""
    if images_allowed and os.path.exists(path) and not path.endswith((".npz", ".npy")):
        found, _ = data.load_path(path)                        # float NCHW in [-1, 1]
        return images.to_uint8(found), None
    if not os.path.isfile(path):
        raise UsageError(f"--samples {path}: no such file")
    found, names = data.read_arrays(path, ["arr_0", "arr_1"])   # DataError: unreadable, hostile or too large
    array, labels = found["arr_0"], found["arr_1"]
    if array is None:
        raise UsageError(f"--samples {path}: no array arr_0 in the file (it holds {', '.join(names) or 'nothing'})")
    if points:
        if array.ndim != 2 or array.shape[1] != 2 or array.dtype.kind not in "fiu":
            raise UsageError(f"--samples {path}: 2-D data needs (N, 2) points, got {array.dtype} of shape "
                             f"{array.shape}")
    elif array.dtype != backend.host.uint8 or array.ndim not in (3, 4) or (array.ndim == 4 and
                                                                          array.shape[-1] not in (1, 3)):
        raise UsageError(f"--samples {path}: expected uint8 images of shape (N, H, W, C) with C = 1 or 3, as "
                         f"'minidiff sample --out x.npz' writes them; got {array.dtype} of shape {array.shape}")
    if labels is not None and (labels.shape != (len(array),) or labels.dtype.kind not in "iu"):
        raise UsageError(f"--samples {path}: arr_1 must hold one integer label per sample, shape ({len(array)},); "
                         f"got {labels.dtype} of shape {labels.shape}")
    return array, labels


def _check_eval_data(cfg, dataset, config, info, own_metrics=True):
    """Refuse a reference data set that the samples (or the checkpoint's model) cannot be compared with.

    Returns the images for --bpd (and checks their size against the model), or None.
    """
    quality_sets = metrics.IMAGE_DATASETS + metrics.POINT_DATASETS
    if info is not None and info["channels"] is None:   # a 2-D model
        if cfg.bpd:
            raise UsageError(f"--bpd needs an image model; the checkpoint models 2-D points ({config.data})")
        if dataset not in data.TOY_DATASETS:
            raise UsageError(f"the checkpoint models 2-D points ({config.data}), so --data must be a 2-D set "
                             f"({', '.join(data.TOY_DATASETS)}), got {dataset}")
    found = None
    if info is not None and info["channels"] is not None:
        if dataset in data.TOY_DATASETS:
            raise UsageError(f"--data {dataset} is 2-D points, but the checkpoint's model makes images")
        found = _model_images(config, info, dataset, cfg.split)   # DataError or a size mismatch: one line
    if cfg.metrics and own_metrics and dataset not in quality_sets:
        hint = "; for bits/dim alone use --bpd --no-metrics" if cfg.checkpoint is not None else ""
        raise UsageError(f"no sample-quality metrics for data set {dataset!r}: they compare with one of "
                         f"{', '.join(quality_sets)}{hint}")
    return found


def cmd_eval(args):
    """Score samples (drawn from --checkpoint or read from --samples), and with --bpd the model's bits/dim.

    Every check runs before the slow parts, so bad input costs nothing and overwrites nothing.
    """
    cfg = _config(args)
    _positive(batch_size=cfg.batch_size, **({"num": cfg.num} if cfg.num is not None else {}))
    if cfg.bpd_num < 0:
        raise UsageError(f"--bpd-num must be >= 0 (0: the whole split), got {cfg.bpd_num}")
    _check_sampling(cfg)
    if cfg.checkpoint is None and cfg.samples is None:
        raise UsageError("give --checkpoint (draw samples from a model) or --samples FILE.npz (score samples "
                         "already drawn)")
    if not cfg.metrics and not cfg.bpd:
        raise UsageError("--no-metrics without --bpd leaves nothing to compute")
    if cfg.samples is not None and not cfg.metrics:
        raise UsageError("--samples is scored by the sample metrics: drop --no-metrics")
    if cfg.bpd and cfg.checkpoint is None:
        raise UsageError("--bpd needs --checkpoint: bits/dim is a property of a model, not of samples")
    if (cfg.inception is None) != (cfg.ref is None):
        raise UsageError("--inception WEIGHTS and --ref (a stats .npz or real data) go together: FID compares the "
                         "samples' Inception statistics with the reference's")
    if cfg.inception is not None and not cfg.metrics:
        raise UsageError("--inception scores samples: drop --no-metrics")
    if cfg.out is not None:
        _check_output(cfg.out, (".json",))
    backend.use_backend(cfg.backend)
    fid_model = fid_ref = None
    if cfg.inception is not None:   # weights and reference checked before any sampling
        fid_model = _load_inception(cfg.inception)
        fid_ref = _inception_reference(cfg.ref)
    model = diffusion = config = info = None
    if cfg.checkpoint is not None:
        model, diffusion, config, info = sampling.load_model(cfg.checkpoint, cfg.ema)
    dataset = cfg.data or (config.data if config is not None else None)
    if dataset is None and fid_model is None:
        raise UsageError(f"--samples without --checkpoint needs --data, the reference data set: one of "
                         f"{', '.join(metrics.IMAGE_DATASETS + metrics.POINT_DATASETS)}")
    # With --inception, minidiff's own digit metrics run only where they apply (a bundled digit set).
    own_metrics = cfg.metrics and dataset is not None and (
        fid_model is None or dataset in metrics.IMAGE_DATASETS + metrics.POINT_DATASETS)
    bpd_images = _check_eval_data(cfg, dataset, config, info, own_metrics) if dataset is not None else None
    report = {"checkpoint": checkpoint.resolve(cfg.checkpoint) if cfg.checkpoint is not None else None,
              "samples": cfg.samples, "data": dataset}
    if cfg.checkpoint is not None:
        report["ema"] = cfg.ema
    if cfg.metrics:
        points = dataset in metrics.POINT_DATASETS
        if cfg.samples is not None:
            if cfg.label is not None or cfg.guidance is not None:
                raise UsageError("--label and --guidance choose what to draw from --checkpoint; --samples are "
                                 "already drawn (their labels are the file's arr_1)")
            samples, labels = _read_samples(cfg.samples, points, images_allowed=fid_model is not None)
            samples, labels = samples[:cfg.num], None if labels is None else labels[:cfg.num]   # None: all
            if len(samples) < (MIN_EVAL_SAMPLES if own_metrics else 2):
                raise UsageError(f"--samples {cfg.samples}: the metrics need at least {MIN_EVAL_SAMPLES} "
                                 f"samples, got {len(samples)}")
        else:
            num = cfg.num or DEFAULT_EVAL_NUM
            if num < (MIN_EVAL_SAMPLES if own_metrics else 2):
                raise UsageError(f"--num must be at least {MIN_EVAL_SAMPLES} for the metrics (k-NN "
                                 f"precision/recall), got {num}")
            default = EVAL_SAMPLER if not (cfg.steps or cfg.eta) else None
            plan = _sampling_plan(diffusion, cfg, info, sampler=cfg.sampler or default)
            shape = (2,) if points else (info["channels"], info["image_size"], info["image_size"])
            _check_affordable(num, shape)
            labels, guidance, _ = _requested_labels(cfg, model, num)
            num = num if labels is None else len(labels)
            began = time.perf_counter()
            drawn = sampling.draw_samples(diffusion, model, shape, num, cfg.seed, batch_size=cfg.batch_size,
                                          progress=True, labels=labels, guidance=guidance, plan=plan)
            report["sampling"] = {"sampler": plan.sampler, "steps": plan.steps, "network_calls": plan.network_calls,
                                  **{k: v for k, v in plan.options.items() if k != "solver"},
                                  **({"label": cfg.label, "guidance": guidance} if labels is not None else {}),
                                  "num": num, "seed": cfg.seed, "seconds": round(time.perf_counter() - began, 3)}
            samples = drawn if points else images.to_uint8(drawn)   # uint8 NHWC, as sample --out x.npz
        if own_metrics:
            try:
                report["quality"] = metrics.evaluate_samples(samples, dataset, seed=cfg.seed, labels=labels)
            except ValueError as err:   # e.g. images of another size than the data set's
                raise UsageError(f"--samples {cfg.samples}: {err}" if cfg.samples else str(err)) from None
        if fid_model is not None:
            report["inception"] = _inception_metrics(fid_model, fid_ref, samples, cfg)
    if cfg.bpd:
        images_, _, data_info = bpd_images
        if cfg.bpd_num:
            images_ = images_[:cfg.bpd_num]
        bpd_diffusion = build_diffusion(config, num_bins=data_info["grey_levels"])
        report["likelihood"] = {"split": cfg.split, **metrics.eval_likelihood(
            model, bpd_diffusion, images_, cfg.batch_size, cfg.seed, progress=True)}
    _print_report(report)
    if cfg.out is not None:
        with checkpoint.atomic_path(cfg.out) as tmp, open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote the report to {cfg.out}", file=sys.stderr)
    return 0


def _print_report(report):
    """Plain values first, then the quality table (Markdown) and the other sections as key/value lines."""
    for name, value in report.items():
        if value is not None and not isinstance(value, dict):
            print(f"{name}: {value}")
    for name, section in report.items():
        if not isinstance(section, dict):
            continue
        print()
        if name == "quality":
            print(metrics.format_report(section))
            continue
        print(f"[{name}]")
        width = max(map(len, section))
        for key, value in section.items():
            print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")


# ---------------------------------------------------------------- Inception FID, KID, IS

FID_BIAS_BELOW = 10_000   # FID is biased upward for fewer samples (Heusel et al. 2017; Chong & Forsyth 2020)


def _load_inception(path):
    if not os.path.isfile(path):
        raise UsageError(f"--inception {path}: no such file; download pytorch-fid's weights from "
                         f"{inception.FID_WEIGHTS_URL} (see the README, 'Inception FID')")
    try:
        return inception.load(path)
    except ValueError as err:   # unsafe, damaged or other weights: the reader and the loader say which
        raise UsageError(f"--inception {err}") from None


def _reference_images(name, split="all", num=0):
    """Real images for the Inception: float32 NCHW in [0, 1], from a bundled set or a path."""
    found, _, _ = data.load_images(name, split=split)      # DataError: one line
    if num:
        found = found[:num]
    return (found + 1.0) / 2.0


def _inception_reference(ref):
    """("stats", mu, sigma) from a stats .npz, or ("data", images) to featurise once the weights are in."""
    if ref.endswith(".npz") and os.path.isfile(ref):
        try:   # the archive's own member names: a one-array file of images is data, not statistics
            with zipfile.ZipFile(ref) as archive:
                names = {n[:-4] if n.endswith(".npy") else n for n in archive.namelist()}
        except (OSError, zipfile.BadZipFile) as err:
            raise UsageError(f"--ref {ref}: not a readable .npz ({err}); give pytorch-fid statistics "
                             f"(mu, sigma) or a data set") from None
        if "mu" in names or "sigma" in names:   # a statistics file; any other .npz is data
            try:
                mu, sigma = metrics.load_statistics(ref)
            except ValueError as err:
                raise UsageError(f"--ref {err}") from None
            if mu.shape != (inception.FEATURE_DIM,):
                raise UsageError(f"--ref {ref}: statistics of dimension {mu.shape[0]}, but the FID Inception's "
                                 f"pool3 features have {inception.FEATURE_DIM}; make them with 'minidiff fid-stats'")
            return {"kind": "stats", "mu": mu, "sigma": sigma, "source": ref}
    return {"kind": "data", "images": _reference_images(ref), "source": ref}


def _samples_01(samples):
    """uint8 NHWC (or NHW) samples -> float32 NCHW in [0, 1]."""
    x = samples if samples.ndim == 4 else samples[..., None]
    return x.transpose(0, 3, 1, 2).astype(backend.DTYPE) / 255.0


def _inception_metrics(model, ref, samples, cfg):
    """FID (and, against data, KID, precision/recall and the data's IS) and IS of the samples."""
    n = len(samples)
    if n < FID_BIAS_BELOW:
        print(f"warning: {n} samples; FID below {FID_BIAS_BELOW:,} samples is biased upward, so compare it only "
              f"with figures from as many samples (the papers use 50,000)", file=sys.stderr)
    feats = model.features(_samples_01(samples), batch_size=min(cfg.batch_size, 50), progress=True)
    out = {"num_samples": n, "reference": ref["source"]}
    if ref["kind"] == "stats":
        mu, sigma = ref["mu"], ref["sigma"]
    else:
        real = model.features(ref["images"], batch_size=50, progress=True)
        mu, sigma = metrics.feature_statistics(real)
        out["reference_num"] = len(real)
    out["fid"] = metrics.frechet_distance(*metrics.feature_statistics(feats), mu, sigma)
    if ref["kind"] == "data":
        kid = metrics.kernel_inception_distance(feats, real)
        out.update(kid_mean=kid["kid_mean"], kid_std=kid["kid_std"], kid_subset_size=kid["subset_size"])
        if n > 3 and len(real) > 3:
            pr = metrics.precision_recall(real, feats, k=3)
            out.update(precision=pr["precision"], recall=pr["recall"])
    splits = min(10, n)
    score = metrics.inception_score(model.logits_of(feats, bias=False), splits=splits)
    out.update(is_mean=score["is_mean"], is_std=score["is_std"], is_splits=splits)
    if ref["kind"] == "data":
        real_score = metrics.inception_score(model.logits_of(real, bias=False), splits=min(10, len(real)))
        out.update(reference_is_mean=real_score["is_mean"], reference_is_std=real_score["is_std"])
    return out


def cmd_fid_stats(args):
    """Inception pool3 statistics of real images, saved as pytorch-fid's .npz (mu, sigma)."""
    cfg = _config(args)
    _positive(batch_size=cfg.batch_size)
    if cfg.num < 0:
        raise UsageError(f"--num must be >= 0 (0: all), got {cfg.num}")
    _check_output(cfg.out, (".npz",))
    backend.use_backend(cfg.backend)
    model = _load_inception(cfg.inception)
    real = _reference_images(cfg.data, cfg.split, cfg.num)
    if len(real) < 2:
        raise UsageError(f"--data {cfg.data}: {len(real)} image(s); a covariance needs at least 2")
    if len(real) < FID_BIAS_BELOW:
        print(f"warning: {len(real)} images; reference statistics from fewer than {FID_BIAS_BELOW:,} images make "
              f"FID noisy (the CIFAR-10 convention is its 50,000 training images)", file=sys.stderr)
    mu, sigma = metrics.feature_statistics(model.features(real, batch_size=cfg.batch_size, progress=True))
    metrics.save_statistics(cfg.out, mu, sigma)
    print(f"wrote {cfg.out}: Inception statistics of {len(real):,} images of {cfg.data} (mu {mu.shape}, sigma "
          f"{sigma.shape}); use it with 'minidiff eval --inception {cfg.inception} --ref {cfg.out}'", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- convert


def cmd_convert(args):
    """A diffusers DDPM folder -> one minidiff checkpoint (model, schedule, sampling settings)."""
    cfg = _config(args)
    _check_output(cfg.out, (".safetensors",))
    model, diffusion, info = pretrained.load_with_info(cfg.pretrained)
    pretrained.save_converted(cfg.out, model, diffusion, info)
    print(f"wrote {cfg.out}: a {model.num_parameters():,}-parameter U-Net for {info['channels']}x"
          f"{info['image_size']}x{info['image_size']} images and its {diffusion.num_timesteps}-step schedule; "
          f"sample with 'minidiff sample --checkpoint {cfg.out}'", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- export


# The bundled data sets' licences (../shared/data/README.md), as the Hub names them and in words
DATA_LICENSES = {"digits": ("cc-by-4.0", "UCI Optical Recognition of Handwritten Digits, CC BY 4.0"),
                 "mnist": ("cc-by-sa-3.0", "MNIST (LeCun, Cortes, Burges), CC BY-SA 3.0")}


def cmd_export(args):
    """A minidiff run -> a diffusers DDPMPipeline folder with a model card (pretrained.save)."""
    cfg = _config(args)
    backend.use_backend(cfg.backend)
    evaluation = _read_report(cfg.report) if cfg.report is not None else None
    if os.path.lexists(cfg.out) and not cfg.force:
        raise UsageError(f"--out {cfg.out} exists; pass --force to replace an earlier export, or choose another --out")
    run_dir = checkpoint.resolve(cfg.checkpoint)
    run_dir = os.path.dirname(run_dir) if os.path.isfile(run_dir) else run_dir
    model, diffusion, config, info = sampling.load_model(cfg.checkpoint, use_ema=not cfg.raw)
    if info.get("channels") is None:
        raise UsageError(f"--checkpoint {cfg.checkpoint} models 2-D points: diffusers' UNet2DModel holds image "
                         f"models only, so there is nothing to export it to")
    details = {"weights": "trained (--raw)" if cfg.raw else "EMA of the trained weights", "evaluation": evaluation,
               "source": f"`{os.path.basename(os.path.abspath(run_dir))}`"}
    if config is not None:
        license, words = DATA_LICENSES.get(config.data, (None, None))
        details.update(title=f"DDPM on {config.data}", data=f"`{config.data}`", data_license=words,
                       license=license, preset=f"`{config.preset}`", steps=f"{config.steps:,}")
        rows = training.read_metrics(_metrics_file(run_dir)) if _metrics_file(run_dir) else []
        if rows:
            details["metrics"] = {k: v for k, v in rows[-1].items() if k != "time"}
    if cfg.license:
        details["license"] = cfg.license
    picture = os.path.join(run_dir, "samples.png") if config is not None else None
    picture = picture if picture is not None and os.path.isfile(picture) and not cfg.raw else None
    if picture is None:   # draw a grid from the weights being exported (DDIM, 50 steps: seconds for digits)
        picture = os.path.join(tempfile.mkdtemp(prefix="minidiff-export-"), "samples.png")
        _export_samples(model, diffusion, info, picture)
    details["picture"] = True
    card = pretrained.model_card(model, diffusion, details)
    try:
        path = pretrained.save(model, diffusion, cfg.out, card=card, force=cfg.force,
                               clip_sample=info.get("clip_denoised", True), picture=picture)
    except pretrained.PretrainedError as err:
        raise UsageError(str(err)) from None
    conditional = model.num_classes is not None
    print(f"wrote {path}: a diffusers DDPMPipeline ({model.num_parameters():,}-parameter UNet2DModel"
          f"{f', {model.num_classes} classes + no-label id {model.num_classes}' if conditional else ''}, "
          f"DDPMScheduler) with README.md and samples.png; load it with "
          f"DDPMPipeline.from_pretrained({cfg.out!r})", file=sys.stderr)
    return 0


def _metrics_file(run_dir):
    for name in ("metrics.jsonl", "metrics.csv"):
        if os.path.isfile(os.path.join(run_dir, name)):
            return os.path.join(run_dir, name)
    return None


def _read_report(path):
    """The numbers of a 'minidiff eval --out' report, flattened one level ({"fid": 1.2, "bpd": 3.4, ...})."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except OSError as err:
        raise UsageError(f"--report {path}: not readable ({err.strerror or err})") from None
    except ValueError as err:
        raise UsageError(f"--report {path}: not a JSON report of 'minidiff eval --out' ({err})") from None
    if not isinstance(report, dict):
        raise UsageError(f"--report {path}: not a JSON report of 'minidiff eval --out' (expected an object)")
    flat = {}
    for key, value in report.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[key if sub is None else f"{key}.{sub}"] = v
    return flat


def _export_samples(model, diffusion, info, path):
    """A sample grid of the weights being exported: DDIM, 50 steps (seconds for digits); one row per class."""
    k = model.num_classes
    labels = None if k is None else sampling.every_class(k, 4 * k)
    num = 16 if labels is None else len(labels)
    shape = (info["channels"], info["image_size"], info["image_size"])
    samples = sampling.draw_samples(diffusion, model, shape, num, 0, sampler="ddim", steps=50,
                                    clip_denoised=info.get("clip_denoised", True), progress=True, labels=labels)
    images.save_grid(samples, path, nrow=4)
