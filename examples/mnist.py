"""MNIST (32x32): the "mnist" preset, a bigger U-Net (ch 64, three levels, attention at 16x16).

Longer than the digits examples: on a GPU (--backend-name cupy) the preset's 30,000 steps
take minutes; on a laptop CPU try --steps 2000 for blurry but recognisable shapes over
an hour or so. Reuses and extends RUN_DIR (resumes an interrupted run).
Writes mnist.png (samples) and progress in RUN_DIR.
"""
import os

from common import train_with_progress

from minidiff import backend, checkpoint, images
from minidiff.config import make_config
from minidiff.sampling import load_model
from minidiff.train import train


def main(steps=0, run_dir="runs/mnist", num=36, sampler_steps=0, seed=0, backend_name=backend.default_name(), out="mnist.png"):
    """Train (or resume) the mnist preset; sample NUM images (SAMPLER_STEPS>0: DDIM with that many steps)."""
    backend.use_backend(backend_name)
    config = make_config("mnist", seed=seed, backend=backend_name, **({"steps": steps} if steps else {}))
    path = os.path.join(run_dir, checkpoint.FILENAME)
    done = checkpoint.load(path)["step"] if os.path.exists(path) else 0
    if done < config.steps:
        if done:
            print(f"resuming {run_dir} at step {done}")
            for _ in train(config, run_dir, resume=True, progress=True):
                pass
        else:
            train_with_progress(config, run_dir)
    model, diffusion, _, info = load_model(run_dir)
    shape = (num, info["channels"], info["image_size"], info["image_size"])
    if sampler_steps:
        samples = diffusion.ddim_sample_loop(model, shape, num_steps=sampler_steps, seed=seed, progress=True)
    else:
        samples = diffusion.p_sample_loop(model, shape, seed=seed, progress=True)
    images.save_grid(samples, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    from common import run
    run(main)
