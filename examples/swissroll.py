"""A 2-D swiss roll: train the small MLP denoiser, sample, and plot the denoising trajectories.

Panels: the data; samples by ancestral sampling (Algorithm 2) from the EMA weights; and the
paths of a few points from x_T ~ N(0, I) to x_0 under deterministic DDIM (eta = 0), whose
smooth paths show the flow that the noisy ancestral chain follows on average.
One to two minutes on a CPU (a progress bar shows the time left). Writes examples/out/swissroll.png.
"""
from common import default_out, output, wrote
from tqdm.auto import tqdm

from minidiff import data, images
from minidiff.backend import default_name, host, to_numpy
from minidiff.config import make_config
from minidiff.train import Trainer


def main(dataset="swissroll", steps=0, num=1000, paths=60, seed=0, backend=default_name(),
         out=default_out("swissroll.png")):
    """Train the toy2d preset on DATASET (swissroll, 8gaussians, moons, checkerboard) and plot it."""
    config = make_config("toy2d", data=dataset, seed=seed, backend=backend, **({"steps": steps} if steps else {}))
    trainer = Trainer(config)                 # the same object train() drives, used directly here
    with tqdm(total=config.steps, unit="step", desc=f"training on {dataset}") as bar:
        for _ in range(config.steps):
            loss, _, _ = trainer.train_step()     # one step of Algorithm 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    diffusion, model = trainer.diffusion, trainer.model
    with trainer.ema.swapped(model):
        model.eval()
        # 2-D points are not bounded like pixels, so the x_0 prediction is not clipped to [-1, 1].
        samples = diffusion.p_sample_loop(model, (num, 2), seed=seed, clip_denoised=False)
        chain = [to_numpy(state["sample"]) for state in diffusion.ddim_sample_loop_progressive(
            model, (num, 2), num_steps=100, seed=seed + 1, clip_denoised=False)]
    trajectories = host.stack(chain)[:, :paths]                        # (100 steps, paths, 2)
    real = data.sample_toy(dataset, num, rng=seed + 1)
    images.scatter_2d([real, samples, chain[-1]], output(out), paths=[None, None, trajectories],
                      titles=["data", f"{num} samples (DDPM, {diffusion.num_timesteps} steps)",
                              f"DDIM (100 steps) and {paths} of its paths"])
    wrote(out)


if __name__ == "__main__":
    from common import run
    run(main)
