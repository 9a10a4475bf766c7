"""Classifier-free guidance (Ho & Salimans 2022): one x_T per row, every digit, more and more guidance.

A class-conditional U-Net (trained with labels dropped 10% of the time, so it is also the
unconditional model) is sampled with eps = (1 + w) eps(x_t, t, y) - w eps(x_t, t) for
w = 0, 0.5, 1, 2, 4 (columns, left to right: one column of the ten digits per w). Each row
starts from the same noise in every column, so the picture shows what guidance changes: the
digits get bolder and more typical, and alike. Uses runs/digits-cond if it holds a conditional
model, else trains one first (`minidiff train --conditional`, a few minutes). Writes guidance.png.
"""
from common import digits_model

from minidiff import backend, images

host = backend.host


def main(run_dir="runs/digits-cond", steps=50, seed=0, backend_name="numpy", out="guidance.png"):
    """Ten digits (rows 0-9) for each guidance weight w (columns), DDIM with STEPS steps."""
    model, diffusion, _, info = digits_model(run_dir, backend_name=backend_name, conditional=True)
    shape = (model.num_classes, info["channels"], info["image_size"], info["image_size"])
    labels = backend.to_active(host.arange(model.num_classes))
    noise = backend.Generator(seed).normal(shape)                          # the same x_T for every w
    weights = (0.0, 0.5, 1.0, 2.0, 4.0)
    columns = [backend.to_numpy(diffusion.ddim_sample_loop(model, shape, num_steps=steps, noise=noise, seed=seed,
                                                           model_kwargs={"y": labels}, guidance=w))
               for w in weights]
    images.filmstrip(columns, out, labels=[f"w={w:g}" for w in weights])
    print(f"wrote {out} (rows: digits 0-9; columns: guidance w = {', '.join(f'{w:g}' for w in weights)})")


if __name__ == "__main__":
    from common import run
    run(main)
