"""Interpolation in latent space (Ho et al. 2020, Sec. 4.4 and Fig. 8).

Two held-out digits are noised to step t with the same eps (Eq. 4), mixed as
(1 - lambda) x_t + lambda x'_t, and denoised by the reverse process. Small t keeps the
sources' details; large t gives freer in-betweens, and by t = 500 little of an 8x8 digit
survives the noise (alpha_bar_500 is about 0.08). Rows (labelled): t = 100, 250, 500.
Uses the repository's runs/digits if it holds a model, else trains one first (about 7 minutes
on 2 CPU cores). Writes examples/out/interpolation.png.
"""
from common import default_out, default_run, digits_model, output, wrote

from minidiff import data, images
from minidiff.backend import default_name, host, to_active, to_numpy

TS = (99, 249, 499)                                                                 # 0-based


def main(run_dir=default_run("digits"), lambdas=9, seed=0, backend=default_name(),
         out=default_out("interpolation.png")):
    """Interpolate one held-out pair at t = 100, 250 and 500 (rows), LAMBDAS mixing weights (columns)."""
    model, diffusion, config, _ = digits_model(run_dir, backend=backend)
    heldout, labels, _ = data.load_images(config.data, "heldout")
    a, b = host.flatnonzero(labels == 3)[0], host.flatnonzero(labels == 7)[0]        # a 3 and a 7
    mix = [k / (lambdas - 1) for k in range(lambdas)]
    rows = []
    for t in TS:
        x_a, x_b = to_active(heldout[a:a + 1]), to_active(heldout[b:b + 1])
        out_t = diffusion.interpolate(model, x_a, x_b, t, mix, seed=seed, progress=True)     # (L, 1, C, H, W)
        rows.append([heldout[a]] + [to_numpy(out_t[k, 0]) for k in range(lambdas)] + [heldout[b]])
    columns = [host.stack([row[k] for row in rows]) for k in range(lambdas + 2)]
    images.filmstrip(columns, output(out), labels=["x_0"] + [f"{lam:.2g}" for lam in mix] + ["x'_0"],
                     row_labels=[f"t={t + 1}" for t in TS])
    wrote(out, "rows: t = " + ", ".join(str(t + 1) for t in TS) + "; columns: lambda")


if __name__ == "__main__":
    from common import run
    run(main)
