"""Quality benchmark: train the default preset from scratch, sample, and score every metric.

    python benchmarks/bench_quality.py                   # digits: the default `minidiff train` run
    python benchmarks/bench_quality.py --preset mnist --steps 30000 --backend cupy
    python benchmarks/bench_quality.py --quick           # a smoke test: minutes, numbers meaningless

Trains with a fixed seed (minidiff.train.Trainer, the same code as `minidiff train`),
draws --num samples from the EMA weights with DDPM (all T steps, Algorithm 2) and with
DDIM (--ddim-steps), scores each with minidiff.metrics.evaluate_samples against the
held-out split (every metric beside its real-data floor), checks the quality targets,
prints the tables and writes them to --md (default BENCHMARKS_QUALITY.md). The run's
checkpoint and the samples (.npz, uint8 NHWC) are kept in --out-dir, so `minidiff eval`
can re-score them.
"""
import argparse
import json
import os
import platform
import sys
import time

from minidiff import backend, images, metrics
from minidiff import train as training
from minidiff.config import PRESETS, build_diffusion, make_config

host = backend.host

# The quality targets for the default digits run, as (metric, test, threshold, wording).
TARGETS = [
    ("fraction_confident", lambda v, m: v >= 0.85, "confidence >= 0.9 for at least 85% of samples"),
    ("class_min_fraction", lambda v, m: v >= 0.05, "every class at least 5% of samples"),
    ("class_max_fraction", lambda v, m: v <= 0.15, "every class at most 15% of samples"),
    ("precision", lambda v, m: v >= 0.75, "precision >= 0.75"),
    ("recall", lambda v, m: v >= 0.8, "recall >= 0.8"),
    ("memorized", lambda v, m: v <= 0.02, "memorised <= 2%"),
    ("frechet_distance", lambda v, m: v <= 2 * m["frechet_distance"]["floor"],
     "Frechet distance <= 2x the train-vs-held-out floor"),
]


def check_targets(report):
    """[(wording, value, passed)] for the quality targets."""
    m = report["metrics"]
    return [(text, m[key]["samples"], bool(test(m[key]["samples"], m))) for key, test, text in TARGETS]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--num", type=int, default=1000, help="samples per sampler (the targets are stated at 1000)")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--no-ddpm", action="store_true", help="skip the 1000-step DDPM sampler (slow on a CPU)")
    p.add_argument("--bpd", action="store_true",
                   help="also bits/dim on the held-out split (T model calls per batch: ~10 min for digits on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--quick", action="store_true", help="smoke test: 100 steps, 128 samples")
    p.add_argument("--out-dir", default="runs/bench_quality")
    p.add_argument("--md", default="BENCHMARKS_QUALITY.md")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.num = args.steps or 100, min(args.num, 128)
        if args.md == "BENCHMARKS_QUALITY.md":
            args.md = os.path.join(args.out_dir, "BENCHMARKS_QUALITY_quick.md")

    overrides = {"seed": args.seed, "backend": args.backend}
    if args.steps:
        overrides["steps"] = args.steps
    config = make_config(args.preset, **overrides)
    os.makedirs(args.out_dir, exist_ok=True)

    # --- train (the same Trainer as `minidiff train`, without the periodic grids)
    trainer = training.Trainer(config)
    t0 = time.perf_counter()
    for _ in range(config.steps):
        loss, _, _ = trainer.train_step()
        if trainer.step % 500 == 0 or trainer.step == config.steps:
            print(f"step {trainer.step}/{config.steps}  loss {loss:.4f}  {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr, flush=True)
    train_seconds = time.perf_counter() - t0
    trainer.save(os.path.join(args.out_dir, training.CHECKPOINT))
    dataset = config.data

    # --- sample with the EMA weights and score
    samplers = [("DDIM", args.ddim_steps, args.ddim_steps)]  # (name, steps for Trainer.sample, steps shown)
    if not args.no_ddpm:
        samplers.insert(0, ("DDPM", 0, config.num_timesteps))
    results = []
    for name, steps, shown in samplers:
        t1 = time.perf_counter()
        x = trainer.sample(args.num, seed=args.seed + 1, steps=steps, progress=True)
        sample_seconds = time.perf_counter() - t1
        u8 = images.to_uint8(x)
        host.savez_compressed(os.path.join(args.out_dir, f"samples_{name.lower()}.npz"), u8)
        images.save_grid(u8[:100], os.path.join(args.out_dir, f"samples_{name.lower()}.png"))
        report = metrics.evaluate_samples(u8, dataset, seed=args.seed)
        report.update(sampler=f"{name} {shown} steps", sample_seconds=sample_seconds)
        results.append(report)
        print(f"\n== {name} ({shown} steps, {sample_seconds:.0f}s)\n{metrics.format_report(report)}", flush=True)

    bpd = None
    if args.bpd:
        from minidiff import data
        with trainer.ema.swapped(trainer.model):
            trainer.model.eval()
            held, _ = data.load_dataset(dataset, "heldout")
            bpd_diffusion = build_diffusion(trainer.config, num_bins=data.grey_levels(dataset))
            bpd = metrics.eval_likelihood(trainer.model, bpd_diffusion, held, 256, args.seed, progress=True)

    # --- the Markdown table
    title = f"# Sample quality of the `{args.preset}` preset"
    md = [title + (" (QUICK SMOKE RUN: not a result)" if args.quick else ""),
          "",
          f"Written by `benchmarks/bench_quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, backend {args.backend}.",
          f"Training: {config.steps} steps of batch {config.batch_size} in {train_seconds / 60:.1f} min "
          f"(seed {args.seed}; lr {config.lr}, EMA {config.ema_decay}, ch {config.ch}, ch_mult {list(config.ch_mult)}).",
          f"Samples: {args.num} per sampler from the EMA weights; floor = as many real training images "
          f"(mean ± sd of {results[0]['floor_repeats']} draws), compared with the {results[0]['num_heldout']} "
          f"held-out images the same way; per-image rows' floor = the held-out images themselves. "
          f"Classifier held-out accuracy {results[0]['classifier_heldout_accuracy']:.3f}. See docs/METRICS.md.",
          "", "| metric | " + " | ".join(r["sampler"] for r in results) + " | real (floor) | better |",
          "|---|" + "---:|" * len(results) + "---:|---|"]
    for key, v in results[0]["metrics"].items():
        floor = f"{v['floor']:.4f}" + (f" ± {v['floor_std']:.4f}" if v.get("floor_std") else "")
        cells = " | ".join(f"{r['metrics'][key]['samples']:.4f}" for r in results)
        md.append(f"| {metrics._DESCRIPTIONS.get(key, key)} | {cells} | {floor} | {v['better']} |")
    times = " | ".join(f"{r['sample_seconds']:.1f}" for r in results)
    md.append(f"| sampling wall time (s) | {times} | | |")
    if bpd:
        md += ["", f"Bits/dim on the {bpd['num_images']} held-out images ({bpd['grey_levels']} grey levels): "
                   f"{bpd['bits_per_dim']:.3f} ± {bpd['bits_per_dim_stderr']:.3f}"]
    md += ["", "The quality targets:", "", "| target | " + " | ".join(r["sampler"] for r in results) + " |",
           "|---|" + "---|" * len(results)]
    checks = [check_targets(r) for r in results]
    for i, (text, _, _) in enumerate(checks[0]):
        cells = " | ".join(f"{c[i][1]:.3f} {'pass' if c[i][2] else 'FAIL'}" for c in checks)
        md.append(f"| {text} | {cells} |")
    for r in results:
        hist = " ".join(f"{h:.3f}" for h in r["class_histogram"]["samples"])
        md += ["", f"{r['sampler']} class histogram (0-9): {hist}"]
    text = "\n".join(md) + "\n"
    with open(args.md, "w") as f:
        f.write(text)
    with open(os.path.join(args.out_dir, "quality.json"), "w") as f:
        json.dump({"train_seconds": train_seconds, "steps": config.steps, "reports": results, "bpd": bpd}, f,
                  indent=2)
    print("\n" + text)
    print(f"wrote {args.md} and {args.out_dir}/quality.json", file=sys.stderr)


if __name__ == "__main__":
    main()
