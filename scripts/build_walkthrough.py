"""Build docs/walkthrough.ipynb, "the paper in one notebook", and execute it so it is committed with outputs.

    python scripts/build_walkthrough.py                 # build, execute (about 1.5 min on 2 cores), write
    python scripts/build_walkthrough.py --no-execute    # cells only, no outputs (for a quick look)

The cells are written here, as Python source (CELLS), so a change to the notebook is reviewed as a
diff of this file; tests/test_walkthrough.py checks that the committed notebook holds exactly these
cells, with outputs and without errors. Every step calls minidiff itself: the notebook adds
pictures and numeric checks, never a second implementation. Pictures go to a temporary folder and
are embedded in the outputs (IPython.display.Image), so the repository gets no image files.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "walkthrough.ipynb"
KERNEL_NAME = "python3"
TIMEOUT_S = 600   # per cell; the whole notebook takes about 1.5 min


def md(text):
    return ("markdown", text.strip("\n"))


def code(text):
    return ("code", text.strip("\n"))


CELLS = [
    md("""
# minidiff: the paper in one notebook

Ho, Jain & Abbeel, *Denoising Diffusion Probabilistic Models* (2020,
[arXiv:2006.11239](https://arxiv.org/abs/2006.11239)), run end to end on minidiff and NumPy:
the forward process and its closed form (Eq. 2 and 4), the noise schedules, training
(Algorithm 1) and sampling (Algorithm 2) on a 2-D swiss roll, the fast samplers that came after
the paper, and 8x8 digits with the paper's progressive generation (Fig. 6) and interpolation (Fig. 8).

Every step calls the library; each section links the function that implements its equation.
The whole notebook runs in about a minute and a half on 2 CPU cores. It is generated and executed
by `python scripts/build_walkthrough.py`: edit the cells there, not here.
"""),
    code("""
import tempfile
import time
import warnings
from pathlib import Path

# minidiff's progress bars are tqdm.auto's; without ipywidgets they fall back to text (and none is shown here)
warnings.filterwarnings("ignore", message="IProgress not found")

from IPython.display import Image, display

from minidiff import backend, classifier, data, images, metrics
from minidiff.config import make_config
from minidiff.diffusion import GaussianDiffusion
from minidiff.sampling import sampling_plan
from minidiff.schedule import NAMES, get_named_beta_schedule
from minidiff.train import Trainer

backend.use_backend("numpy")      # explicit: this notebook is the CPU walkthrough
backend.manual_seed(0)            # the default generator (q_step's noise below); every other draw has its own seed
host = backend.host               # numpy
FIGURES = Path(tempfile.mkdtemp(prefix="minidiff-walkthrough-"))   # pictures live here, never in the repository


def show(picture):
    \"\"\"Embed a PNG written by minidiff.images in the notebook's output.\"\"\"
    display(Image(filename=str(picture)))


started = time.perf_counter()
print(f"minidiff on the {backend.backend_name()} backend; pictures go to a temporary folder")
"""),
    md("""
## 1. The forward process on a picture (Eq. 2 and Eq. 4)

The forward process adds Gaussian noise in T = 1000 small steps (Eq. 2):
q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), one step of
[`q_step`](../minidiff/diffusion.py). Composed, the steps have a closed form (Eq. 4):
q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), with alpha_bar_t the product of
1 - beta_s up to t; [`q_sample`](../minidiff/diffusion.py) draws from it in one step, and
[`q_mean_variance`](../minidiff/diffusion.py) gives its moments.
The betas are the paper's linear schedule (Sec. 4, [`get_named_beta_schedule`](../minidiff/schedule.py)),
held with every coefficient table by [`GaussianDiffusion`](../minidiff/diffusion.py).
The pictures are bundled 8x8 digits ([`load_dataset`](../minidiff/data.py)), in [-1, 1].

Code timesteps are 0-based: code t is the paper's step t + 1.
"""),
    code("""
diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
digits, labels = data.load_dataset("digits", "heldout")                # (179, 1, 8, 8) float32 in [-1, 1]
x0 = digits[[host.flatnonzero(labels == k)[0] for k in (0, 3, 5, 8)]]   # four digits

shown = [0, 24, 49, 99, 199, 299, 499, 999]                           # code t (the paper's t + 1)
eps = backend.Generator(1).normal(x0.shape)                            # one eps for every column
columns = [x0] + [diffusion.q_sample(x0, host.full(len(x0), t), noise=eps) for t in shown]
images.filmstrip(columns, FIGURES / "forward.png", labels=["x_0"] + [f"t={t + 1}" for t in shown], scale=6)
show(FIGURES / "forward.png")
"""),
    md("""
**Eq. 4 checked numerically.** Start 4,000 copies of one digit at x_0 and run the chain of Eq. 2
step by step ([`q_step`](../minidiff/diffusion.py), fresh noise each step, float64 so rounding
does not blur the comparison). At a few t, the copies' per-pixel mean and variance must match
Eq. 4's sqrt(alpha_bar_t) x_0 and 1 - alpha_bar_t to within sampling error: the tables
print the worst pixel's deviation in standard errors (sd of the mean is sqrt(var / n),
of the variance about var sqrt(2 / n)).
"""),
    code("""
n = 4000
x_start = host.repeat(x0[1:2].astype(host.float64), n, axis=0)         # n copies of the 3, (n, 1, 8, 8)
checkpoints = {0, 9, 99, 499, 999}
x, worst = x_start, 0.0
print(" step t | alpha_bar_t |  max |mean error| (se) | max |var error| (se)")
for t in range(diffusion.num_timesteps):
    x = diffusion.q_step(x, host.full(n, t))                           # Eq. 2, one step
    if t in checkpoints:
        mean, var, _ = diffusion.q_mean_variance(x_start[:1], host.full(1, t))   # Eq. 4's moments
        z_mean = (x.mean(0) - mean[0]) / host.sqrt(var[0, 0, 0, 0] / n)
        z_var = (x.var(0, ddof=1) - var[0]) / (var[0, 0, 0, 0] * host.sqrt(2 / (n - 1)))
        worst = max(worst, abs(z_mean).max(), abs(z_var).max())
        print(f"{t + 1:7d} | {diffusion.alphas_cumprod[t]:11.6f} | {abs(z_mean).max():20.2f} | "
              f"{abs(z_var).max():19.2f}")
assert worst < 5, f"the chain of Eq. 2 is {worst:.1f} standard errors from Eq. 4"
print(f"worst deviation over {len(checkpoints)} steps x 64 pixels x 2 moments: {worst:.2f} standard errors")
"""),
    md("""
## 2. The schedules and their signal-to-noise ratio

minidiff's schedules ([`get_named_beta_schedule`](../minidiff/schedule.py)): the paper's
"linear" (Sec. 4: beta from 1e-4 to 0.02), "quad", Nichol & Dhariwal's "cosine" (their Eq. 17,
[`cosine_alpha_bar`](../minidiff/schedule.py)) and "sigmoid". What a schedule decides is how fast
the signal fades: SNR(t) = alpha_bar_t / (1 - alpha_bar_t), the ratio of Eq. 4's signal power to
its noise power, plotted on a log axis. The paper chose its betas so that x_T is almost pure
noise: the prior term L_T = KL(q(x_T | x_0) || N(0, I)) of the bound (Eq. 5) is about 1e-5 bits
per dimension (Sec. 4); [`prior_bpd`](../minidiff/diffusion.py) computes it for every schedule.
"""),
    code("""
from PIL import Image as PILImage   # only to put four plots in one row (see the note below)

T = 1000
panels = []
print("schedule | SNR(1)    | SNR(T/2)  | SNR(T)    | L_T (bits/dim), mean over the held-out digits")
for name in NAMES:
    d = GaussianDiffusion(get_named_beta_schedule(name, T))
    snr = d.alphas_cumprod / d.one_minus_alphas_cumprod
    prior = float(d.prior_bpd(digits.astype(host.float64)).mean())    # Eq. 5's L_T
    print(f"{name:8s} | {snr[0]:9.3g} | {snr[T // 2 - 1]:9.3g} | {snr[-1]:9.3g} | {prior:.2g}")
    panels.append(images.plot_curve(host.arange(1, T + 1), snr, FIGURES / f"snr_{name}.png", title=f"{name}",
                                    xlabel="t", ylabel="SNR", log_y=True, size=(300, 220)))
row = PILImage.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
for k, panel in enumerate(panels):
    row.paste(panel, (k * panels[0].width, 0))
row.save(FIGURES / "snr.png")
show(FIGURES / "snr.png")
"""),
    md("""
`images.plot_curve` draws one line per plot, with its own axes, so the four schedules are four
panels (pasted into one row with Pillow, which minidiff already depends on); read their y axes
before comparing. The cosine schedule keeps the SNR near 1 through the middle of the chain, where
the linear one has already fallen to about 0.1, and ends far lower; "linear" and "sigmoid" span
the same range of betas and end at about the same SNR.
"""),
    md("""
## 3. Algorithm 1 on the swiss roll

Training (Algorithm 1): take x_0 from the data, t ~ Uniform({1, ..., T}), eps ~ N(0, I), and take a
gradient step on || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2,
the simple loss L_simple of Eq. 14 ([`training_losses`](../minidiff/diffusion.py)). One step of it
is [`algorithm_1_step`](../minidiff/train.py); the [`Trainer`](../minidiff/train.py) holds the
data stream, the model, Adam and the EMA of the weights, and [`make_config`](../minidiff/config.py)'s
"toy2d" preset picks a small residual MLP ([`MLPDenoiser`](../minidiff/unet.py)) for 2-D points
drawn by [`sample_toy`](../minidiff/data.py). The preset's 8,000 steps of 256 points take about
20 seconds here.
"""),
    code("""
config = make_config("toy2d", data="swissroll", seed=0, backend="numpy")
roll = Trainer(config)
t0, losses = time.perf_counter(), []
for step in range(config.steps):
    loss, _, _ = roll.train_step()            # Algorithm 1, one gradient step
    losses.append(loss)
print(f"{config.steps} steps in {time.perf_counter() - t0:.0f} s; loss over the last 500 steps: "
      f"{host.mean(losses[-500:]):.3f} (an untrained eps_theta scores about 1)")
images.plot_curve(host.arange(1, config.steps + 1), losses, FIGURES / "roll_loss.png",
                  title="swiss roll: L_simple (Eq. 14)", smooth=100, size=(560, 300))
show(FIGURES / "roll_loss.png")
"""),
    md("""
## 4. Algorithm 2 on that model, with its denoising paths

Sampling (Algorithm 2): x_T ~ N(0, I), then for t = T, ..., 1,
x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z, the
mean of Eq. 11 plus noise ([`p_sample`](../minidiff/diffusion.py)). The loop
[`p_sample_loop_progressive`](../minidiff/diffusion.py) yields every x_t, so the paths of a few
points can be drawn (grey): a random walk, as noise is added at every step, that the model's
mean pulls onto the roll. The panel shows the last 250 of the 1000 steps (every 5th), from t = 250,
where alpha_bar_t is still about 0.5, down to x_0 (the green points); before that the walk wanders
over the whole N(0, I). Samples are drawn with the EMA weights, as
the paper does; 2-D points are not bounded like pixels, so x_0's prediction is not clipped.
The sliced Wasserstein distance ([`sliced_wasserstein`](../minidiff/metrics.py)) to fresh data is set
beside the floor, the same distance for draws of real data (mean and spread of 10 draws).
"""),
    code("""
num = 1000
real = data.sample_toy("swissroll", num, seed=1)
reference = data.sample_toy("swissroll", 4000, seed=2)
floors = [metrics.sliced_wasserstein(data.sample_toy("swissroll", num, seed=s), reference) for s in range(3, 13)]
floor = f"{host.mean(floors):.3f} +- {host.std(floors, ddof=1):.3f}"   # what perfect samples score (10 draws)
model = roll.model
with roll.ema.swapped(model):                 # the EMA weights, for every sampler below
    model.eval()
    x_T = backend.Generator(10).normal((num, 2))                        # one x_T for every sampler
    chain = [backend.to_numpy(state["sample"]) for state in
             roll.diffusion.p_sample_loop_progressive(model, (num, 2), noise=x_T, seed=11, clip_denoised=False)]
ddpm = chain[-1]
paths = host.stack(chain[-250::5] + chain[-1:])[:, :30]                  # (51, 30 paths, 2): t = 250 .. 1
print(f"sliced Wasserstein to the data: DDPM 1000 steps {metrics.sliced_wasserstein(ddpm, reference):.3f}, "
      f"real data {floor} (the floor)")
images.scatter_2d([real, ddpm, ddpm[:30]], FIGURES / "roll_ddpm.png", paths=[None, None, paths], panel=240,
                  titles=["data", "Algorithm 2: 1000 samples", "30 paths, their last 250 steps"])
show(FIGURES / "roll_ddpm.png")
"""),
    md("""
## 5. DDIM and the fast samplers

Algorithm 2 calls the network T = 1000 times. The samplers that came after the paper reuse the
same eps_theta: DDIM (Song et al. 2021, their Eq. 12; [`ddim_sample_loop`](../minidiff/diffusion.py))
is deterministic at eta = 0 and takes as few steps as asked; DPM-Solver++ (Lu et al. 2022,
[`dpm_solver_sample_loop`](../minidiff/diffusion.py)) is a second-order multistep solver of the same
probability-flow ODE; Karras et al.'s Heun and Euler samplers (EDM, their Algorithm 1;
[`karras_sample_loop`](../minidiff/diffusion.py)) integrate it on their sigma schedule.
[`sampling_plan`](../minidiff/sampling.py) is the library's one policy for "sample with n steps";
below, every sampler starts from the same x_T as Algorithm 2 above.
"""),
    code("""
plans = [sampling_plan(roll.diffusion, sampler, steps) for sampler, steps in
         [("ddim", 50), ("ddim", 10), ("dpm++", 10), ("heun", 5), ("heun", 10), ("euler", 10)]]
results = []
print(f"{'sampler':42s} | calls | seconds | sliced Wasserstein (floor {floor})")
print(f"{'ddpm 1000 steps (Algorithm 2, above)':42s} | {1000:5d} |     --- | "
      f"{metrics.sliced_wasserstein(ddpm, reference):.3f}")
with roll.ema.swapped(model):
    model.eval()
    for plan in plans:
        t0 = time.perf_counter()
        steps = [backend.to_numpy(s["sample"]) for s in plan.run(model, (num, 2), progressive=True, noise=x_T,
                                                                   clip_denoised=False)]
        results.append((plan.describe(), steps[-1], host.stack([x_T] + steps)[:, :40]))
        print(f"{plan.describe():42s} | {plan.network_calls:5d} | {time.perf_counter() - t0:7.2f} | "
              f"{metrics.sliced_wasserstein(steps[-1], reference):.3f}")
shown = [results[k] for k in (1, 2, 4)]                                 # ddim 10, dpm++ 10, heun 10
images.scatter_2d([x for _, x, _ in shown], FIGURES / "roll_fast.png", panel=240,
                  paths=[p for _, _, p in shown], titles=[name.split(" (")[0] for name, _, _ in shown])
show(FIGURES / "roll_fast.png")
"""),
    md("""
The deterministic samplers' paths (grey, 40 of them) are smooth: they follow the ODE whose noisy
version Algorithm 2 walks. Fifty DDIM steps come close to the 1000-step chain; ten network calls
of DDIM or DPM-Solver++ already give the roll, blurred (DPM-Solver++'s second order shows). Heun is the exception at 5
steps: on the linear schedule sigma_max = sqrt((1 - alpha_bar_T) / alpha_bar_T) is about 157, and
Karras et al.'s sigma grid then makes its first steps far too long for this small model; at 10
steps (19 calls, the library's default for Heun) it is back in line.
"""),
    md("""
## 6. Digits: a short run, progressive generation (Fig. 6) and interpolation (Fig. 8)

The "digits" preset ([`make_config`](../minidiff/config.py)) trains the paper's U-Net
([`UNet`](../minidiff/unet.py), App. B, here 8x8 with two levels) with Algorithm 1, for 2,600
steps of 128 digits in `minidiff train`'s 7 minutes. This notebook runs 500 steps of 64 at twice the
learning rate (about 40 seconds): the digits are recognisable, not yet as clean as the full run's.
Samples use DPM-Solver++ (20 network calls, the preset's final sampler; [`sample`](../minidiff/train.py)),
and minidiff's digit classifier ([`load_classifier`](../minidiff/classifier.py),
[`confidence`](../minidiff/metrics.py)) says how many it reads with confidence, beside real digits.
"""),
    code("""
config = make_config("digits", steps=500, batch_size=64, lr=2e-3, seed=0, backend="numpy")
trainer = Trainer(config)
t0, losses = time.perf_counter(), []
for step in range(config.steps):
    losses.append(trainer.train_step()[0])    # Algorithm 1 on the U-Net
print(f"{config.steps} steps in {time.perf_counter() - t0:.0f} s; "
      f"loss over the last 100 steps: {host.mean(losses[-100:]):.3f}")
images.plot_curve(host.arange(1, config.steps + 1), losses, FIGURES / "digits_loss.png",
                  title="digits: L_simple (Eq. 14)", smooth=25, size=(560, 300))
show(FIGURES / "digits_loss.png")

samples = trainer.sample(64, seed=0, sampler="dpm++")                   # EMA weights, DPM-Solver++ 20 steps
images.save_grid(samples, FIGURES / "digits_samples.png", scale=4)
images.save_grid(digits[:64], FIGURES / "digits_real.png", scale=4)
reader = classifier.load_classifier("digits")
for what, batch in [("samples", samples), ("real held-out digits", digits[:64])]:
    c = metrics.confidence(reader.predict_proba(batch))
    print(f"{what}: {c['fraction_confident']:.0%} read with confidence >= 0.9")
print("64 samples (left), 64 real held-out digits (right)")
display(Image(filename=str(FIGURES / "digits_samples.png")), Image(filename=str(FIGURES / "digits_real.png")))
"""),
    md("""
**Progressive generation (Sec. 4.3, Fig. 6).** Along Algorithm 2, every x_t gives a prediction of
x_0 by Eq. 15, x_0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_bar_t)
([`predict_start_from_noise`](../minidiff/diffusion.py)); `p_sample_loop_progressive` yields it as
`pred_xstart`. Rows are chains, columns run from t = T to t = 1: which digit it is appears first,
the details last.
"""),
    code("""
net, steps = trainer.model, trainer.diffusion
T = steps.num_timesteps
frames = [T - 1 - round(k * (T - 1) / 9) for k in range(10)]          # 10 evenly spaced code t, T - 1 .. 0
columns, labels_t = [], []
with trainer.ema.swapped(net):
    net.eval()
    for state in steps.p_sample_loop_progressive(net, (8, 1, 8, 8), seed=1):   # Algorithm 2
        if state["t"] in frames:
            columns.append(backend.to_numpy(state["pred_xstart"]))
            labels_t.append(f"t={state['t'] + 1}")
images.filmstrip(columns, FIGURES / "progressive.png", labels=labels_t, scale=5)
show(FIGURES / "progressive.png")
"""),
    md("""
**Interpolation (Sec. 4.4, Fig. 8).** Two held-out digits, a 3 and a 7, are encoded to x_t with the
same eps (Eq. 4), mixed as (1 - lambda) x_t + lambda x'_t and decoded by the reverse process from t
([`interpolate`](../minidiff/diffusion.py)). Rows: t = 100, 250, 500; columns: x_0, lambda from 0
to 1, x'_0. Small t keeps the sources' details; by t = 500 (alpha_bar about 0.08) little of an
8x8 digit survives, and the in-betweens are the model's own digits.
"""),
    code("""
a, b = host.flatnonzero(labels == 3)[0], host.flatnonzero(labels == 7)[0]
mix = [k / 6 for k in range(7)]
rows = []
with trainer.ema.swapped(net):
    net.eval()
    for t in (99, 249, 499):                                            # code t
        out = steps.interpolate(net, digits[a:a + 1], digits[b:b + 1], t, mix, seed=2)   # (7, 1, 1, 8, 8)
        rows.append([digits[a]] + [backend.to_numpy(out[k, 0]) for k in range(len(mix))] + [digits[b]])
columns = [host.stack([row[k] for row in rows]) for k in range(len(mix) + 2)]
images.filmstrip(columns, FIGURES / "interpolation.png", labels=["x_0"] + [f"{m:.2f}" for m in mix] + ["x'_0"],
                 scale=5)
show(FIGURES / "interpolation.png")
print(f"the whole notebook: {time.perf_counter() - started:.0f} s")
"""),
    md("""
## Where next

The same steps at full size: `minidiff train` (the 2,600-step digits run), `minidiff sample
--sampler ...`, and the scripts in `examples/` (`swissroll.py`, `progressive.py`,
`interpolation.py`, `ddpm_vs_ddim.py`). The math map in the README lists every equation of the
paper beside the function that implements it.
"""),
]


def notebook():
    """The notebook of CELLS, without outputs."""
    import nbformat
    from nbformat import v4
    cells = [v4.new_markdown_cell(src) if kind == "markdown" else v4.new_code_cell(src) for kind, src in CELLS]
    nb = v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": KERNEL_NAME, "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    nbformat.validate(nb)
    return nb


def kernel_manager():
    """A KernelManager for kernel "python3" that runs ipykernel on this very interpreter (sys.executable).

    A "python3" kernel spec installed elsewhere may name another Python (with minidiff missing, or an
    older one); the notebook must run on the interpreter that builds or tests it.
    """
    from jupyter_client.manager import KernelManager

    class ThisInterpreter(KernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            cmd = super().format_kernel_cmd(extra_arguments)
            return [sys.executable, "-m", "ipykernel_launcher", *cmd[cmd.index("-f"):]]

    return ThisInterpreter(kernel_name=KERNEL_NAME)


def execute(nb, timeout=TIMEOUT_S):
    """Run every cell of `nb` in a fresh kernel (cwd docs/, as Jupyter would) in place; returns the seconds taken.

    A failing cell raises nbclient's CellExecutionError, naming the cell and its traceback.
    """
    from nbclient import NotebookClient
    client = NotebookClient(nb, km=kernel_manager(), timeout=timeout, kernel_name=KERNEL_NAME,
                            record_timing=False, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    t0 = time.perf_counter()
    client.execute()
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-execute", action="store_true", help="write the cells without running them")
    parser.add_argument("--out", default=str(NOTEBOOK), help=f"where to write the notebook (default {NOTEBOOK})")
    args = parser.parse_args(argv)
    import nbformat
    nb = notebook()
    if not args.no_execute:
        seconds = execute(nb)
        print(f"executed in {seconds:.1f} s")
    nbformat.write(nb, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
