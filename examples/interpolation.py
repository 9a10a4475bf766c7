"""Interpolation in latent space (Ho et al. 2020, Sec. 4.4 and Fig. 8).

Two held-out digits are noised to step t with the same eps (Eq. 4), mixed as
(1 - lambda) x_t + lambda x'_t, and denoised by the reverse process. Small t keeps the
sources' details; large t gives freer in-betweens, and by t = 500 little of an 8x8 digit
survives the noise (alpha_bar_500 is about 0.08). Rows: t = 100, 250, 500.
Uses runs/digits if it holds a model, else trains one first. Writes interpolation.png.
"""
from common import digits_model

from minidiff import backend, data, images

host = backend.host


def main(run_dir="runs/digits", lambdas=9, seed=0, backend_name=backend.default_name(), out="interpolation.png"):
    """Interpolate one held-out pair at t = 100, 250 and 500 (rows), LAMBDAS mixing weights (columns)."""
    model, diffusion, config, _ = digits_model(run_dir, backend_name=backend_name)
    heldout, labels, _ = data.load_images(config.data, "heldout")
    a, b = host.flatnonzero(labels == 3)[0], host.flatnonzero(labels == 7)[0]        # a 3 and a 7
    mix = [k / (lambdas - 1) for k in range(lambdas)]
    rows = []
    for t in (99, 249, 499):                                                        # 0-based
        x_a, x_b = backend.to_active(heldout[a:a + 1]), backend.to_active(heldout[b:b + 1])
        out_t = diffusion.interpolate(model, x_a, x_b, t, mix, seed=seed, progress=True)     # (L, 1, C, H, W)
        rows.append([heldout[a]] + [backend.to_numpy(out_t[k, 0]) for k in range(lambdas)] + [heldout[b]])
    columns = [host.stack([row[k] for row in rows]) for k in range(lambdas + 2)]
    images.filmstrip(columns, out, labels=["x_0"] + [f"{lam:.2g}" for lam in mix] + ["x'_0"])
    print(f"wrote {out} (rows: t = 100, 250, 500)")


if __name__ == "__main__":
    from common import run
    run(main)
