"""Helpers shared by the examples: main(**defaults) -> command-line options, and a trained digits model.

Every example is `main(**defaults)`; `run(main)` turns its keyword defaults into
--options (smalldiffusion's style), so `python examples/x.py --help` lists them.
"""
import argparse
import inspect
import os

from tqdm.auto import tqdm

from minidiff import backend, checkpoint
from minidiff.config import make_config
from minidiff.sampling import load_model
from minidiff.train import train


def run(main):
    """Call `main` with its keyword defaults, overridden from the command line."""
    parser = argparse.ArgumentParser(description=inspect.getdoc(main))
    for name, param in inspect.signature(main).parameters.items():
        default = param.default
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default) if default is not None else str, default=default,
                                help=f"(default: {default})")
    return main(**vars(parser.parse_args()))


def train_with_progress(config, out_dir):
    """Run minidiff.train.train with a progress bar; returns the run folder."""
    bar = tqdm(total=config.steps, unit="step", desc=f"training on {config.data}")
    for record in train(config, out_dir, progress=True):
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
    bar.close()
    return out_dir


def digits_model(run_dir="runs/digits", steps=0, backend_name=backend.default_name(), conditional=False):
    """(model, diffusion, config, info) of a digits run: reuse `run_dir` if it holds a finished
    checkpoint (e.g. from `minidiff train`), else train the default preset there first
    (with `conditional`, the class-conditional model of `minidiff train --conditional`)."""
    backend.use_backend(backend_name)
    path = os.path.join(run_dir, checkpoint.FILENAME)
    if not os.path.exists(path):
        config = make_config("digits", backend=backend_name, conditional=conditional,
                             **({"steps": steps} if steps else {}))
        print(f"no model in {run_dir}: training one ({config.steps} steps, a few minutes on a CPU)")
        train_with_progress(config, run_dir)
    loaded = load_model(run_dir)
    if conditional and loaded[0].num_classes is None:
        raise SystemExit(f"{run_dir} holds an unconditional model: pass another --run-dir, or train one with "
                         f"'minidiff train --conditional --out {run_dir} --overwrite'")
    return loaded
