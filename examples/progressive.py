"""Progressive generation (Ho et al. 2020, Fig. 6): the prediction of x_0 along the reverse chain.

At step t the model's eps gives x_0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
(Eq. 15). Large-scale features (which digit, its stroke) appear first, details last.
Uses the repository's runs/digits if it holds a model, else trains one first (about 7 minutes
on 2 CPU cores). Writes examples/out/progressive.png.
"""
from common import default_out, default_run, digits_model, output, wrote

from minidiff import images
from minidiff.backend import default_name, to_numpy


def main(run_dir=default_run("digits"), num=8, frames=10, seed=0, backend=default_name(),
         out=default_out("progressive.png")):
    """NUM chains (rows); FRAMES columns of x_0 predictions from t = T down to t = 1."""
    model, diffusion, _, info = digits_model(run_dir, backend=backend)
    T = diffusion.num_timesteps
    shape = (num, info["channels"], info["image_size"], info["image_size"])
    show = {round(T - 1 - k * (T - 1) / (frames - 1)) for k in range(frames)}      # evenly spaced t, 0-based
    columns, labels = [], []
    for state in diffusion.p_sample_loop_progressive(model, shape, seed=seed, progress=True):   # Algorithm 2
        if state["t"] in show:
            columns.append(to_numpy(state["pred_xstart"]))
            labels.append(f"t={state['t'] + 1}")
    images.filmstrip(columns, output(out), labels=labels)
    wrote(out, "rows: chains; columns: the x_0 prediction at t")


if __name__ == "__main__":
    from common import run
    run(main)
