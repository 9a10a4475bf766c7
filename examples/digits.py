"""Digits end to end, in code: train the default preset on the bundled 8x8 digits, then sample.

The same as `minidiff train` followed by `minidiff sample`, written against the Python API:
train() is a generator of per-step records, so the loop below is the whole training driver.
A few minutes on a laptop CPU (the default preset). Writes digits.png (samples next to real
held-out digits) and digits_loss.png.
"""
import time

from minidiff import backend, data, images
from minidiff.config import make_config
from minidiff.sampling import load_model
from minidiff.train import train

host = backend.host


def main(steps=0, run_dir="runs/digits_example", num=64, seed=0, backend_name=backend.default_name(), out="digits.png"):
    """Train on the bundled digits (STEPS=0: the preset's count) and draw NUM samples."""
    config = make_config("digits", seed=seed, backend=backend_name, **({"steps": steps} if steps else {}))
    began = time.perf_counter()
    losses = []
    for record in train(config, out_dir=run_dir):          # Algorithm 1, one record per step
        losses.append(record["loss"])
        if record["step"] % 500 == 0:
            recent = host.mean(losses[-500:])
            print(f"step {record['step']:5d}  loss {recent:.4f}  ({time.perf_counter() - began:.0f}s)")
    print(f"trained {config.steps} steps in {time.perf_counter() - began:.0f}s; checkpoint in {run_dir}")

    model, diffusion, _, _ = load_model(run_dir)           # the EMA weights, as the paper samples
    samples = diffusion.p_sample_loop(model, (num, 1, 8, 8), seed=seed + 1, progress=True)   # Algorithm 2
    real, _, _ = data.load_images("digits", "heldout")
    images.filmstrip([real[:num], backend.to_numpy(samples)], out, labels=["held-out data", "samples"])
    images.plot_curve(host.arange(1, len(losses) + 1), losses, out.replace(".png", "_loss.png"),
                      title="L_simple during training", log_y=True)
    print(f"wrote {out} and {out.replace('.png', '_loss.png')}")


if __name__ == "__main__":
    from common import run
    run(main)
