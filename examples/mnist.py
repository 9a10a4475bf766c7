"""MNIST (32x32): the "mnist" preset, a bigger U-Net (ch 64, three levels, attention at 16x16).

Longer than the digits examples: on a GPU (--backend cupy) the preset's 30,000 steps
take minutes; on a laptop CPU try --steps 2000 for blurry but recognisable shapes over
an hour or so. Reuses and extends RUN_DIR (default: the repository's runs/mnist; resumes an
interrupted run). Writes examples/out/mnist.png (samples) and the run's progress in RUN_DIR.
"""
import os

from common import default_out, default_run, output, train_with_progress, wrote

from minidiff import checkpoint, images
from minidiff.backend import default_name, use_backend
from minidiff.config import make_config
from minidiff.sampling import load_model


def main(steps=0, run_dir=default_run("mnist"), num=36, sampler_steps=0, seed=0, backend=default_name(),
         out=default_out("mnist.png")):
    """Train (or resume) the mnist preset; sample NUM images (SAMPLER_STEPS>0: DDIM with that many steps)."""
    use_backend(backend)
    config = make_config("mnist", seed=seed, backend=backend, **({"steps": steps} if steps else {}))
    path = os.path.join(run_dir, checkpoint.FILENAME)
    done = checkpoint.load(path)["step"] if os.path.exists(path) else 0
    if done < config.steps:
        speed = "minutes on a GPU" if backend == "cupy" else "hours on a CPU (minutes on a GPU: --backend cupy)"
        if done:
            print(f"resuming {run_dir} at step {done} of {config.steps} (the whole run: {speed})", flush=True)
        else:
            print(f"No model in {run_dir}: training the mnist preset there first, {config.steps} steps, "
                  f"{speed}. Later runs reuse it.", flush=True)
        train_with_progress(config, run_dir, resume_from=done)
    else:
        print(f"using the model in {run_dir} (step {done})")
    model, diffusion, _, info = load_model(run_dir)
    shape = (num, info["channels"], info["image_size"], info["image_size"])
    if sampler_steps:
        samples = diffusion.ddim_sample_loop(model, shape, num_steps=sampler_steps, seed=seed, progress=True)
    else:
        samples = diffusion.p_sample_loop(model, shape, seed=seed, progress=True)
    images.save_grid(samples, output(out))
    wrote(out, f"{num} samples")


if __name__ == "__main__":
    from common import run
    run(main)
