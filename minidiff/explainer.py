"""The forward and reverse process as chains of real frames, and as one self-contained HTML page with sliders.

The frames are the real processes: `forward_chain` runs the Markov chain of Eq. 2 step by step
(for every noise multiplier of the page), `reverse_chain` the reverse process of Algorithm 2 of
a trained model. `minidiff forward` shows them as a filmstrip, a GIF or the page. The page needs
no network: every frame is inlined as a PNG sprite sheet (one per chain, frames stacked top to
bottom) and the script is a few dozen lines of plain JavaScript. Beside the picture it shows the
current step's beta_t, alpha_bar_t and signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t),
all computed here in float64 from the schedule.
May import: backend, diffusion, images.
"""
import base64
import html
import io
import json
import math

from . import backend, images
from .diffusion import GaussianDiffusion

STEPS_CHOICES = tuple(range(10, 51, 5))     # the "number of steps" slider: frames shown between x_0 and x_T
SCALE_CHOICES = tuple(round(0.3 + 0.1 * i, 1) for i in range(13))   # the beta multiplier slider, 0.3 .. 1.5
DEFAULT_STEPS, DEFAULT_SCALE = 30, 1.0


def frame_steps(num_timesteps, steps):
    """The paper's step indices t (0 = x_0 .. T = x_T) shown when the chain is cut into `steps` pieces."""
    return [round(k * num_timesteps / steps) for k in range(steps + 1)]


def shown_steps(num_timesteps):
    """Every step index that some position of the steps slider shows: the frames a chain must keep."""
    return sorted({t for s in STEPS_CHOICES for t in frame_steps(num_timesteps, s)})


def step_readouts(betas):
    """beta_t, alpha_bar_t and SNR_t = alpha_bar_t / (1 - alpha_bar_t) for the paper's t = 0 .. T (Eq. 4).

    At t = 0 (x_0 itself) there is no beta, alpha_bar is 1 and the SNR is infinite (null in JSON).
    """
    rows, log_alpha_bar = [{"beta": None, "alpha_bar": 1.0, "snr": None}], 0.0
    for beta in betas:
        log_alpha_bar += math.log1p(-float(beta))
        alpha_bar = math.exp(log_alpha_bar)
        rows.append({"beta": float(beta), "alpha_bar": alpha_bar, "snr": alpha_bar / -math.expm1(log_alpha_bar)})
    return rows


# ---------------------------------------------------------------- the chains


def forward_chain(x, betas, keep, seed):
    """x_0, then the x_t of the Markov chain of Eq. 2 (`GaussianDiffusion.q_step`) at the paper's steps in `keep`.

    Returns (frames, steps): frames[i] is x at the paper's step steps[i] (0 = x_0 itself, if kept).
    Frames are clipped to [-1, 1] for display only; the chain itself runs unclipped, on the host, in
    the dtype of `x` (float64 for the demo: one picture through 1000 tiny steps).
    """
    diffusion = GaussianDiffusion(betas)
    rng = backend.host.random.default_rng([seed, 1])   # the same noise for every beta scale
    frames, steps = ([x], [0]) if 0 in keep else ([], [])
    for t in range(len(betas)):                       # code t is the paper's step t + 1
        x = diffusion.q_step(x, t, rng.standard_normal(x.shape))
        if t + 1 in keep:
            frames.append(x.clip(-1, 1))
            steps.append(t + 1)
    return frames, steps


def reverse_chain(model, diffusion, shape, keep, seed, progress=False):
    """x_T, ..., x_0 of Algorithm 2 at the paper's steps t in `keep` (T = pure noise, 0 = the sample).

    Returns (frames, steps) as forward_chain does, frames as host (N, C, H, W) batches of `shape`.
    """
    T = diffusion.num_timesteps
    noise = backend.Generator([seed, 1]).normal(shape)
    frames, steps = ([backend.to_numpy(noise)], [T]) if T in keep else ([], [])
    for out in diffusion.p_sample_loop_progressive(model, shape, noise=noise, seed=[seed, 2], progress=progress):
        if out["t"] in keep:      # the step at code t = the paper's t + 1 lands on the paper's x_t
            frames.append(backend.to_numpy(out["sample"]).clip(-1, 1))
            steps.append(out["t"])
    return frames, steps


# ---------------------------------------------------------------- the page


def _sprite(frames):
    """Frames (F, H, W, C) uint8 stacked vertically into one PNG, as a data: URL."""
    f, h, w, c = frames.shape
    sheet = frames.reshape(f * h, w, c)
    buffer = io.BytesIO()
    images._pil(sheet).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chain_entry(direction, scale, steps, frames, betas):
    """One chain for the page: `frames[i]` is x at the paper's step `steps[i]` (images in [-1, 1]).

    `frames` is a list of (C, H, W) images, or of (N, C, H, W) batches shown as a grid; `betas`
    is the schedule the chain ran on (already multiplied by `scale`), for the readouts.
    """
    pictures = []
    for x in frames:
        x = images._as_host(x)
        pictures.append(images.make_grid(x, scale=1, padding=1) if x.ndim == 4 else images.to_uint8(x))
    stacked = images.host.stack([p if p.ndim == 3 else p[..., None] for p in pictures])
    readouts = step_readouts(betas)
    return {"direction": direction, "scale": float(scale), "steps": [int(t) for t in steps],
            "width": int(stacked.shape[2]), "height": int(stacked.shape[1]), "sprite": _sprite(stacked),
            "readouts": [readouts[int(t)] for t in steps]}


def render(chains, num_timesteps, title, default_steps=DEFAULT_STEPS, default_scale=DEFAULT_SCALE):
    """The whole page as a string. `chains` come from chain_entry: one forward chain per entry of
    SCALE_CHOICES, and optionally one reverse chain."""
    scales = sorted(c["scale"] for c in chains if c["direction"] == "forward")
    if scales != list(SCALE_CHOICES):
        raise ValueError(f"the page needs one forward chain per noise scale {SCALE_CHOICES}, got {scales}")
    if default_steps not in STEPS_CHOICES or default_scale not in SCALE_CHOICES:
        raise ValueError(f"the sliders start at a steps value in {STEPS_CHOICES} and a scale in {SCALE_CHOICES}")
    config = {"T": int(num_timesteps), "stepsChoices": list(STEPS_CHOICES), "scaleChoices": list(SCALE_CHOICES),
              "defaultSteps": int(default_steps), "defaultScale": float(default_scale),
              "framesFor": {str(s): frame_steps(num_timesteps, s) for s in STEPS_CHOICES}, "chains": chains}
    data = json.dumps(config, separators=(",", ":")).replace("</", "<\\/")   # never closes the script tag
    return _PAGE.replace("$TITLE", html.escape(title)).replace("$DATA", data)


def write_page(path, chains, num_timesteps, title="minidiff: the diffusion process", **defaults):
    """Write render(...) to `path` (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(chains, num_timesteps, title, **defaults))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$TITLE</title>
<style>
 body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 56em; color: #222; padding: 0 1em; }
 h1 { font-size: 1.35em; margin-bottom: .2em; }
 .row { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
 canvas { width: 320px; height: 320px; image-rendering: pixelated; border: 1px solid #bbb; background: #eee; }
 .controls { flex: 1; min-width: 22em; }
 .controls label { display: block; margin: .7em 0 .1em; font-weight: 600; }
 .controls label.inline { display: inline; font-weight: normal; }
 .controls input[type=range] { width: 100%; max-width: 24em; }
 .controls .note { color: #777; font-size: .9em; }
 table.readout { border-collapse: collapse; margin-bottom: .5em; }
 table.readout td { padding: .15em .8em .15em 0; font-variant-numeric: tabular-nums; }
 table.readout td:first-child { color: #555; }
 code { background: #f3f3f3; padding: 0 .2em; }
</style></head>
<body>
<h1>$TITLE</h1>
<p>The forward process (Ho et al. 2020, Eq. 2) adds a little Gaussian noise at each of T steps:
<code>x_t = sqrt(1 - beta_t) x_(t-1) + sqrt(beta_t) eps</code>, so that
<code>q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)</code> (Eq. 4).
The reverse process (Algorithm 2) is a trained network walking back from pure noise.
Every frame below was computed by minidiff; the sliders only choose which one to show.</p>
<div class="row">
 <div><canvas id="view" width="64" height="64"></canvas></div>
 <div class="controls">
  <table class="readout">
   <tr><td>step</td><td id="out-t"></td></tr>
   <tr><td>beta_t</td><td id="out-beta"></td></tr>
   <tr><td>alpha_bar_t</td><td id="out-alpha-bar"></td></tr>
   <tr><td>SNR = alpha_bar_t / (1 - alpha_bar_t)</td><td id="out-snr"></td></tr>
  </table>
  <label>Direction</label>
  <input type="radio" name="direction" id="dir-forward" value="forward" checked>
  <label for="dir-forward" class="inline">forward: image to noise</label>
  <div class="note" id="forward-note"></div>
  <input type="radio" name="direction" id="dir-reverse" value="reverse">
  <label for="dir-reverse" class="inline">reverse: noise to image</label>
  <div class="note" id="reverse-note"></div>
  <label for="steps">Number of steps shown: <span id="steps-value"></span></label>
  <input type="range" id="steps">
  <label for="scale">Noise scale (multiplies every beta_t): <span id="scale-value"></span></label>
  <input type="range" id="scale">
  <div class="note" id="scale-note"></div>
  <label for="frame">Position along the chain: <span id="frame-value"></span></label>
  <input type="range" id="frame">
  <p><button id="play">Play</button></p>
 </div>
</div>
<script id="minidiff-data" type="application/json">$DATA</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("minidiff-data").textContent);
const $ = (id) => document.getElementById(id);
const state = { direction: "forward", steps: D.defaultSteps, scale: D.defaultScale, k: 0 };
const sprites = new Map();
const hasReverse = D.chains.some((c) => c.direction === "reverse");

function setupRange(input, min, max, step, value) {
  input.min = min; input.max = max; input.step = step; input.value = value;
}
setupRange($("steps"), D.stepsChoices[0], D.stepsChoices[D.stepsChoices.length - 1],
           D.stepsChoices[1] - D.stepsChoices[0], D.defaultSteps);
setupRange($("scale"), 0, D.scaleChoices.length - 1, 1, D.scaleChoices.indexOf(D.defaultScale));
setupRange($("frame"), 0, D.defaultSteps, 1, 0);
if (hasReverse) {   // cli forward --checkpoint: the forward chains are seeded with the reverse chain's x_0
  $("forward-note").textContent = "Here the forward process starts from the model's own sample (the reverse " +
    "chain's last frame, x_0), not from a real image: both directions run through the same picture.";
}
if (!hasReverse) {
  $("dir-reverse").disabled = true;
  $("reverse-note").textContent = "The reverse process needs a trained model: minidiff forward --checkpoint RUN --out page.html";
}

function chain() {
  const scale = state.direction === "reverse" ? 1.0 : state.scale;
  return D.chains.find((c) => c.direction === state.direction && Math.abs(c.scale - scale) < 1e-9);
}
function sprite(c) {
  if (!sprites.has(c)) { const img = new Image(); img.onload = draw; img.src = c.sprite; sprites.set(c, img); }
  return sprites.get(c);
}
function fmt(x, digits) {
  if (x === null) return "\\u2014";
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e4)) return x.toExponential(digits - 1);
  return x.toPrecision(digits);
}
function current() {
  // forward: k pieces into the chain, t = round(k T / steps); reverse: k pieces taken back from x_T.
  const ts = D.framesFor[String(state.steps)];
  const t = state.direction === "forward" ? ts[state.k] : D.T - ts[state.k];
  return { t: t, c: chain() };
}
function draw() {
  const { t, c } = current();
  const row = c.steps.indexOf(t);
  const img = sprite(c);
  const canvas = $("view");
  if (canvas.width !== c.width || canvas.height !== c.height) { canvas.width = c.width; canvas.height = c.height; }
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  if (img.complete && img.naturalWidth) ctx.drawImage(img, 0, row * c.height, c.width, c.height, 0, 0, c.width, c.height);
  const r = c.readouts[row];
  $("out-t").textContent = (t === 0 ? "t = 0 (x_0, the image)" : t === D.T ? `t = ${t} = T` : `t = ${t}`) + ` of T = ${D.T}`;
  $("out-beta").textContent = fmt(r.beta, 4);
  $("out-alpha-bar").textContent = fmt(r.alpha_bar, 4);
  $("out-snr").textContent = r.snr === null ? "\\u221e" : `${fmt(r.snr, 4)} (${(10 * Math.log10(r.snr)).toFixed(1)} dB)`;
  $("steps-value").textContent = state.steps;
  $("scale-value").textContent = (state.direction === "reverse" ? 1.0 : state.scale).toFixed(1);
  $("frame-value").textContent = `${state.k} of ${state.steps}`;
  $("scale").disabled = state.direction === "reverse";
  $("scale-note").textContent = state.direction === "reverse" ? "A trained model's schedule is fixed: the scale applies to the forward process." : "";
  document.body.dataset.t = String(t);  // for tests and bookmarks
}
function readControls() {
  const oldSteps = state.steps;
  state.direction = $("dir-reverse").checked ? "reverse" : "forward";
  state.steps = Number($("steps").value);
  state.scale = D.scaleChoices[Number($("scale").value)];
  // keep the same fraction of the chain when the number of steps changes
  state.k = oldSteps === state.steps ? Number($("frame").value) : Math.round(Number($("frame").value) * state.steps / oldSteps);
  $("frame").max = state.steps;
  $("frame").value = state.k;
  draw();
}
for (const id of ["dir-forward", "dir-reverse", "steps", "scale", "frame"]) $(id).addEventListener("input", readControls);
for (const id of ["dir-forward", "dir-reverse"]) $(id).addEventListener("change", readControls);
let timer = null;
$("play").addEventListener("click", () => {
  if (timer) { clearInterval(timer); timer = null; $("play").textContent = "Play"; return; }
  if (state.k >= state.steps) { $("frame").value = 0; readControls(); }
  $("play").textContent = "Pause";
  timer = setInterval(() => {
    if (state.k >= state.steps) { clearInterval(timer); timer = null; $("play").textContent = "Play"; return; }
    $("frame").value = state.k + 1; readControls();
  }, 120);
});
readControls();
</script>
</body></html>
"""
