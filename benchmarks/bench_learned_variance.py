"""Learned variances (Improved DDPM) against the paper's fixed one, on the digits: bits/dim and ancestral quality.

    minidiff train --out runs/digits                                       # fixed sigma_t^2 = beta_t (default)
    minidiff train --learn-sigma --out runs/digits-sigma                   # learned_range + hybrid loss
    minidiff train --learn-sigma --timestep-sampler importance --out runs/digits-importance
    python benchmarks/bench_learned_variance.py --run fixed=runs/digits --run learned=runs/digits-sigma \\
        --run importance=runs/digits-importance --md runs/bench_learned_variance.md
    python benchmarks/bench_learned_variance.py --run fixed=runs/digits --quick        # a smoke test

For each run (its EMA weights, minidiff.sampling.load_model): bits/dim of the variational bound on the
held-out split with all T steps (minidiff.metrics.eval_likelihood, as `minidiff eval --bpd`), and the
quality of ancestral sampling (Algorithm 2) on the chain respaced to each of --steps (25 50 100 1000:
diffusion.respaced(n), whose learned_range variance spans the respaced chain's own beta and beta_tilde),
--num samples scored by minidiff.metrics.evaluate_samples against the held-out split (Frechet distance
in the classifier's feature space, its confidence). --time-steps N also times N training steps of each
run's config side by side (A B C A B C, fresh Trainers, the same batch), so that "equal training time"
can be read from equal step counts. Prints the table, the targets and the machine; writes Markdown to
--md and the numbers to --json.
"""
import argparse
import json
import os
import sys
import time

from bench_samplers import load_average, machine

from minidiff import backend, data, images, metrics, sampling
from minidiff.config import build_diffusion
from minidiff.train import Trainer

host = backend.host


def draw_ancestral(diffusion, model, num_steps, chw, num, seed, batch_size):
    """(samples on the host, seconds): Algorithm 2 on the chain respaced to num_steps; batch i seeded [seed, i]."""
    chain = diffusion if num_steps == diffusion.num_timesteps else diffusion.respaced(num_steps)
    chunks, began = [], time.perf_counter()
    for i, start in enumerate(range(0, num, batch_size)):
        x = chain.p_sample_loop(model, (min(batch_size, num - start), *chw), seed=[seed, i], clip_denoised=True)
        chunks.append(backend.to_numpy(x))
    return host.concatenate(chunks), time.perf_counter() - began


def time_training(configs, steps, rounds=3):
    """Seconds per training step of each config, measured in alternation (A B C A B C ...) in one process."""
    trainers = {name: Trainer(cfg) for name, cfg in configs.items()}
    for trainer in trainers.values():   # warm-up: the first steps allocate
        trainer.train_step()
    spent = {name: 0.0 for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            began = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            spent[name] += time.perf_counter() - began
    return {name: s / (rounds * steps) for name, s in spent.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=RUN",
                   help="a training run folder (or checkpoint) and its name in the table; repeat")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 1000],
                   help="respaced ancestral steps to score (default: 25 50 100 1000)")
    p.add_argument("--num", type=int, default=1000, help="samples per row (default 1000)")
    p.add_argument("--bpd-num", type=int, default=0, help="held-out images for bits/dim (0: the whole split)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-steps", type=int, default=0, help="also time this many training steps per config")
    p.add_argument("--time-only", action="store_true", help="only the side-by-side training step times")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 samples, 32 bpd images, steps 10 25")
    p.add_argument("--md", help="write the Markdown tables here")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.num, args.bpd_num, args.steps = 64, 32, [10, 25]
    runs = {}
    for item in args.run:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--run takes NAME=RUN, got {item!r}")
        runs[name] = path
    print(f"machine: {machine()}; load average {load_average()}", file=sys.stderr)

    rows, bpd, configs = [], {}, {}
    for name, path in runs.items():
        model, diffusion, config, info = sampling.load_model(path)
        configs[name] = config
        if args.time_only:
            continue
        heldout, _, data_info = data.load_images(config.data, "heldout", image_size=info["image_size"],
                                                 channels=info["channels"])
        if args.bpd_num:
            heldout = heldout[:args.bpd_num]
        began = time.perf_counter()
        likelihood = metrics.eval_likelihood(model, build_diffusion(config, num_bins=data_info["grey_levels"]),
                                             heldout, args.batch_size, args.seed)
        bpd[name] = {**likelihood, "seconds": round(time.perf_counter() - began, 1),
                     "var_type": config.var_type, "loss_type": config.loss_type,
                     "timestep_sampler": config.timestep_sampler, "train_steps": config.steps}
        print(f"{name}: {likelihood['bits_per_dim']:.4f} bits/dim ({bpd[name]['seconds']} s)", file=sys.stderr)
        chw = (info["channels"], info["image_size"], info["image_size"])
        for n in args.steps:
            samples, seconds = draw_ancestral(diffusion, model, n, chw, args.num, args.seed, args.batch_size)
            report = metrics.evaluate_samples(images.to_uint8(samples), config.data, seed=args.seed)
            row = {"run": name, "steps": n, "num": args.num, "seconds": round(seconds, 1),
                   "frechet_distance": report["metrics"]["frechet_distance"]["samples"],
                   "confidence": report["metrics"]["mean_confidence"]["samples"],
                   "floor_frechet_distance": report["metrics"]["frechet_distance"]["floor"]}
            rows.append(row)
            print(f"  {n:>5} steps: FD {row['frechet_distance']:.3f} conf {row['confidence']:.4f} ({row['seconds']} s)",
                  file=sys.stderr)
    timing = time_training(configs, args.time_steps) if args.time_steps else None

    lines = [f"Machine: {machine()}; load average at the end {load_average()}.", "",
             "| run | variance | loss | t sampler | train steps | bits/dim (held-out, T steps) | ± s.e. | L_0 | L_T |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, b in bpd.items():
        lines.append(f"| {name} | {b['var_type']} | {b['loss_type']} | {b['timestep_sampler']} | {b['train_steps']} | "
                     f"{b['bits_per_dim']:.4f} | {b['bits_per_dim_stderr']:.4f} | {b['decoder_bpd']:.4f} | "
                     f"{b['prior_bpd']:.5f} |")
    lines += ["", f"Ancestral sampling (Algorithm 2) on the respaced chain, {args.num} samples per cell: "
                  "Frechet distance in the classifier's feature space (lower is better) / mean confidence.", "",
              "| run | " + " | ".join(f"{n} steps" for n in args.steps) + " |",
              "|---|" + "---|" * len(args.steps)]
    for name in runs:
        cells = [r for r in rows if r["run"] == name]
        lines.append(f"| {name} | " + " | ".join(f"{r['frechet_distance']:.2f} / {r['confidence']:.4f}" for r in cells)
                     + " |")
    if timing:
        base = next(iter(timing.values()))
        lines += ["", "Training step time, measured side by side: " + ", ".join(
            f"{name} {1000 * s:.0f} ms ({s / base:.3f}x)" for name, s in timing.items())]
    names = list(runs)
    if len(names) >= 2 and not args.time_only and 50 in args.steps and args.num and 1000 in args.steps:
        fixed, learned = names[0], names[1]
        fd = {(r["run"], r["steps"]): r["frechet_distance"] for r in rows}
        lines += ["", "Targets (the second run against the first):",
                  f"- bits/dim lower: {bpd[learned]['bits_per_dim']:.4f} vs {bpd[fixed]['bits_per_dim']:.4f} -> "
                  f"{'met' if bpd[learned]['bits_per_dim'] < bpd[fixed]['bits_per_dim'] else 'MISSED'}",
                  f"- FD at 50 respaced steps lower: {fd[(learned, 50)]:.2f} vs {fd[(fixed, 50)]:.2f} -> "
                  f"{'met' if fd[(learned, 50)] < fd[(fixed, 50)] else 'MISSED'}",
                  f"- DDPM-1000 FD within 5%: {fd[(learned, 1000)]:.2f} vs {fd[(fixed, 1000)]:.2f} "
                  f"({100 * (fd[(learned, 1000)] / fd[(fixed, 1000)] - 1):+.1f}%) -> "
                  f"{'met' if fd[(learned, 1000)] <= 1.05 * fd[(fixed, 1000)] else 'MISSED'}"]
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bpd": bpd, "rows": rows, "timing": timing, "machine": machine()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
