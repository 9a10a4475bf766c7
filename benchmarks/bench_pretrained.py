"""DDIM-50 with the paper's CIFAR-10 model (google/ddpm-cifar10-32's shapes): how long on this machine.

    python benchmarks/bench_pretrained.py                        # 16 images, 50 DDIM steps, 2 threads
    python benchmarks/bench_pretrained.py --pretrained DIR       # the real weights, where they were downloaded
    python benchmarks/bench_pretrained.py --backend cupy         # on a GPU
    python benchmarks/bench_pretrained.py --no-torch             # minidiff alone
    python benchmarks/bench_pretrained.py --config celebahq --num 1 --steps 2   # a 256x256 model's step

Without --pretrained, the weights are random but the shapes are the real ones: diffusers writes a
UNet2DModel with google/ddpm-cifar10-32's config.json (35,746,307 parameters) to a temporary
folder and minidiff loads it with minidiff.pretrained.load, exactly as it loads the downloaded
folder (without diffusers installed, a minidiff.UNet of the same shapes is used). Sampling time
does not depend on the weights' values. With torch and diffusers installed, the same model and
the same x_T also run through diffusers' UNet2DModel + DDIMScheduler (use_clipped_model_output=True,
minidiff's convention) side by side, and the two final samples are compared.
Thread counts are set before numpy or torch is imported. The load average is printed with the
figures because the machine may be shared.
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# google/ddpm-cifar10-32's config.json
CIFAR10_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
                      layers_per_block=2, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                            "DownBlock2D"],
                      up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], norm_num_groups=32,
                      norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                      attention_head_dim=None, act_fn="silu", center_input_sample=False,
                      time_embedding_type="positional", mid_block_scale_factor=1)
# google/ddpm-celebahq-256's config.json (church, bedroom and cat share it): six levels, attention at 16x16
CELEBAHQ_CONFIG = dict(CIFAR10_CONFIG, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
                       down_block_types=["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D",
                                         "AttnDownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D",
                                       "UpBlock2D"])
CONFIGS = {"cifar10": CIFAR10_CONFIG, "celebahq": CELEBAHQ_CONFIG}
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        clip_sample=True, variance_type="fixed_large")


def load_average():
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", help="a diffusers DDPM folder (default: random weights, real shapes)")
    parser.add_argument("--config", default="cifar10", choices=sorted(CONFIGS),
                        help="which paper model's shapes, for random weights")
    parser.add_argument("--num", type=int, default=16, help="images (one batch)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--threads", type=int, default=2, help="BLAS / torch threads")
    parser.add_argument("--backend", default="numpy", choices=("numpy", "cupy"))
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip diffusers' side")
    parser.add_argument("--torch-first", action="store_true",
                        help="run diffusers before minidiff (the default is after): alternate to see the load's effect")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, ROOT)

    import numpy as np

    import minidiff
    from minidiff import backend, pretrained
    from minidiff.schedule import get_named_beta_schedule
    try:
        import diffusers
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        diffusers = torch = None
    backend.use_backend(args.backend)
    print(f"load average at start: {load_average()}; {args.threads} threads; backend {args.backend}")

    folder, tmp = args.pretrained, None
    if folder is None and diffusers is not None:
        tmp = tempfile.TemporaryDirectory()
        torch.manual_seed(0)
        reference = diffusers.UNet2DModel(**CONFIGS[args.config]).eval()
        reference.save_pretrained(tmp.name)
        diffusers.DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(tmp.name)
        folder = tmp.name
    began = time.perf_counter()
    if folder is not None:
        model, diffusion = pretrained.load(folder)
        source = folder if args.pretrained else f"random weights written by diffusers ({args.config} config)"
    else:
        if args.config != "cifar10":
            parser.error("--config celebahq needs diffusers to write the folder")
        minidiff.manual_seed(0)
        model = minidiff.UNet(32, 3, 128, (1, 2, 2, 2), 2, (16,)).eval()
        diffusion = minidiff.GaussianDiffusion(get_named_beta_schedule("linear", 1000), model_var_type="fixed_large")
        source = "random minidiff weights of google/ddpm-cifar10-32's shapes (diffusers not installed)"
    load_s = time.perf_counter() - began
    size, channels = model.image_size, model.in_channels
    shape = (args.num, channels, size, size)
    x_T = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    print(f"model: {source}; {model.num_parameters():,} parameters; loaded in {load_s:.1f} s")

    rows, results = [], {}

    def run_minidiff():
        began = time.perf_counter()
        x = diffusion.ddim_sample_loop(model, shape, num_steps=args.steps, noise=backend.to_active(x_T), progress=True)
        results["minidiff"] = backend.to_numpy(x)
        rows.append(("minidiff " + args.backend, time.perf_counter() - began, load_average()))

    def run_torch():
        unet = diffusers.UNet2DModel.from_pretrained(folder).eval()
        scheduler = diffusers.DDIMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "variance_type"})
        scheduler.set_timesteps(args.steps)
        began = time.perf_counter()
        with torch.no_grad():
            x = torch.from_numpy(x_T)
            for t in scheduler.timesteps:
                eps = unet(x, t).sample
                x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        results["torch"] = x.numpy()
        rows.append((f"diffusers {diffusers.__version__} / torch {torch.__version__}", time.perf_counter() - began,
                     load_average()))

    runs = [run_minidiff]
    if args.torch and diffusers is not None and folder is not None and args.backend == "numpy":
        runs = [run_torch, run_minidiff] if args.torch_first else [run_minidiff, run_torch]
    for run in runs:
        run()

    print()
    print(f"DDIM-{args.steps}, {args.num} images of {channels}x{size}x{size}, eta 0, one batch:")
    print()
    print("| implementation | total s | s per step | images per minute | load average after |")
    print("|---|---:|---:|---:|---|")
    for name, seconds, load in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / args.steps:.2f} | {60 * args.num / seconds:.1f} | {load} |")
    if len(rows) == 2:
        seconds = {name.split()[0]: s for name, s, _ in rows}
        difference = float(abs(results["minidiff"] - results["torch"]).max())
        print(f"\nratio minidiff / diffusers: {seconds['minidiff'] / seconds['diffusers']:.2f}x (run in the order "
              f"{', '.join(name.split()[0] for name, _, _ in rows)}); max |x_0 minidiff - x_0 diffusers| = "
              f"{difference:.2e} (same weights, same x_T)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
