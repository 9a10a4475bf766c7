"""Choose a preset's training knobs by the metrics: one training run, scored at several steps.

    python benchmarks/sweep_preset.py --steps 6000 --eval-at 3000 4000 5000 6000
    python benchmarks/sweep_preset.py --set ema_decay=0.999 --set batch_size=96 --steps 5000 --eval-at 4000 5000

Trains the `digits` preset (plus --set overrides, any TrainConfig field) with a fixed seed
through minidiff.train.Trainer, the code of `minidiff train`. At each --eval-at step it
draws --num samples from the EMA weights with DDIM (--ddim-steps, eta 0) and scores them
with minidiff.metrics against the held-out split. The learning rate is constant after
warmup and the EMA does not know the run's length, so the weights at step k are those of
a k-step run: one long run answers "how many steps" for every k at once. Prints one table
row per evaluation (and appends it as JSON to --jsonl), with the training time so far.
"""
import argparse
import dataclasses
import json
import sys
import time

from minidiff import images, metrics
from minidiff import train as training
from minidiff.config import PRESETS, TrainConfig, make_config


def parse_override(text, fields):
    """'name=value' -> (name, value) typed like the TrainConfig field."""
    name, sep, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in fields:
        raise SystemExit(f"--set expects NAME=VALUE with NAME a training option; got {text!r}")
    default = fields[name].default
    if isinstance(default, bool):
        value = raw.lower() in ("1", "true", "yes", "on")
    elif isinstance(default, tuple):
        value = tuple(int(v) for v in raw.replace(",", " ").split())
    else:
        value = type(default)(raw)
    return name, value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a training option")
    p.add_argument("--steps", type=int, required=True, help="training steps of the run")
    p.add_argument("--eval-at", type=int, nargs="+", required=True, help="steps at which to score the EMA weights")
    p.add_argument("--num", type=int, default=1000, help="samples per evaluation")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jsonl", default=None, help="append each row as JSON to this file")
    args = p.parse_args(argv)

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    overrides = dict(parse_override(s, fields) for s in args.set)
    config = make_config(args.preset, seed=args.seed, steps=args.steps, **overrides)
    label = " ".join(args.set) or "preset"
    evals = sorted(set(k for k in args.eval_at if 0 < k <= args.steps))
    if not evals:
        raise SystemExit(f"--eval-at needs steps between 1 and --steps ({args.steps})")

    trainer = training.Trainer(config)
    train_seconds = 0.0
    print("| run | step | train min | confident >= 0.9 | precision | recall | Frechet (floor) | "
          "min / max class share |", flush=True)
    print("|---|---:|---:|---:|---:|---:|---:|---|", flush=True)
    for k in evals:
        t0 = time.perf_counter()
        while trainer.step < k:
            trainer.train_step()
            if trainer.step % 500 == 0:
                print(f"step {trainer.step}: {train_seconds + time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        train_seconds += time.perf_counter() - t0
        x = trainer.sample(args.num, seed=args.seed + 1, steps=args.ddim_steps)
        report = metrics.evaluate_samples(images.to_uint8(x), config.data, seed=args.seed)
        m = report["metrics"]
        row = dict(run=label, step=k, train_minutes=train_seconds / 60,
                   **{key: m[key]["samples"] for key in ("fraction_confident", "precision", "recall",
                                                         "frechet_distance", "class_min_fraction",
                                                         "class_max_fraction")},
                   frechet_floor=m["frechet_distance"]["floor"])
        print(f"| {label} | {k} | {row['train_minutes']:.1f} | {row['fraction_confident']:.3f} | "
              f"{row['precision']:.3f} | {row['recall']:.3f} | {row['frechet_distance']:.1f} "
              f"({row['frechet_floor']:.1f}) | {row['class_min_fraction']:.3f} / {row['class_max_fraction']:.3f} |",
              flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"config: {json.dumps(dataclasses.asdict(config), default=str)}", file=sys.stderr)


if __name__ == "__main__":
    main()
