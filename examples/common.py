"""Helpers shared by the examples: main(**defaults) -> command-line options, paths, and a trained digits model.

Every example is `main(**defaults)`; `run(main)` turns its keyword defaults into
--options (smalldiffusion's style), so `python examples/x.py --help` lists them.

Default paths do not depend on the folder an example is started from: run folders are
under the repository's runs/ (where `minidiff train`, started in the repository, writes
them) and pictures go to examples/out/. Paths given as options are the user's own
(relative ones to the current folder, as usual).
"""
import argparse
import inspect
import json
import os
import pathlib

from tqdm.auto import tqdm

from minidiff import checkpoint
from minidiff.backend import NAMES as BACKENDS
from minidiff.backend import default_name, use_backend
from minidiff.config import make_config
from minidiff.sampling import load_model
from minidiff.train import train

ROOT = pathlib.Path(__file__).resolve().parent.parent      # the repository: the folder above examples/
OUT_DIR = ROOT / "examples" / "out"                           # the examples' pictures (git-ignored)

# The digits preset's 2600 steps took 6 min 42 s of `minidiff train` on 2 CPU cores (docs/CLI.md).
DIGITS_SECONDS_PER_STEP = 402 / 2600


def default_run(name):
    """The run folder runs/NAME of the repository, as a string (the default of --run-dir)."""
    return str(ROOT / "runs" / name)


def default_out(filename):
    """examples/out/FILENAME, as a string (the default of --out)."""
    return str(OUT_DIR / filename)


def output(path):
    """`path`, once its folder exists: call it on every file an example writes."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return path


def wrote(path, what=""):
    """Say where a file went (its absolute path), and what it shows."""
    print(f"wrote {os.path.abspath(path)}" + (f" ({what})" if what else ""))


def with_suffix(path, suffix):
    """digits.png, "_loss" -> digits_loss.png."""
    stem, ext = os.path.splitext(path)
    return stem + suffix + (ext or ".png")


def run(main):
    """Call `main` with its keyword defaults, overridden from the command line."""
    parser = argparse.ArgumentParser(description=inspect.getdoc(main))
    for name, param in inspect.signature(main).parameters.items():
        default = param.default
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif name == "backend":
            parser.add_argument(flag, choices=BACKENDS, default=default,
                                help=f"array backend (default: {default}, from $MINIDIFF_BACKEND or numpy)")
        else:
            parser.add_argument(flag, type=type(default) if default is not None else str, default=default,
                                help=f"(default: {default})")
    return main(**vars(parser.parse_args()))


def duration(seconds):
    """A rough human duration: '40 seconds', '7 minutes', '2.5 hours'."""
    if seconds < 90:
        return f"{max(1, round(seconds))} seconds"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} minutes"
    return f"{seconds / 3600:.1f} hours"


def announce_training(config, run_dir, seconds_per_step=DIGITS_SECONDS_PER_STEP):
    """Say that a full training is about to start, where, and about how long it takes."""
    print(f"No trained model in {run_dir}: training the {config.preset} preset there first: {config.steps} steps, "
          f"about {duration(config.steps * seconds_per_step)} on 2 CPU cores (less on a GPU: --backend cupy). "
          f"Later runs reuse it. To skip this, point --run-dir at a trained run (e.g. from `minidiff train`).",
          flush=True)


def train_with_progress(config, out_dir, resume_from=0):
    """Run minidiff.train.train with a progress bar (resuming the run after step `resume_from` if
    given); returns the run folder."""
    bar = tqdm(total=config.steps, initial=resume_from, unit="step", desc=f"training on {config.data}")
    for record in train(config, out_dir, resume=bool(resume_from), progress=True):
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
    bar.close()
    return out_dir


def has_model(run_dir):
    """True when `run_dir` holds a checkpoint (of a finished or interrupted run)."""
    return os.path.exists(os.path.join(run_dir, checkpoint.FILENAME))


def read_losses(run_dir):
    """(steps, losses) of a run's metrics log (metrics.jsonl or metrics.csv); ([], []) without one.
    Unreadable lines (a run killed mid-write) are skipped."""
    steps, losses = [], []
    jsonl, csv = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "metrics.csv")
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            for line in f:
                try:
                    row = json.loads(line)
                    steps.append(float(row["step"]))
                    losses.append(float(row["loss"]))
                except (ValueError, KeyError, TypeError):
                    continue
    elif os.path.exists(csv):
        with open(csv) as f:
            header = f.readline().strip().split(",")
            for line in f:
                try:
                    row = dict(zip(header, line.strip().split(",")))
                    steps.append(float(row["step"]))
                    losses.append(float(row["loss"]))
                except (ValueError, KeyError):
                    continue
    return steps, losses


def digits_model(run_dir=default_run("digits"), steps=0, backend=default_name(), conditional=False):
    """(model, diffusion, config, info) of a digits run: reuse `run_dir` if it holds a
    checkpoint (e.g. from `minidiff train`), else train the default preset there first
    (with `conditional`, the class-conditional model of `minidiff train --conditional`)."""
    use_backend(backend)
    if has_model(run_dir):
        print(f"using the model in {run_dir}")
    else:
        config = make_config("digits", backend=backend, conditional=conditional,
                             **({"steps": steps} if steps else {}))
        announce_training(config, run_dir)
        train_with_progress(config, run_dir)
    loaded = load_model(run_dir)
    if conditional and loaded[0].num_classes is None:
        raise SystemExit(f"{run_dir} holds an unconditional model: pass another --run-dir, or train one with "
                         f"'minidiff train --conditional --out {run_dir} --overwrite'")
    return loaded
