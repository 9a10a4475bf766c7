"""DDPM with 1000 steps against DDIM (50 and 10 steps), DPM-Solver++ (20 and 10) and Heun (19 calls), from one x_T.

DDIM (Song et al. 2021) reuses the DDPM-trained model with a deterministic, shorter chain:
20x and 100x fewer network calls. DPM-Solver++ (Lu et al. 2022) and Karras et al.'s Heun sampler
solve the same probability-flow ODE to second order, so they need fewer calls still. Rows: the same
x_T through each sampler; the ODE samplers (every column but DDPM's) give nearly the same digit.
Uses the repository's runs/digits if it holds a model (e.g. from `minidiff train`), else trains one
first (about 7 minutes on 2 CPU cores). Writes examples/out/ddpm_vs_ddim.png.
"""
import time

from common import default_out, default_run, digits_model, output, wrote

from minidiff import images
from minidiff.backend import Generator, default_name, to_numpy


def main(run_dir=default_run("digits"), num=8, seed=0, backend=default_name(), out=default_out("ddpm_vs_ddim.png")):
    """Sample NUM digits with DDPM (1000 steps), DDIM (50, 10), DPM-Solver++ (20, 10) and Heun from shared noise."""
    model, diffusion, _, info = digits_model(run_dir, backend=backend)
    shape = (num, info["channels"], info["image_size"], info["image_size"])
    x_T = Generator(seed).normal(shape)                           # the same x_T for every sampler
    columns, labels = [], []
    for name, sample in ((f"DDPM {diffusion.num_timesteps}",
                          lambda: diffusion.p_sample_loop(model, shape, noise=x_T, seed=seed + 1)),
                         ("DDIM 50", lambda: diffusion.ddim_sample_loop(model, shape, num_steps=50, noise=x_T)),
                         ("DDIM 10", lambda: diffusion.ddim_sample_loop(model, shape, num_steps=10, noise=x_T)),
                         ("DPM++ 20", lambda: diffusion.dpm_solver_sample_loop(model, shape, num_steps=20, noise=x_T,
                                                                               clip_denoised=True)),
                         ("DPM++ 10", lambda: diffusion.dpm_solver_sample_loop(model, shape, num_steps=10, noise=x_T,
                                                                               clip_denoised=True)),
                         ("Heun 19", lambda: diffusion.karras_sample_loop(model, shape, num_steps=10, noise=x_T,
                                                                          clip_denoised=True))):
        began = time.perf_counter()
        columns.append(to_numpy(sample()))
        seconds = time.perf_counter() - began
        labels.append(name)
        print(f"{name:10s} {seconds:6.1f}s")
    images.filmstrip(columns, output(out), labels=labels)
    wrote(out, "rows: one x_T each; columns: samplers")


if __name__ == "__main__":
    from common import run
    run(main)
