"""Classifier-free guidance benchmark: train the default preset with --conditional, sweep w.

    python benchmarks/bench_guidance.py                       # digits, the default preset + --conditional
    python benchmarks/bench_guidance.py --checkpoint runs/bench_guidance   # re-score a trained run
    python benchmarks/bench_guidance.py --quick               # a smoke test: numbers meaningless
    python benchmarks/bench_guidance.py --step-ratio          # conditional vs unconditional step time, A B A B

Trains with a fixed seed (minidiff.train.Trainer, the code of `minidiff train --conditional`), then
from the EMA weights draws --per-class samples of every class for each guidance weight w (DDIM,
--ddim-steps, the same noise for every w) and as many unconditional samples, and scores each set
with minidiff.metrics.evaluate_samples: the classifier's agreement with the requested label (per
class), its confidence, and the Frechet distance to the held-out split (the trade-off guidance
makes). Prints the guidance targets, writes the Markdown to --md, the numbers to OUT/guidance.json,
the accuracy-vs-distance plot to --plot and a `--label all` grid (w = 2) to --grid.
"""
import argparse
import json
import os
import platform
import sys
import time

from minidiff import backend, images, metrics, sampling
from minidiff import train as training
from minidiff.config import make_config

host = backend.host
TRAIN_MINUTES = 7.0   # target: the conditional digits preset trains within 7 minutes on 2 cores


def load_average():
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--checkpoint", default=None, help="skip training: score this conditional run instead")
    p.add_argument("--per-class", type=int, default=100, help="samples of each class at w = 2 and, times K, "
                                                               "unconditional samples (the guidance targets)")
    p.add_argument("--sweep-per-class", type=int, default=None,
                   help="samples of each class for the other weights (default: --per-class)")
    p.add_argument("--step-ratio", action="store_true",
                   help="only time training steps of the conditional and the unconditional preset side by side")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1000, help="images per sampling batch")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--quick", action="store_true", help="smoke test: 60 steps, 5 per class, 5 DDIM steps")
    p.add_argument("--out-dir", default="runs/bench_guidance")
    p.add_argument("--md", default=None, help="Markdown output (default OUT/GUIDANCE.md)")
    p.add_argument("--plot", default=None, help="accuracy against Frechet distance (default OUT/guidance_tradeoff.png)")
    p.add_argument("--grid", default=None, help="a --label all grid at w = 2 (default OUT/label_all.png)")
    args = p.parse_args(argv)
    if args.step_ratio:
        return step_ratio(args)
    if args.quick:
        args.steps, args.per_class, args.ddim_steps = args.steps or 60, min(args.per_class, 5), 5
    os.makedirs(args.out_dir, exist_ok=True)
    args.md = args.md or os.path.join(args.out_dir, "GUIDANCE.md")
    args.plot = args.plot or os.path.join(args.out_dir, "guidance_tradeoff.png")
    args.grid = args.grid or os.path.join(args.out_dir, "label_all.png")

    # --- train (the Trainer of `minidiff train --conditional`, without the periodic grids) or load
    load_before = load_average()
    train_seconds = None
    if args.checkpoint is None:
        overrides = {"seed": args.seed, "backend": args.backend, "conditional": True}
        if args.steps:
            overrides["steps"] = args.steps
        config = make_config("digits", **overrides)
        trainer = training.Trainer(config)
        t0 = time.perf_counter()
        for _ in range(config.steps):
            loss, _, _ = trainer.train_step()
            if trainer.step % 250 == 0 or trainer.step == config.steps:
                print(f"step {trainer.step}/{config.steps}  loss {loss:.4f}  {time.perf_counter() - t0:.0f}s  "
                      f"load {load_average()}", file=sys.stderr, flush=True)
        train_seconds = time.perf_counter() - t0
        trainer.save(os.path.join(args.out_dir, training.CHECKPOINT))
        ckpt = args.out_dir
    else:
        ckpt = args.checkpoint
    load_after_training = load_average()
    backend.use_backend(args.backend)
    model, diffusion, config, info = sampling.load_model(ckpt)
    if model.num_classes is None:
        raise SystemExit(f"{ckpt}: an unconditional model; train with --conditional")
    k = model.num_classes
    shape = (info["channels"], info["image_size"], info["image_size"])
    sweep = args.sweep_per_class or args.per_class

    # --- one set per guidance weight (same seed: the same x_T for every w), and an unconditional set
    results = []
    jobs = [(None, args.per_class)] + [(w, sweep) for w in args.weights]
    if sweep != args.per_class:   # the sweep compares equal sample sizes (the Frechet distance depends on it)
        jobs.append((2.0, args.per_class))
    for w, per_class in jobs:
        labels = sampling.every_class(k, k * per_class)
        t1 = time.perf_counter()
        x = sampling.draw_samples(diffusion, model, shape, len(labels), args.seed + 1, steps=args.ddim_steps,
                                  batch_size=args.batch_size,
                                  labels=None if w is None else labels, guidance=w or 0.0, progress=True)
        seconds = time.perf_counter() - t1
        u8 = images.to_uint8(x)
        name = "unconditional" if w is None else f"w={w:g}_{per_class}"
        host.savez_compressed(os.path.join(args.out_dir, f"samples_{name}.npz"),
                              **({"arr_0": u8} if w is None else {"arr_0": u8, "arr_1": labels}))
        report = metrics.evaluate_samples(u8, config.data, seed=args.seed, labels=None if w is None else labels)
        report.update(name=name, w=w, sample_seconds=seconds, per_class=per_class)
        results.append(report)
        print(f"\n== {name} ({seconds:.0f}s)\n{metrics.format_report(report)}", flush=True)
        if w == 2.0 and per_class == args.per_class:   # the first (up to) 10 of every class, one row per class
            cols = min(10, per_class)
            first = host.concatenate([u8[c * per_class:c * per_class + cols] for c in range(k)])
            images.save_grid(first, args.grid, nrow=cols)
    uncond, guided = results[0], [r for r in results[1:] if r["per_class"] == sweep]

    # --- the trade-off plot: accuracy against Frechet distance, one point per w (in the order given)
    images.plot_curve([r["metrics"]["frechet_distance"]["samples"] for r in guided],
                      [r["label_agreement"]["mean"] for r in guided], args.plot,
                      title="the line runs through w = " + " -> ".join(f"{w:g}" for w in args.weights)
                            + " (the table has the numbers)", xlabel="Frechet distance to held-out digits (classifier features)",
                      ylabel="classified as the requested label")

    # --- the Markdown
    fd_floor = uncond["metrics"]["frechet_distance"]["floor"]
    md = [f"Written by `benchmarks/bench_guidance.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
          + (" (QUICK SMOKE RUN: not a result)" if args.quick else "") + ". "
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, backend {args.backend}; "
          f"load average (1/5/15 min) {load_before} before, {load_after_training} after training, "
          f"{load_average()} at the end.",
          ("Training: " + (f"{config.steps} steps of batch {config.batch_size} in {train_seconds / 60:.1f} min"
                           if train_seconds is not None else f"loaded from {ckpt}")
           + f" (digits preset + --conditional, p_uncond {config.p_uncond}, seed {config.seed})."),
          f"Samples: {args.per_class} per class ({k * args.per_class} in all) for the targets at w = 2"
          + (f"; {sweep} per class for every w of the sweep table" if sweep != args.per_class else " and every w")
          + f", DDIM {args.ddim_steps} steps (eta 0), the same x_T for every w (the first ones); unconditional: "
          f"{k * args.per_class} samples with the same x_T. "
          f"Fréchet distance floor (real training images vs held-out): {fd_floor:.2f}.",
          "",
          "| w | classified as the label (mean over classes) | worst class | confidence >= 0.9 | "
          "Fréchet distance | recall | sampling (s) |",
          "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in guided:
        m = r["metrics"]
        agree = r["label_agreement"]
        md.append(f"| {r['w']:g} | {agree['mean']:.3f} | {agree['min']:.3f} | "
                  f"{m['fraction_confident']['samples']:.3f} | {m['frechet_distance']['samples']:.2f} | "
                  f"{m['recall']['samples']:.3f} | {r['sample_seconds']:.0f} |")
    m = uncond["metrics"]
    md.append(f"| no label ({uncond['num_samples']} samples) | | | {m['fraction_confident']['samples']:.3f} | {m['frechet_distance']['samples']:.2f} | "
              f"{m['recall']['samples']:.3f} | {uncond['sample_seconds']:.0f} |")
    at2 = next((r for r in results[1:] if r["w"] == 2.0 and r["per_class"] == args.per_class), None)
    targets = []
    if train_seconds is not None:
        targets.append((f"trained within {TRAIN_MINUTES:g} minutes", f"{train_seconds / 60:.1f} min",
                        train_seconds <= TRAIN_MINUTES * 60))
    if at2 is not None:
        agree = at2["label_agreement"]
        targets += [("w = 2: classified as the label >= 95% on average", f"{agree['mean']:.3f}", agree["mean"] >= 0.95),
                    ("w = 2: >= 85% for every class", f"{agree['min']:.3f}", agree["min"] >= 0.85),
                    ("w = 2: >= 90% with confidence >= 0.9", f"{at2['metrics']['fraction_confident']['samples']:.3f}",
                     at2["metrics"]["fraction_confident"]["samples"] >= 0.9)]
    lo, hi = m["class_min_fraction"]["samples"], m["class_max_fraction"]["samples"]
    targets.append(("unconditional: every class between 5% and 15%", f"{lo:.3f} .. {hi:.3f}", lo >= 0.05 and hi <= 0.15))
    md += ["", "| target | measured | |", "|---|---:|---|"]
    md += [f"| {text} | {value} | {'pass' if ok else 'MISS'} |" for text, value, ok in targets]
    if at2 is not None:
        per = " ".join(f"{c}: {v['agreement']:.2f}" for c, v in at2["label_agreement"]["per_class"].items())
        md += ["", f"w = 2, per class: {per}"]
    hist = " ".join(f"{h:.3f}" for h in uncond["class_histogram"]["samples"])
    md += ["", f"Unconditional class histogram (0-9): {hist}"]
    text = "\n".join(md) + "\n"
    with open(args.md, "w") as f:
        f.write(text)
    with open(os.path.join(args.out_dir, "guidance.json"), "w") as f:
        json.dump({"train_seconds": train_seconds, "reports": results}, f, indent=2)
    print("\n" + text)
    print(f"wrote {args.md}, {args.plot}, {args.grid} and {args.out_dir}/guidance.json", file=sys.stderr)


def step_ratio(args, warmup=2, block=5, rounds=3):
    """Seconds per training step of the digits preset with and without --conditional, measured in
    alternating blocks (A B A B) on the same machine at the same time; the best block of each is kept."""
    times = {False: [], True: []}
    trainers = {c: training.Trainer(make_config("digits", seed=args.seed, conditional=c))
                for c in (False, True)}
    for trainer in trainers.values():
        for _ in range(warmup):
            trainer.train_step()
    for _ in range(rounds):
        for conditional, trainer in trainers.items():
            t0 = time.perf_counter()
            for _ in range(block):
                trainer.train_step()
            times[conditional].append((time.perf_counter() - t0) / block)
    plain, cond = min(times[False]), min(times[True])
    print(f"digits preset, {rounds} alternating blocks of {block} steps, best block; load average {load_average()}")
    print(f"unconditional {plain * 1000:.0f} ms/step, conditional {cond * 1000:.0f} ms/step, ratio {cond / plain:.3f}")
    print(f"all blocks (ms/step): unconditional {[round(t * 1000) for t in times[False]]}, "
          f"conditional {[round(t * 1000) for t in times[True]]}")


if __name__ == "__main__":
    main()
