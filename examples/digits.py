"""Digits end to end, in code: train the default preset on the bundled 8x8 digits, then sample.

The same as `minidiff train` followed by `minidiff sample`, written against the Python API:
train() is a generator of per-step records, so the loop below is the whole training driver.
RUN_DIR (default: the repository's runs/digits, what `minidiff train` writes) is reused when it
holds a model; otherwise the default preset is trained there first, with a progress bar (about
7 minutes on 2 CPU cores). Writes examples/out/digits.png (a grid of samples beside real
held-out digits) and digits_loss.png (the training loss, from the run's metrics log).
"""
from common import (announce_training, default_out, default_run, has_model, output, read_losses, with_suffix,
                    wrote)
from tqdm.auto import tqdm

from minidiff import data, images
from minidiff.backend import default_name, to_numpy, use_backend
from minidiff.config import make_config
from minidiff.sampling import load_model
from minidiff.train import train


def main(run_dir=default_run("digits"), steps=0, num=64, seed=0, backend=default_name(),
         out=default_out("digits.png")):
    """Reuse RUN_DIR, or train the digits preset there (STEPS=0: the preset's count), and draw NUM samples."""
    use_backend(backend)
    if has_model(run_dir):
        print(f"using the model in {run_dir} (--run-dir NEW_FOLDER trains a new one)")
    else:
        config = make_config("digits", seed=seed, backend=backend, **({"steps": steps} if steps else {}))
        announce_training(config, run_dir)
        with tqdm(total=config.steps, unit="step", desc="training") as bar:
            for record in train(config, out_dir=run_dir):          # Algorithm 1, one record per step
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        print(f"trained {config.steps} steps; the run (checkpoint, metrics, loss.png) is in {run_dir}")

    model, diffusion, config, info = load_model(run_dir)     # the EMA weights, as the paper samples
    shape = (num, info["channels"], info["image_size"], info["image_size"])
    samples = diffusion.p_sample_loop(model, shape, seed=seed + 1, progress=True)   # Algorithm 2
    real, _, _ = data.load_images(config.data, "heldout")
    images.side_by_side([to_numpy(samples), real[:num]], output(out),
                        titles=[f"samples (DDPM, {diffusion.num_timesteps} steps)", "held-out digits (real)"])
    wrote(out, f"{num} samples beside {min(num, len(real))} held-out digits")

    steps_done, losses = read_losses(run_dir)
    if losses:
        loss_png = with_suffix(out, "_loss")
        images.plot_curve(steps_done, losses, output(loss_png), title="L_simple during training", log_y=True,
                          smooth=True)
        wrote(loss_png, "training loss, raw and a moving average")


if __name__ == "__main__":
    from common import run
    run(main)
