"""The forward process q(x_t | x_0) destroying a picture (Ho et al. 2020, Eq. 2 and 4).

Left to right: x_0, then x_t at evenly spaced t; one row each for the paper's linear schedule
and for a schedule with half and double the noise (rows labelled beta x 0.5, 1, 2). Beside it,
alpha_bar_t, the share of the signal left at step t. Seconds on a CPU; needs no model.
Writes examples/out/forward_process.png and forward_process_alpha_bar.png.
"""
from common import default_out, output, with_suffix, wrote

from minidiff import data, images
from minidiff.backend import default_name, host, to_active, to_numpy, use_backend
from minidiff.diffusion import GaussianDiffusion
from minidiff.schedule import get_named_beta_schedule

SCALES = (0.5, 1.0, 2.0)


def main(image="mondrian", size=48, frames=8, seed=0, backend=default_name(), out=default_out("forward_process.png")):
    """Draw the forward process on IMAGE (a file, or 'mondrian') at three noise strengths."""
    use_backend(backend)
    rng = host.random.default_rng(seed)
    x0 = data.mondrian(size, rng=rng) if image == "mondrian" else data.load_path(image, image_size=size)[0][0]
    x0 = to_active(x0[None])                                         # (1, C, H, W)
    ts = host.linspace(0, 999, frames).round().astype(int)
    noise = to_active(rng.standard_normal(x0.shape).astype(x0.dtype))   # one eps for every t: a smooth fade
    rows, curves = [], {}
    for scale in SCALES:
        diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 1000) * scale)
        rows.append([to_numpy(diffusion.q_sample(x0, host.full(1, t), noise)[0].clip(-1, 1)) for t in ts])   # Eq. 4
        curves[scale] = diffusion.alphas_cumprod
    # One filmstrip row per noise strength: frames[k] holds the k-th column of every row.
    columns = [host.stack([row[k] for row in rows]) for k in range(frames)]
    images.filmstrip(columns, output(out), labels=[f"t={t + 1}" for t in ts],
                     row_labels=[f"beta x {scale:g}" for scale in SCALES])
    wrote(out, "rows: beta x 0.5, 1, 2; columns: t")
    curve_png = with_suffix(out, "_alpha_bar")
    images.plot_curve(host.arange(1, 1001), curves[1.0], output(curve_png),
                      title="alpha_bar_t of the linear schedule (signal left at step t)", xlabel="t",
                      ylabel="alpha_bar_t")
    wrote(curve_png)


if __name__ == "__main__":
    from common import run
    run(main)
