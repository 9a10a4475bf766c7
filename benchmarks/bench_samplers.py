"""Few-step samplers benchmark: quality against network calls on a trained checkpoint.

    python benchmarks/bench_samplers.py --checkpoint runs/digits          # the default digits run
    python benchmarks/bench_samplers.py --checkpoint runs/digits --md runs/bench_samplers.md
    python benchmarks/bench_samplers.py --checkpoint runs/digits --no-ddpm   # skip the 1000-step reference
    python benchmarks/bench_samplers.py --checkpoint runs/digits --quick     # a smoke test: numbers meaningless

Loads the checkpoint's EMA weights (minidiff.sampling.load_model) and, for each sampler (DDIM eta 0,
DPM-Solver++ order 2 and 3, Karras Euler and Heun) and each budget of network calls (--calls,
default 5 10 20 50 100), draws --num samples with a fixed seed in batches of --batch-size (batch i
seeded [seed, i], as minidiff.sampling.draw_samples does), times them, and scores them with
minidiff.metrics.evaluate_samples against the held-out split (as benchmarks/bench_quality.py does).
Network calls are counted by wrapping the model, and the table shows the measured count per chain
(Heun with n steps costs 2n - 1 calls: a budget of C calls runs n = (C + 1) // 2 steps). DDPM with
all T steps (Algorithm 2) is the reference line (--no-ddpm skips it). Prints the table and the
targets, writes the Markdown to --md, the numbers to OUT/samplers.json, and the Frechet distance
against network calls to --plot (matplotlib if installed, else pillow).
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

from minidiff import backend, images, metrics, sampling

host = backend.host
SAMPLERS = ("ddim", "dpm2", "dpm3", "euler", "heun")
NAMES = {"ddim": "DDIM (eta 0)", "dpm2": "DPM-Solver++ order 2", "dpm3": "DPM-Solver++ order 3",
         "euler": "Euler (Karras)", "heun": "Heun (Karras)", "ddpm": "DDPM"}
METHODS = {"ddim": "ddim_sample_loop", "dpm2": "dpm_solver_sample_loop", "dpm3": "dpm_solver_sample_loop",
           "euler": "karras_sample_loop", "heun": "karras_sample_loop", "ddpm": "p_sample_loop"}


class CountingModel:
    """model(x, t, **kw) that counts its calls; every other attribute is the wrapped model's."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, **kwargs):
        self.calls += 1
        return self.model(x, t, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def steps_for(sampler, budget):
    """The sampler's num_steps for a budget of network calls (Heun: 2n - 1 calls for n steps)."""
    return (budget + 1) // 2 if sampler == "heun" else budget


def run_chain(diffusion, model, sampler, shape, steps, seed):
    """One batch of samples from `sampler` with `steps` steps (ddpm: all T)."""
    common = dict(seed=seed, clip_denoised=True)
    if sampler == "ddim":
        return diffusion.ddim_sample_loop(model, shape, num_steps=steps, eta=0.0, **common)
    if sampler in ("dpm2", "dpm3"):
        return diffusion.dpm_solver_sample_loop(model, shape, num_steps=steps, order=int(sampler[-1]), **common)
    if sampler in ("euler", "heun"):
        return diffusion.karras_sample_loop(model, shape, num_steps=steps, solver=sampler, **common)
    if sampler == "ddpm":
        return diffusion.p_sample_loop(model, shape, **common)
    raise ValueError(f"unknown sampler {sampler!r}")


def draw(diffusion, model, sampler, steps, chw, num, seed, batch_size):
    """(samples as a host array, network calls per chain, seconds): batch i seeded [seed, i]."""
    counter = CountingModel(model)
    chunks, per_batch = [], []
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, num, batch_size)):
        before = counter.calls
        x = run_chain(diffusion, counter, sampler, (min(batch_size, num - start), *chw), steps, [seed, i])
        chunks.append(backend.to_numpy(x))  # host copy (GPU sync) inside the timing
        per_batch.append(counter.calls - before)
    seconds = time.perf_counter() - t0
    if len(set(per_batch)) != 1:
        raise RuntimeError(f"{sampler}: network calls differ between batches: {per_batch}")
    return host.concatenate(chunks), per_batch[0], seconds


def machine():
    """lscpu's model name, and the CPU/thread counts."""
    model_name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model_name = fields.get("Model name", model_name)
        threads = (f"{fields.get('CPU(s)', os.cpu_count())} CPUs ({fields.get('Thread(s) per core', '?')} "
                   f"thread(s) per core)")
    except (OSError, subprocess.SubprocessError, ValueError):
        threads = f"{os.cpu_count()} CPUs"
    env = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                    if k in os.environ)
    return f"{model_name}, {threads}" + (f", {env}" if env else "") + f", {len(os.sched_getaffinity(0))} usable"


def load_average():
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


# ---------------------------------------------------------------- the plot

def plot(rows, ddpm, path, title):
    """Frechet distance against network calls (log x), one line per sampler, DDPM-T a horizontal line."""
    series = {}
    for r in rows:
        if r["sampler"] != "ddpm" and r.get("frechet_distance") is not None:
            series.setdefault(r["sampler"], []).append((r["calls"], r["frechet_distance"]))
    ref = ddpm["frechet_distance"] if ddpm and ddpm.get("frechet_distance") is not None else None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pillow(series, ref, ddpm, path, title)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, pts in series.items():
        ax.plot(*zip(*pts), marker="o", label=NAMES[name])
    if ref is not None:
        ax.axhline(ref, color="black", linestyle="--", label=f"DDPM-{ddpm['calls']}")
    ax.set_xscale("log")
    ax.set_xlabel("network calls")
    ax.set_ylabel("Frechet distance (classifier features)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_pillow(series, ref, ddpm, path, title, size=(720, 440)):
    from PIL import Image, ImageDraw
    s = images.SUPERSAMPLE
    width, height = size[0] * s, size[1] * s
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, title_font = images._font(11 * s), images._font(14 * s)
    box = (70 * s, 36 * s, width - 190 * s, height - 50 * s)
    xs = [c for pts in series.values() for c, _ in pts]
    ys = [v for pts in series.values() for _, v in pts if math.isfinite(v) and v > 0]
    if ref is not None and ref > 0:
        ys.append(ref)
    if not xs or not ys:
        draw.text((width / 2, height / 2), "no finite data to plot", fill="black", font=title_font, anchor="mm")
    else:
        xlo, xhi = min(xs) / 1.15, max(xs) * 1.15
        ylo, yhi = min(ys), max(ys)
        log_y = yhi / ylo > 3   # a few-call outlier would flatten the interesting part
        if log_y:
            ylo, yhi = ylo / 1.2, yhi * 1.2
            yticks = images._log_ticks(ylo, yhi)
        else:
            margin = 0.05 * (yhi - ylo) or 0.5 * (abs(ylo) or 1)
            ylo, yhi = max(0.0, ylo - margin), yhi + margin
            yticks = [t for t in images.nice_ticks(ylo, yhi) if ylo <= t <= yhi]
        x0, y0, x1, y1 = box

        def px(x, y):
            fy = (math.log10(y) - math.log10(ylo)) / (math.log10(yhi) - math.log10(ylo)) if log_y \
                else (y - ylo) / (yhi - ylo)
            fx = (math.log10(x) - math.log10(xlo)) / (math.log10(xhi) - math.log10(xlo))
            return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

        xticks = sorted({c for c in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if xlo <= c <= xhi})
        for t in xticks:
            x, _ = px(t, ylo)
            draw.line([(x, y0), (x, y1)], fill="#e6e6e6", width=s)
            draw.line([(x, y1), (x, y1 + 5 * s)], fill="black", width=s)
            draw.text((x, y1 + 7 * s), images._fmt(t), fill="black", font=font, anchor="mt")
        for t in yticks:
            _, y = px(xlo, t)
            draw.line([(x0, y), (x1, y)], fill="#e6e6e6", width=s)
            draw.line([(x0 - 5 * s, y), (x0, y)], fill="black", width=s)
            draw.text((x0 - 7 * s, y), images._fmt(t), fill="black", font=font, anchor="rm")
        draw.rectangle(box, outline="black", width=s)
        legend = []
        if ref is not None and ref > 0:
            _, y = px(xlo, ref)
            for a in range(int(x0), int(x1), 12 * s):   # dashed
                draw.line([(a, y), (min(a + 7 * s, x1), y)], fill="black", width=2 * s)
            legend.append((f"DDPM-{ddpm['calls']} ({ref:.2f})", "black", True))
        for k, (name, pts) in enumerate(series.items()):
            color = images.PALETTE[k % len(images.PALETTE)]
            points = [px(c, v) for c, v in pts if math.isfinite(v) and v > 0]
            if len(points) > 1:
                draw.line(points, fill=color, width=2 * s, joint="curve")
            for x, y in points:
                r = 3 * s
                draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
            legend.append((NAMES[name], color, False))
        for k, (text, color, dashed) in enumerate(legend):
            ly = y0 + (10 + 20 * k) * s
            lx = x1 + 12 * s
            if dashed:
                draw.line([(lx, ly), (lx + 8 * s, ly)], fill=color, width=2 * s)
                draw.line([(lx + 13 * s, ly), (lx + 21 * s, ly)], fill=color, width=2 * s)
            else:
                draw.line([(lx, ly), (lx + 21 * s, ly)], fill=color, width=2 * s)
                draw.ellipse((lx + 8 * s, ly - 3 * s, lx + 14 * s, ly + 3 * s), fill=color)
            draw.text((lx + 27 * s, ly), text, fill="black", font=font, anchor="lm")
        ylabel = "Frechet distance (classifier features)" + (" (log)" if log_y else "")
        label = Image.new("RGB", (y1 - y0, 16 * s), "white")        # y label, rotated
        ImageDraw.Draw(label).text((label.width / 2, 0), ylabel, fill="black", font=font, anchor="mt")
        image.paste(label.rotate(90, expand=True), (4 * s, y0))
        draw.text(((x0 + x1) / 2, height - 8 * s), "network calls per sample (log)", fill="black", font=font,
                  anchor="md")
    draw.text((width / 2, 10 * s), title, fill="black", font=title_font, anchor="mt")
    image = image.resize(size, Image.LANCZOS)
    image.save(path)


# ---------------------------------------------------------------- the targets

def find(rows, sampler, budget):
    return next((r for r in rows if r["sampler"] == sampler and r["budget"] == budget
                 and r.get("frechet_distance") is not None), None)


def check_targets(rows, ddpm):
    """[(wording, measured, verdict)]: verdict 'pass', 'MISS' or 'n/a (why)'."""
    out = []
    text = ("DPM-Solver++ (order 2) at 20 calls: Frechet distance within 5% of DDPM-1000's "
            "(at most 1.05x) and mean confidence within one point (0.01) of it (at least ref - 0.01)")
    dpm20 = find(rows, "dpm2", 20)
    if ddpm is None or ddpm.get("frechet_distance") is None:
        out.append((text, "", "n/a (no DDPM reference)"))
    elif dpm20 is None:
        out.append((text, "", "n/a (no DPM-Solver++ order 2 at 20 calls)"))
    else:
        fd, fd_ref = dpm20["frechet_distance"], ddpm["frechet_distance"]
        conf, conf_ref = dpm20["mean_confidence"], ddpm["mean_confidence"]
        rel = fd / fd_ref - 1
        ok_fd, ok_conf = fd <= 1.05 * fd_ref, conf >= conf_ref - 0.01
        measured = (f"FD {fd:.3f} vs {fd_ref:.3f} ({rel:+.1%}, {'ok' if ok_fd else 'over'}); "
                    f"confidence {conf:.4f} vs {conf_ref:.4f} ({conf - conf_ref:+.4f}, {'ok' if ok_conf else 'under'})")
        out.append((text, measured, "pass" if ok_fd and ok_conf else "MISS"))
    ddim50 = find(rows, "ddim", 50)
    for order in (2, 3):
        text = f"DPM-Solver++ (order {order}) at 10 calls beats DDIM-50 (lower Frechet distance)"
        dpm10 = find(rows, f"dpm{order}", 10)
        if dpm10 is None or ddim50 is None:
            out.append((text, "", "n/a (" + ("no DDIM-50" if ddim50 is None else f"no order {order} at 10 calls")
                        + ")"))
            continue
        fd, fd_ref = dpm10["frechet_distance"], ddim50["frechet_distance"]
        out.append((text, f"FD {fd:.3f} vs {fd_ref:.3f} ({fd / fd_ref - 1:+.1%})", "pass" if fd < fd_ref else "MISS"))
    return out


# ---------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training run folder or checkpoint file")
    p.add_argument("--num", type=int, default=1000, help="samples per point (the targets are stated at 1000)")
    p.add_argument("--calls", type=int, nargs="+", default=[5, 10, 20, 50, 100], help="network-call budgets")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--no-ddpm", action="store_true", help="skip the all-T-steps DDPM reference (slow on a CPU)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="sampling streams [seed, i] and the metrics' seed")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--quick", action="store_true", help="smoke test: 64 samples, 5 and 10 calls, no DDPM")
    p.add_argument("--out-dir", default="runs/bench_samplers", help="samplers.json and one grid per point")
    p.add_argument("--md", default=None, help="Markdown output (default OUT/SAMPLERS.md)")
    p.add_argument("--plot", default="docs/images/samplers.png", help="Frechet distance against network calls")
    args = p.parse_args(argv)
    if args.quick:
        args.num, args.calls, args.no_ddpm = min(args.num, 64), [c for c in args.calls if c in (5, 10)] or [5, 10], True
        if args.plot == "docs/images/samplers.png":
            args.plot = os.path.join(args.out_dir, "samplers_quick.png")
    os.makedirs(args.out_dir, exist_ok=True)
    args.md = args.md or os.path.join(args.out_dir, "SAMPLERS.md")
    command = "benchmarks/bench_samplers.py " + " ".join(argv if argv is not None else sys.argv[1:])

    backend.use_backend(args.backend)
    model, diffusion, config, info = sampling.load_model(args.checkpoint)
    chw = (info["channels"], info["image_size"], info["image_size"])
    dataset = config.data if config is not None else info.get("dataset", "digits")
    T = diffusion.num_timesteps
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    where = machine()
    load_before = load_average()
    print(f"# {command}\n# machine: {where}; backend {args.backend}; load {load_before}; {started}",
          file=sys.stderr, flush=True)

    missing = sorted({METHODS[s] for s in args.samplers if not hasattr(diffusion, METHODS[s])})
    samplers = [s for s in args.samplers if hasattr(diffusion, METHODS[s])]
    jobs = [(s, c) for s in samplers for c in args.calls]
    if not args.no_ddpm:
        jobs.append(("ddpm", T))

    rows, errors = [], []
    for sampler, budget in jobs:
        steps = T if sampler == "ddpm" else steps_for(sampler, budget)
        row = {"sampler": sampler, "budget": budget, "steps": steps}
        try:
            x, calls, seconds = draw(diffusion, model, sampler, steps, chw, args.num, args.seed, args.batch_size)
            row.update(calls=calls, seconds=seconds)
            finite = bool(host.isfinite(x).all())
            row["finite"] = finite
            u8 = images.to_uint8(x)
            images.save_grid(u8[:64], os.path.join(args.out_dir, f"{sampler}_{calls}.png"))
            report = metrics.evaluate_samples(u8, dataset, seed=args.seed)
            m = report["metrics"]
            row.update({k: m[k]["samples"] for k in ("frechet_distance", "mean_confidence", "fraction_confident",
                                                     "precision", "recall")})
            row["floors"] = {k: m[k]["floor"] for k in ("frechet_distance", "mean_confidence", "fraction_confident")}
            row["floors"]["frechet_distance_std"] = m["frechet_distance"].get("floor_std")
            row["classifier_heldout_accuracy"] = report.get("classifier_heldout_accuracy")
            row["num_heldout"] = report.get("num_heldout")
            row["floor_repeats"] = report.get("floor_repeats")
            print(f"{NAMES[sampler]:<22} budget {budget:>4}  steps {steps:>4}  calls {calls:>4}  "
                  f"FD {row['frechet_distance']:8.3f}  conf {row['mean_confidence']:.4f}  "
                  f"conf>=0.9 {row['fraction_confident']:.3f}  {seconds:6.1f}s" + ("" if finite else "  NON-FINITE"),
                  file=sys.stderr, flush=True)
        except Exception as err:   # one broken sampler must not lose the others' numbers
            tail = traceback.format_exc().strip().splitlines()[-6:]
            row["error"] = f"{type(err).__name__}: {err}"
            errors.append((sampler, budget, tail))
            print(f"{NAMES[sampler]} budget {budget}: FAILED\n" + "\n".join(tail), file=sys.stderr, flush=True)
        rows.append(row)

    ddpm = next((r for r in rows if r["sampler"] == "ddpm"), None)
    scored = [r for r in rows if r.get("frechet_distance") is not None]
    floors = scored[0]["floors"] if scored else None

    # --- the Markdown
    md = [f"Written by `{command}`" + (" (QUICK SMOKE RUN: not a result)" if args.quick else "") + f", {started}.",
          f"Machine: {where}; backend {args.backend}; load average (1/5/15 min) {load_before} before, "
          f"{load_average()} at the end.",
          f"Checkpoint: `{args.checkpoint}` (EMA weights; {dataset}, T = {T}"
          + (f", {config.steps} training steps, seed {config.seed}" if config is not None else "") + "). "
          f"Samples: {args.num} per point in batches of {args.batch_size} (batch i seeded [{args.seed}, i]: the "
          f"same x_T for every sampler), x_0 clipped to [-1, 1]; scored against the "
          f"{scored[0]['num_heldout'] if scored else '?'} held-out images with minidiff.metrics.evaluate_samples "
          f"(seed {args.seed})"
          + (f"; classifier held-out accuracy {scored[0]['classifier_heldout_accuracy']:.3f}"
             if scored and scored[0].get("classifier_heldout_accuracy") else "") + ". "
          "Calls: network calls per chain, counted by wrapping the model; Heun with n steps costs 2n - 1. "
          "Wall time: all the point's samples, on this shared machine.",
          ""]
    if floors:
        md += [f"Real-data floor ({args.num} training images vs the held-out split): Frechet distance "
               f"{floors['frechet_distance']:.3f}"
               + (f" ± {floors['frechet_distance_std']:.3f} (sd of {scored[0].get('floor_repeats', '?')} draws)"
                  if floors.get("frechet_distance_std") else "")
               + f", mean confidence {floors['mean_confidence']:.4f}, "
               f"confidence >= 0.9 {floors['fraction_confident']:.3f}.", ""]
    md += ["| sampler | calls | Frechet distance | mean confidence | confidence >= 0.9 | wall time (s) |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = f"**{NAMES['ddpm']}-{r['steps']}** (reference)" if r["sampler"] == "ddpm" else NAMES[r["sampler"]]
        if "error" in r:
            md.append(f"| {name} | {r.get('calls', r['budget'])} | error: {r['error'][:80]} | | | |")
            continue
        md.append(f"| {name} | {r['calls']} | {r['frechet_distance']:.3f} | {r['mean_confidence']:.4f} | "
                  f"{r['fraction_confident']:.3f} | {r['seconds']:.1f} |")
    if missing:
        md += ["", f"Not run: `GaussianDiffusion` has no {', '.join(f'`{m}`' for m in missing)} in this checkout."]
    targets = check_targets(rows, ddpm)
    md += ["", "| target | measured | |", "|---|---|---|"]
    md += [f"| {text} | {value} | {verdict} |" for text, value, verdict in targets]
    if errors:
        md += ["", "Errors:"]
        for sampler, budget, tail in errors:
            md += ["", f"{NAMES[sampler]} at {budget} calls:", "", "```", *tail, "```"]
    md += ["", f"![Frechet distance against network calls]({args.plot})"]
    text = "\n".join(md) + "\n"
    with open(args.md, "w") as f:
        f.write(text)
    with open(os.path.join(args.out_dir, "samplers.json"), "w") as f:
        json.dump({"command": command, "machine": where, "started": started, "rows": rows,
                   "targets": targets, "missing": missing}, f, indent=2)
    plot_dir = os.path.dirname(args.plot)
    if plot_dir:
        os.makedirs(plot_dir, exist_ok=True)
    plot(rows, ddpm, args.plot, f"{dataset}: {args.num} samples per point, EMA weights")
    print("\n" + text)
    print(f"wrote {args.md}, {args.plot} and {args.out_dir}/samplers.json", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
