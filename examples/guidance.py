"""Classifier-free guidance (Ho & Salimans 2022): one x_T per row, every digit, more and more guidance.

A class-conditional U-Net (trained with labels dropped 10% of the time, so it is also the
unconditional model) is sampled with eps = (1 + w) eps(x_t, t, y) - w eps(x_t, t) for
w = 0, 0.5, 1, 2, 4 (columns, left to right: one column of the ten digits per w). Each row
starts from the same noise in every column, so the picture shows what guidance changes: the
digits get bolder and more typical, and alike. Uses the repository's runs/digits-cond if it holds
a conditional model, else trains one first (`minidiff train --conditional --out runs/digits-cond`,
about 7 minutes on 2 CPU cores). Writes examples/out/guidance.png.
"""
from common import default_out, default_run, digits_model, output, wrote

from minidiff import images
from minidiff.backend import Generator, default_name, host, to_active, to_numpy

WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)


def main(run_dir=default_run("digits-cond"), steps=50, seed=0, backend=default_name(),
         out=default_out("guidance.png")):
    """Ten digits (rows 0-9) for each guidance weight w (columns), DDIM with STEPS steps."""
    model, diffusion, _, info = digits_model(run_dir, backend=backend, conditional=True)
    shape = (model.num_classes, info["channels"], info["image_size"], info["image_size"])
    labels = to_active(host.arange(model.num_classes))
    noise = Generator(seed).normal(shape)                                  # the same x_T for every w
    columns = [to_numpy(diffusion.ddim_sample_loop(model, shape, num_steps=steps, noise=noise, seed=seed,
                                                   model_kwargs={"y": labels}, guidance=w))
               for w in WEIGHTS]
    images.filmstrip(columns, output(out), labels=[f"w={w:g}" for w in WEIGHTS],
                     row_labels=[f"y={k}" for k in range(model.num_classes)])
    wrote(out, f"rows: digits 0-{model.num_classes - 1}; columns: guidance w = "
               + ", ".join(f"{w:g}" for w in WEIGHTS))


if __name__ == "__main__":
    from common import run
    run(main)
