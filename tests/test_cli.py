"""The `minidiff` command line: every command on a tiny run, and every error path (exit 2, nothing overwritten)."""
import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minidiff import __version__, checkpoint, cli, data, images
from minidiff import train as training

TINY = ["--ch", "8", "--ch-mult", "1", "--attn-resolutions", "--batch-size", "8", "--num-timesteps", "10",
        "--num-samples", "4", "--warmup", "2", "--no-progress"]


def run(*argv):
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run of the tiny U-Net on the bundled digits (T = 10)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert run("train", "--out", out, "--steps", 3, *TINY) == 0
    return out


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("minidiff")
    return err[0]


# ---------------------------------------------------------------- help and version


def test_version_and_help(capsys):
    assert run("--version") == 0
    assert capsys.readouterr().out.strip() == f"minidiff {__version__}"
    assert run("--help") == 0
    assert "train" in capsys.readouterr().out
    for command in ("train", "sample", "forward", "interpolate", "eval"):
        assert run(command, "--help") == 0
        text = capsys.readouterr().out
        assert "example" in text and "--backend" in text and "--seed" in text, command


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "minidiff", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


# ---------------------------------------------------------------- the commands


def test_train_writes_everything(trained):
    for name in ("checkpoint.safetensors", "metrics.jsonl", "loss.png", "samples.png"):
        assert (trained / name).is_file(), name
    state = checkpoint.load(trained)
    assert state["step"] == 3 and state["config"]["ch"] == 8 and state["config"]["preset"] == "digits"


def test_sample_png_and_npz(trained, tmp_path):
    assert run("sample", "--checkpoint", trained, "--num", 5, "--out", tmp_path / "s.png") == 0
    assert Image.open(tmp_path / "s.png").size[0] > 8
    assert run("sample", "--checkpoint", trained / "checkpoint.safetensors", "--num", 3, "--sampler", "ddim",
               "--steps", 4, "--no-ema", "--out", tmp_path / "s.npz") == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (3, 8, 8, 1)


@pytest.mark.parametrize("sampler", [["--sampler", "dpm++", "--order", "3", "--spacing", "trailing"],
                                     ["--sampler", "dpm++", "--steps", "5"], ["--sampler", "heun", "--steps", "3"],
                                     ["--sampler", "euler"], ["--sampler", "ddim", "--spacing", "linspace"]])
def test_sample_with_every_sampler_is_what_its_loop_draws(trained, tmp_path, sampler):
    """--sampler/--steps/--order/--spacing reach the sampler: the .npz is exactly its loop's output."""
    from minidiff import backend, images, sampling
    assert run("sample", "--checkpoint", trained, "--num", 3, *sampler, "--out", tmp_path / "s.npz") == 0
    model, diffusion, _, _ = sampling.load_model(trained)
    args = dict(zip(sampler[::2], sampler[1::2]))
    plan = sampling.sampling_plan(diffusion, args["--sampler"], int(args.get("--steps", 0)),
                                  order=int(args["--order"]) if "--order" in args else None,
                                  spacing=args.get("--spacing"))
    want = plan.run(model, (3, 1, 8, 8), seed=[0, 0], clip_denoised=True)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"], images.to_uint8(backend.to_numpy(want)))
    assert run("sample", "--checkpoint", trained, "--num", 2, *sampler, "--progressive", "--frames", 3,
               "--out", tmp_path / "p.png") == 0


def test_eval_reports_the_sampler_and_interpolate_decodes_with_one(trained, tmp_path):
    assert run("eval", "--checkpoint", trained, "--num", 8, "--sampler", "heun", "--steps", 3,
               "--out", tmp_path / "r.json") == 0
    sampling_report = json.loads((tmp_path / "r.json").read_text())["sampling"]
    assert sampling_report == {**sampling_report, "sampler": "heun", "steps": 3, "network_calls": 5}
    for sampler in (["--sampler", "dpm++", "--steps", 4], ["--sampler", "ddim", "--steps", 3], ["--sampler", "euler"]):
        assert run("interpolate", "--checkpoint", trained, "--t", 6, "--pairs", 2, "--lambdas", 3, *sampler,
                   "--out", tmp_path / "i.png") == 0


def test_sample_is_reproducible_and_seeded(trained, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run("sample", "--checkpoint", trained, "--num", 2, "--seed", seed, "--out", tmp_path / f"{name}.npz") == 0
    a, b, c = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def grid_cells(picture, rows, cols, size, scale, padding=2):
    """The (rows, cols, size, size, C) images of a make_grid/filmstrip picture, back at their own size."""
    pixels = np.asarray(picture.convert("RGB"))
    cell = size * scale + padding
    return np.stack([np.stack([pixels[padding + r * cell:padding + r * cell + size * scale:scale,
                                      padding + k * cell:padding + k * cell + size * scale:scale]
                               for k in range(cols)]) for r in range(rows)])


def neighbour_correlation(x):
    """Correlation of horizontally adjacent pixels: near 1 for a picture, near 0 for white noise."""
    x = np.asarray(x, np.float64)
    return np.corrcoef(x[..., :-1, :].ravel(), x[..., 1:, :].ravel())[0, 1]


def test_sample_progressive_strip(trained, tmp_path):
    """Fig. 6: one chain per row, --frames columns of its x_0 predictions at evenly spaced steps: from the
    prediction out of pure noise x_T (Eq. 15 at t = T) to the chain's end, which is the sample itself."""
    from minidiff import backend, sampling
    assert run("sample", "--checkpoint", trained, "--num", 2, "--progressive", "--frames", 4,
               "--out", tmp_path / "fig6.png") == 0
    assert run("sample", "--checkpoint", trained, "--num", 2, "--out", tmp_path / "end.npz") == 0   # same seed
    strip = Image.open(tmp_path / "fig6.png")
    scale, cell = 8, 8 * 8 + 2   # 8x8 digits drawn 8x, 2 px apart
    assert strip.width == 4 * cell + 2 and strip.height > 2 * cell + 2   # 4 frames by 2 chains, labels below
    cells = grid_cells(strip, rows=2, cols=4, size=8, scale=scale)[..., :1]   # grey: R = G = B
    with np.load(tmp_path / "end.npz") as f:
        end = f["arr_0"].astype(int)
    np.testing.assert_allclose(cells[:, 3], end, atol=1)   # the last column is the sample (Algorithm 2, line 6)
    model, diffusion, _, _ = sampling.load_model(trained)
    T = diffusion.num_timesteps
    x_T = backend.Generator([0, 0]).normal((2, 1, 8, 8))   # the chain's x_T: the seed of batch 0 of --seed 0
    first = diffusion.p_mean_variance(model, x_T, np.full(2, T - 1))["pred_xstart"]
    first = images.to_uint8(backend.to_numpy(getattr(first, "data", first))).astype(int)
    np.testing.assert_allclose(cells[:, 0], first, atol=1)   # the first column: x_0 predicted from pure noise
    assert abs(neighbour_correlation(cells[:, 0, ..., 0])) < 0.35 and abs(cells[:, 0].mean() - 127.5) < 40
    assert not np.array_equal(cells[0], cells[1])   # two chains, two rows


@pytest.mark.parametrize("out", ["forward.png", "forward.gif"])
def test_forward_on_mondrian(tmp_path, out):
    """The filmstrip (or animation) of Eq. 2: frame 0 is the Mondrian itself, each further frame is
    less like it, and x_T (T = 1000, alpha_bar_T = 4e-5) is white noise N(0, I) (clipped for display)."""
    assert run("forward", "mondrian", "--steps", 5, "--image-size", 32, "--out", tmp_path / out) == 0
    picture = Image.open(tmp_path / out)
    scale, cell = 2, 32 * 2 + 2
    if out.endswith(".gif"):   # one frame per step, each one picture
        assert picture.n_frames == 6 and picture.size == (cell + 2, cell + 2)
        frames = []
        for k in range(6):
            picture.seek(k)
            frames.append(grid_cells(picture, 1, 1, 32, scale)[0, 0])
        frames = np.stack(frames).astype(int)
    else:   # one column per step, labels below
        assert picture.width == 6 * cell + 2 and picture.height > cell + 2
        frames = grid_cells(picture, 1, 6, 32, scale)[0].astype(int)
    gif = out.endswith(".gif")   # a GIF holds 256 colours per frame: the noisy frames come back quantised
    mondrian = images.to_uint8(data.mondrian(32, rng=np.random.default_rng(0))).astype(int)
    assert np.abs(frames[0] - mondrian).max() <= (8 if gif else 0)
    likeness = [np.corrcoef(f.ravel(), mondrian.ravel())[0, 1] for f in frames]
    assert likeness[0] > 0.99 and all(a > b for a, b in zip(likeness, likeness[1:])), likeness
    x_T = frames[-1] / 127.5 - 1   # N(0, 1) clipped to [-1, 1]: mean 0, sd 0.72, 31.7% at the clip
    assert abs(likeness[-1]) < 0.1 and abs(neighbour_correlation(x_T)) < 0.1
    assert abs(x_T.mean()) < 0.1 and abs(x_T.std() - 0.72) < (0.1 if gif else 0.03)
    if not gif:
        assert abs((np.abs(x_T) > 0.99).mean() - 0.317) < 0.04


def test_forward_on_an_image_file_and_reverse_with_a_checkpoint(trained, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    assert run("forward", tmp_path / "in.png", "--steps", 3, "--beta-scale", 0.5, "--image-size", 16,
               "--out", tmp_path / "f.png") == 0
    assert run("forward", "--checkpoint", trained, "--steps", 5, "--num", 2, "--out", tmp_path / "r.gif") == 0
    assert Image.open(tmp_path / "r.gif").n_frames >= 2


def test_interpolate_and_eval(trained, tmp_path, capsys):
    assert run("interpolate", "--checkpoint", trained, "--t", 5, "--pairs", 2, "--lambdas", 3,
               "--out", tmp_path / "i.png") == 0
    # bits/dim alone: --bpd --no-metrics draws no samples
    assert run("eval", "--checkpoint", trained, "--bpd", "--no-metrics", "--bpd-num", 6,
               "--out", tmp_path / "report.json") == 0
    report = json.loads((tmp_path / "report.json").read_text())
    likelihood = report["likelihood"]
    assert likelihood["num_images"] == 6 and likelihood["grey_levels"] == 17 and likelihood["split"] == "heldout"
    assert 0 < likelihood["bits_per_dim"] < 50
    assert "quality" not in report and "sampling" not in report
    assert "bits_per_dim" in capsys.readouterr().out
    # both: sample metrics (the default) and --bpd
    assert run("eval", "--checkpoint", trained, "--num", 6, "--bpd", "--bpd-num", 4, "--out", tmp_path / "both.json") == 0
    both = json.loads((tmp_path / "both.json").read_text())
    assert both["quality"]["num_samples"] == 6 and both["likelihood"]["num_images"] == 4
    # eval's default sampler is DPM-Solver++ (order 2, 20 steps; at most T - 1 = 9 here), as BENCHMARKS.md chose it
    assert both["sampling"] == {**both["sampling"], "sampler": "dpm++", "steps": 9, "network_calls": 9, "order": 2,
                                "spacing": "linspace", "num": 6}


def test_toy2d_train_and_sample(tmp_path):
    out = tmp_path / "roll"
    assert run("train", "--data", "swissroll", "--out", out, "--steps", 3, "--num-timesteps", 10,
               "--mlp-hidden", 16, "--num-samples", 50, "--no-progress") == 0
    assert checkpoint.load(out)["config"]["preset"] == "toy2d"
    assert run("sample", "--checkpoint", out, "--num", 20, "--out", tmp_path / "p.npz") == 0
    assert np.load(tmp_path / "p.npz")["arr_0"].shape == (20, 2)
    assert run("sample", "--checkpoint", out, "--num", 20, "--out", tmp_path / "p.png") == 0
    # eval: a 2-D checkpoint is scored with the 2-D metrics; bits/dim needs images
    assert run("eval", "--checkpoint", out, "--num", 40, "--sampler", "ddim", "--steps", 5,
               "--out", tmp_path / "p.json") == 0
    quality = json.loads((tmp_path / "p.json").read_text())["quality"]
    assert quality["kind"] == "points" and quality["dataset"] == "swissroll" and quality["num_samples"] == 40
    assert set(quality["metrics"]) == {"energy_distance", "sliced_wasserstein"}
    assert run("eval", "--checkpoint", out, "--samples", tmp_path / "p.npz") == 0   # sample's (N, 2) points
    assert run("eval", "--checkpoint", out, "--bpd", "--out", tmp_path / "p.json") == 2


# ---------------------------------------------------------------- resume and Ctrl-C


def test_ctrl_c_saves_and_resume_matches_a_straight_run(tmp_path, monkeypatch, capsys):
    """A real SIGINT after step 2: the CLI stops at the step boundary, saves, exits 130; --resume finishes
    with the same weights as an uninterrupted run."""
    real_train = training.train

    def interrupted_after_step_2(*args, **kwargs):
        with contextlib.closing(real_train(*args, **kwargs)) as steps:
            for record in steps:
                if record["step"] == 2:
                    os.kill(os.getpid(), signal.SIGINT)   # as if the user pressed Ctrl-C during step 2
                yield record

    monkeypatch.setattr(training, "train", interrupted_after_step_2)
    assert run("train", "--out", tmp_path / "a", "--steps", 5, *TINY) == cli.EXIT_INTERRUPTED
    assert "resume" in capsys.readouterr().err
    assert checkpoint.load(tmp_path / "a")["step"] == 2
    monkeypatch.setattr(training, "train", real_train)
    assert run("train", "--out", tmp_path / "a", "--resume", "--steps", 5, "--no-progress") == 0
    assert run("train", "--out", tmp_path / "b", "--steps", 5, *TINY) == 0
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    for key in b["model"]:
        np.testing.assert_array_equal(a["model"][key], b["model"][key])


def test_train_with_zero_terminal_snr_needs_v_prediction_and_refuses_the_karras_sampler(tmp_path, capsys):
    out = tmp_path / "zsnr"
    assert run("train", "--out", out, "--steps", 2, "--zero-terminal-snr", *TINY) == 2
    assert "--mean-type v" in one_error_line(capsys)
    assert run("train", "--out", out, "--steps", 2, "--zero-terminal-snr", "--mean-type", "v", "--sampler", "ddim",
               *TINY) == 0
    assert checkpoint.load(out)["config"]["zero_terminal_snr"] is True
    for sampler in ("dpm++", "ddim", "ddpm"):
        assert run("sample", "--checkpoint", out, "--num", 2, "--sampler", sampler, "--out", tmp_path / "z.npz") == 0
    capsys.readouterr()
    assert run("sample", "--checkpoint", out, "--num", 2, "--sampler", "heun", "--out", tmp_path / "z.png") == 2
    assert "zero terminal SNR" in one_error_line(capsys)


def test_resume_refuses_changed_model_options(trained, capsys):
    before = (trained / "checkpoint.safetensors").read_bytes()
    assert run("train", "--out", trained, "--resume", "--steps", 6, "--ch", 16) == 2
    assert "ch" in one_error_line(capsys)
    assert (trained / "checkpoint.safetensors").read_bytes() == before


# ---------------------------------------------------------------- errors: one line, exit 2, nothing overwritten


def test_corrupt_and_missing_checkpoints(tmp_path, capsys):
    assert run("sample", "--checkpoint", tmp_path / "none", "--out", tmp_path / "s.png") == 2
    assert "not found" in one_error_line(capsys)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    for command in (["sample"], ["eval"], ["interpolate"], ["forward"]):
        assert run(*command, "--checkpoint", bad, "--out", tmp_path / "x.png" if command != ["eval"] else
                   tmp_path / "x.json") == 2
        assert str(bad) in one_error_line(capsys)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "nosuchdata"], "unknown data set"),
    (["train", "--steps", "0"], "--steps must be a positive"),
    (["train", "--batch-size", "-3"], "--batch-size must be a positive"),
    (["train", "--image-size", "16"], "8x8"),
    (["train", "--preset", "huge"], "invalid choice"),
    (["train", "--backend", "tpu"], "invalid choice"),
    (["train", "--lr", "fast"], "invalid float"),
    (["sample", "--out", "x.png"], "required"),
    (["forward", "--steps", "0"], "--steps must be a positive"),
    (["forward", "no_such_image.png"], "no such image"),
    (["forward", "--beta-scale", "-1"], "--beta-scale"),
    (["forward", "--out", "/no/such/folder/f.png"], "does not exist"),
    (["forward", "--out", "forward.jpg"], ".png or .gif"),
    (["bogus"], "invalid choice"),
])
def test_bad_arguments(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(*argv) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("argv, message", [
    (["sample", "--num", 0], "--num must be a positive"),
    (["sample", "--num", -2], "--num must be a positive"),
    (["sample", "--steps", 11], "between 1 and T = 10"),
    (["sample", "--out", "/no/such/folder/s.png"], "does not exist"),
    (["sample", "--out", "s.jpg"], ".png or .npz"),
    (["interpolate", "--t", 10], "--t must lie in 0 .. 9"),
    (["interpolate", "--lambdas", 1], "--lambdas"),
    (["interpolate", "--pairs", 0], "--pairs"),
    (["eval", "--num", -1], "--num must be a positive"),
    (["eval", "--num", 0], "--num must be a positive"),
    (["eval", "--num", 3], "at least 4"),
    (["eval", "--steps", 11], "between 1 and T = 10"),
    (["eval", "--bpd-num", -1], "--bpd-num must be >= 0"),
    (["eval", "--no-metrics"], "nothing to compute"),
    (["eval", "--data", "swissroll"], "2-D points"),
    (["eval", "--data", "nosuchdata"], "unknown data set"),
    (["eval", "--out", "/no/such/folder/r.json"], "does not exist"),
    (["eval", "--data", "mnist"], "takes 1x8x8"),
    (["sample", "--sampler", "heun", "--order", 2], "--order is DPM-Solver++'s"),
    (["sample", "--sampler", "euler", "--spacing", "trailing"], "--spacing places"),
    (["sample", "--sampler", "ddpm", "--spacing", "trailing"], "--spacing places"),
    (["sample", "--sampler", "dpm++", "--eta", 0.5], "--eta is DDIM's noise"),
    (["sample", "--sampler", "dpm++", "--steps", 10], "cannot place 10 distinct timesteps"),
    (["sample", "--sampler", "dpm++", "--order", 4], "invalid choice"),
    (["sample", "--sampler", "plms"], "invalid choice"),
    (["sample", "--spacing", "even"], "invalid choice"),
    (["eval", "--sampler", "heun", "--order", 3], "--order is DPM-Solver++'s"),
    (["interpolate", "--t", 5, "--sampler", "ddpm", "--steps", 3], "decodes all t + 1 ancestral steps"),
    (["interpolate", "--t", 5, "--sampler", "ddim", "--spacing", "leading"], "does not start at step t"),
    (["interpolate", "--sampler", "dpm++", "--t", 0], "--t 1 or more"),
])
def test_bad_arguments_with_a_checkpoint(trained, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = list(argv)
    if "--out" not in argv:
        argv += ["--out", "keep.png" if argv[0] != "eval" else "keep.json"]
    target = tmp_path / argv[argv.index("--out") + 1]
    if target.parent.exists():
        target.write_bytes(b"earlier results")
    assert run(*argv[:1], "--checkpoint", trained, *argv[1:]) == 2
    assert message in one_error_line(capsys)
    if target.parent.exists():
        assert target.read_bytes() == b"earlier results"


def test_image_size_mismatch_with_the_checkpoint(trained, tmp_path, capsys):
    np.save(tmp_path / "big.npy", np.zeros((20, 16, 16), dtype=np.uint8))
    assert run("eval", "--checkpoint", trained, "--data", tmp_path / "big.npy") == 2
    assert "16x16 (CxHxW) but the checkpoint's model takes 1x8x8" in one_error_line(capsys)


def test_train_never_overwrites_a_run(trained, capsys):
    before = (trained / "checkpoint.safetensors").read_bytes()
    assert run("train", "--out", trained, "--steps", 2, *TINY) == 2
    assert "--resume" in one_error_line(capsys)
    assert (trained / "checkpoint.safetensors").read_bytes() == before


def test_resume_without_a_checkpoint(tmp_path, capsys):
    assert run("train", "--out", tmp_path / "empty", "--resume") == 2
    assert "not found" in one_error_line(capsys)


# ---------------------------------------------------------------- examples


EXAMPLES = ["forward_process", "swissroll", "digits", "ddpm_vs_ddim", "progressive", "interpolation", "mnist",
            "guidance"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_are_main_with_defaults(name, monkeypatch):
    import importlib
    import inspect
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    monkeypatch.syspath_prepend(examples)
    module = importlib.import_module(name)
    params = inspect.signature(module.main).parameters.values()
    assert all(p.default is not inspect.Parameter.empty for p in params), "main(**defaults): every argument has one"
    assert "writes" in (module.__doc__ or "").lower(), "each example says which picture it writes"


def test_forward_process_example_writes_its_picture(tmp_path, monkeypatch):
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    monkeypatch.syspath_prepend(examples)
    import forward_process
    forward_process.main(size=16, frames=3, out=str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").is_file() and (tmp_path / "f_alpha_bar.png").is_file()


# ---------------------------------------------------------------- eval: sample-quality metrics


QUALITY_KEYS = {"frechet_distance", "precision", "recall", "mean_confidence", "fraction_confident",
                "class_entropy_bits", "class_max_deviation", "class_min_fraction", "class_max_fraction", "memorized"}


def heldout_digits_uint8():
    x, _ = data.load_dataset("digits", "heldout")
    return images.to_uint8(x)   # uint8 (179, 8, 8, 1), as `minidiff sample --out x.npz` writes


def eval_npz(tmp_path, array, *extra):
    np.savez(tmp_path / "s.npz", arr_0=array)
    assert run("eval", "--samples", tmp_path / "s.npz", "--data", "digits", *extra, "--out", tmp_path / "r.json") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"] == str(tmp_path / "s.npz") and report["checkpoint"] is None
    return report["quality"]


def test_eval_real_heldout_digits_score_at_the_floor(tmp_path, capsys):
    q = eval_npz(tmp_path, heldout_digits_uint8())
    m = q["metrics"]
    assert set(m) == QUALITY_KEYS and q["num_samples"] == 179 and q["dataset"] == "digits"
    assert m["frechet_distance"]["samples"] <= m["frechet_distance"]["floor"]
    assert m["precision"]["samples"] >= 0.9 and m["recall"]["samples"] >= 0.9
    for key in ("mean_confidence", "fraction_confident", "class_entropy_bits"):
        assert m[key]["samples"] >= m[key]["floor"] - 0.02, key
    assert m["memorized"]["samples"] == 0
    out = capsys.readouterr().out
    assert "| metric | samples | real (floor) | better |" in out and "Frechet" in out
    assert eval_npz(tmp_path, heldout_digits_uint8(), "--num", 50)["num_samples"] == 50   # the first 50


def test_eval_uniform_noise_scores_badly(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (179, 8, 8, 1), dtype=np.uint8)
    m = eval_npz(tmp_path, noise)["metrics"]
    assert m["frechet_distance"]["samples"] > 5 * m["frechet_distance"]["floor"]
    assert m["precision"]["samples"] < 0.3 and m["recall"]["samples"] < 0.3
    assert m["fraction_confident"]["samples"] < m["fraction_confident"]["floor"] - 0.3


def test_eval_from_a_checkpoint_samples_and_scores(trained, tmp_path, capsys):
    assert run("eval", "--checkpoint", trained, "--sampler", "ddim", "--steps", 5, "--num", 32,
               "--out", tmp_path / "r.json") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["data"] == "digits" and report["ema"] is True and "likelihood" not in report
    assert report["sampling"] == {**report["sampling"], "sampler": "ddim", "steps": 5, "num": 32, "seed": 0}
    quality = report["quality"]
    assert set(quality["metrics"]) == QUALITY_KEYS and quality["num_samples"] == 32
    for v in quality["metrics"].values():
        assert {"samples", "floor", "better"} <= set(v) and math.isfinite(v["samples"])
    assert "Frechet" in capsys.readouterr().out
    # the same options draw the same images as `minidiff sample`, so scoring its .npz gives the same report
    assert run("sample", "--checkpoint", trained, "--sampler", "ddim", "--steps", 5, "--num", 32,
               "--out", tmp_path / "s.npz") == 0
    assert run("eval", "--samples", tmp_path / "s.npz", "--data", "digits", "--out", tmp_path / "f.json") == 0
    assert json.loads((tmp_path / "f.json").read_text())["quality"] == quality


@pytest.mark.parametrize("array, argv, message", [
    (None, [], "give --checkpoint"),
    ("missing", [], "no such file"),
    ("corrupt", [], "cannot read it as a NumPy .npz archive"),
    (np.zeros((10, 8, 8), np.float32), [], "expected uint8 images"),
    (np.zeros((10, 8, 8, 2), np.uint8), [], "expected uint8 images"),
    (np.zeros((10, 8), np.uint8), [], "expected uint8 images"),
    (np.zeros((20, 16, 16, 1), np.uint8), [], "16x16"),
    (np.zeros((20, 32, 32, 1), np.uint8), ["--data", "digits"], "32x32"),
    (np.zeros((3, 8, 8, 1), np.uint8), [], "at least 4"),
    (np.zeros((20, 8, 8, 1), np.uint8), ["--data", "nosuchdata"], "no sample-quality metrics"),
    (np.zeros((20, 8, 8, 1), np.uint8), ["--data", None], "needs --data"),
    (np.zeros((20, 2)), ["--data", "swissroll", "--num", 0], "--num must be a positive"),
    (np.zeros((20, 8, 8, 1), np.uint8), ["--data", "swissroll"], "(N, 2) points"),
    (np.zeros((20, 8, 8, 1), np.uint8), ["--bpd"], "--bpd needs --checkpoint"),
    (np.zeros((20, 8, 8, 1), np.uint8), ["--no-metrics"], "nothing to compute"),
    (np.zeros((20, 8, 8, 1), np.uint8), ["--out", "/no/such/folder/r.json"], "does not exist"),
    (np.zeros((20, 8, 8, 1), np.uint8), ["--out", "r.txt"], ".json"),
    ("two_arrays", [], "no array arr_0"),
])
def test_eval_bad_samples(array, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.json").write_bytes(b"earlier results")
    argv = list(argv)
    if "--data" not in argv:
        argv += ["--data", "digits"]
    if argv[argv.index("--data") + 1] is None:
        del argv[argv.index("--data"):argv.index("--data") + 2]
    if "--out" not in argv:
        argv += ["--out", "keep.json"]
    if isinstance(array, np.ndarray):
        np.savez(tmp_path / "s.npz", arr_0=array)
    elif array == "corrupt":
        (tmp_path / "s.npz").write_bytes(b"PK\x03\x04 not really a zip file")
    elif array == "two_arrays":
        np.savez(tmp_path / "s.npz", a=np.zeros(3), b=np.zeros(3))
    samples = [] if array is None else ["--samples", "s.npz"]
    assert run("eval", *samples, *argv) == 2
    assert message in one_error_line(capsys)
    assert (tmp_path / "keep.json").read_bytes() == b"earlier results"


def test_train_creates_the_run_folder_with_its_parents(tmp_path, capsys):
    """A run folder is made with its parents (an output *file* in a missing folder stays an error)."""
    out = tmp_path / "runs" / "nested" / "short"
    assert run("train", "--out", out, "--steps", 1, *TINY) == 0
    assert (out / "checkpoint.safetensors").is_file()
    capsys.readouterr()
    (tmp_path / "a_file").write_text("not a folder")
    assert run("train", "--out", tmp_path / "a_file" / "run", "--steps", 1, *TINY) == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    assert (tmp_path / "a_file").read_text() == "not a folder"


# ---------------------------------------------------------------- class-conditional models


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A 3-step run of the tiny U-Net on the labelled digits with --conditional."""
    out = tmp_path_factory.mktemp("cli") / "cond"
    assert run("train", "--out", out, "--steps", 3, *TINY, "--conditional", "--p-uncond", "0.2") == 0
    return out


def test_sample_a_label_all_labels_and_unconditionally(conditional, tmp_path, capsys):
    assert checkpoint.load(conditional)["model_config"]["num_classes"] == 10
    assert run("sample", "--checkpoint", conditional, "--label", "all", "--num", 25, "--steps", 3,
               "--out", tmp_path / "all.npz") == 0
    assert "(2 of every class) with guidance w = 2" in capsys.readouterr().err
    with np.load(tmp_path / "all.npz") as f:
        assert f["arr_0"].shape == (20, 8, 8, 1) and f["arr_1"].tolist() == [c for c in range(10) for _ in range(2)]
    assert run("sample", "--checkpoint", conditional, "--label", 7, "--guidance", 0, "--num", 3, "--steps", 3,
               "--out", tmp_path / "seven.npz") == 0
    with np.load(tmp_path / "seven.npz") as f:   # (a 3-step model barely depends on its label: see test_unet)
        assert f["arr_1"].tolist() == [7, 7, 7] and f["arr_0"].shape == (3, 8, 8, 1)
    assert run("sample", "--checkpoint", conditional, "--num", 3, "--steps", 3, "--out", tmp_path / "free.npz") == 0
    with np.load(tmp_path / "free.npz") as f:   # no --label: unconditional, no arr_1
        assert f.files == ["arr_0"]
    assert run("sample", "--checkpoint", conditional, "--label", "all", "--num", 20, "--steps", 3,
               "--out", tmp_path / "grid.png") == 0
    with Image.open(tmp_path / "grid.png") as grid:   # one row of 2 per class: 10 rows
        assert grid.size[1] > 4 * grid.size[0]
    assert run("sample", "--checkpoint", conditional, "--label", 3, "--num", 2, "--steps", 3, "--progressive",
               "--frames", 3, "--out", tmp_path / "strip.png") == 0


@pytest.mark.parametrize("argv, message", [
    (["--label", "10"], "out of range: this model knows classes 0 .. 9"),
    (["--label", "-1"], "out of range"),
    (["--label", "seven"], "a class number or 'all'"),
    (["--guidance", "2"], "give --label too"),
    (["--label", "all", "--num", "5"], "at least 10"),
    (["--label", "3", "--guidance", "nan"], "finite"),
])
def test_bad_labels_for_a_conditional_checkpoint(conditional, argv, message, capsys, tmp_path):
    (tmp_path / "keep.png").write_bytes(b"earlier results")
    assert run("sample", "--checkpoint", conditional, *argv, "--out", tmp_path / "keep.png") == 2
    assert message in one_error_line(capsys)
    assert (tmp_path / "keep.png").read_bytes() == b"earlier results"


def test_label_on_an_unconditional_checkpoint_is_an_error(trained, capsys, tmp_path):
    assert run("sample", "--checkpoint", trained, "--label", 3, "--out", tmp_path / "x.png") == 2
    assert "this model is unconditional" in one_error_line(capsys)
    assert run("eval", "--checkpoint", trained, "--label", "all", "--num", 10) == 2
    assert "this model is unconditional" in one_error_line(capsys)


@pytest.mark.parametrize("data_arg", ["swissroll", "npy"])
def test_conditional_training_on_unlabelled_data_is_one_clear_error(data_arg, tmp_path, capsys):
    if data_arg == "npy":
        data_arg = tmp_path / "x.npy"
        np.save(data_arg, np.zeros((20, 8, 8), np.uint8))
    assert run("train", "--out", tmp_path / "run", "--data", data_arg, "--conditional", *TINY) == 2
    assert "--conditional needs label" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_conditional_training_on_a_folder_of_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("circle", "square", "cross"):
        (tmp_path / "shapes" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "shapes" / name / f"{i}.png")
    assert run("train", "--out", tmp_path / "run", "--data", tmp_path / "shapes", "--conditional", "--steps", 2,
               *TINY) == 0
    assert checkpoint.load(tmp_path / "run")["model_config"]["num_classes"] == 3
    assert run("sample", "--checkpoint", tmp_path / "run", "--label", 2, "--num", 2, "--steps", 2,
               "--out", tmp_path / "s.png") == 0


def test_eval_reports_per_class_agreement_from_arr_1(tmp_path, capsys):
    """Real held-out digits with their true labels as arr_1 agree at the classifier's accuracy; with the
    labels shifted by one they agree almost never."""
    x, y = data.load_dataset("digits", "heldout")
    np.savez(tmp_path / "s.npz", arr_0=images.to_uint8(x), arr_1=y)
    assert run("eval", "--samples", tmp_path / "s.npz", "--data", "digits", "--out", tmp_path / "r.json") == 0
    agree = json.loads((tmp_path / "r.json").read_text())["quality"]["label_agreement"]
    assert agree["mean"] > 0.97 and agree["min"] > 0.9 and len(agree["per_class"]) == 10
    assert sum(v["num"] for v in agree["per_class"].values()) == 179
    assert "| label | samples | agreement |" in capsys.readouterr().out
    np.savez(tmp_path / "s.npz", arr_0=images.to_uint8(x), arr_1=(y + 1) % 10)
    assert run("eval", "--samples", tmp_path / "s.npz", "--data", "digits", "--out", tmp_path / "r.json") == 0
    assert json.loads((tmp_path / "r.json").read_text())["quality"]["label_agreement"]["mean"] < 0.05
    np.savez(tmp_path / "bad.npz", arr_0=images.to_uint8(x), arr_1=y[:5])
    capsys.readouterr()
    assert run("eval", "--samples", tmp_path / "bad.npz", "--data", "digits") == 2
    assert "arr_1 must hold one integer label per sample" in one_error_line(capsys)
    assert run("eval", "--samples", tmp_path / "s.npz", "--data", "digits", "--label", "3") == 2
    assert "already drawn" in one_error_line(capsys)


def test_eval_draws_labelled_samples_from_a_conditional_checkpoint(conditional, tmp_path):
    assert run("eval", "--checkpoint", conditional, "--label", "all", "--num", 20, "--guidance", 1, "--steps", 3,
               "--out", tmp_path / "r.json") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["sampling"]["label"] == "all" and report["sampling"]["guidance"] == 1.0
    assert report["sampling"]["num"] == 20
    assert {int(c) for c in report["quality"]["label_agreement"]["per_class"]} == set(range(10))


def test_interpolate_forward_and_resume_with_a_conditional_checkpoint(conditional, tmp_path, capsys):
    assert run("interpolate", "--checkpoint", conditional, "--t", 5, "--pairs", 2, "--lambdas", 3,
               "--out", tmp_path / "i.png") == 0
    assert run("interpolate", "--checkpoint", conditional, "--t", 5, "--pairs", 2, "--lambdas", 3, "--label", 3,
               "--guidance", 1, "--out", tmp_path / "i3.png") == 0
    capsys.readouterr()
    assert run("interpolate", "--checkpoint", conditional, "--label", "all", "--out", tmp_path / "x.png") == 2
    assert "does not apply to interpolate" in one_error_line(capsys)
    assert run("forward", "--checkpoint", conditional, "--num", 2, "--steps", 2, "--out", tmp_path / "f.png") == 0
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(conditional, copy)   # the module's fixture stays at step 3
    assert run("train", "--out", copy, "--resume", "--steps", 4, "--no-progress") == 0
    assert checkpoint.load(copy)["step"] == 4
    capsys.readouterr()
    assert run("train", "--out", copy, "--resume", "--steps", 5, "--no-conditional", "--no-progress") == 2
    assert "conditional" in one_error_line(capsys)


# ---------------------------------------------------------------- every path on the cupy backend

CUPY = ["--backend", "cupy"]
TESTS = os.path.dirname(os.path.abspath(__file__))


def _device_counter():
    """The stand-in's counters when it is the cupy backend; None on a real GPU (nothing to count there)."""
    import conftest
    import strict_cupy
    from minidiff import backend
    if not conftest.USING_STANDIN and not backend.gpu_available():
        pytest.skip("needs the cupy backend: a GPU, or the strict stand-in (MINIDIFF_STRICT_CUPY=0 turned it off)")
    return strict_cupy if conftest.USING_STANDIN else None


@pytest.fixture
def cupy_backend():
    """The cupy backend for one test (the strict stand-in, or a real GPU under benchmarks/gpu_check.sh)."""
    from minidiff import backend
    counter = _device_counter()
    previous = backend.backend_name()
    backend.use_backend("cupy")
    if counter is not None:
        counter.reset()
    yield counter
    backend.use_backend(previous)


@pytest.fixture(scope="module")
def device_runs(tmp_path_factory):
    """Three tiny runs trained with --backend cupy: mse with dropout, kl with v, and a 2-D toy."""
    counter = _device_counter()
    root = tmp_path_factory.mktemp("cupy")
    runs = {"mse": root / "mse", "kl": root / "kl", "toy": root / "toy"}
    argv = {"mse": ["--steps", 3, "--dropout", 0.1, *TINY],
            "kl": ["--steps", 2, "--loss-type", "kl", "--mean-type", "v", *TINY],
            "toy": ["--data", "swissroll", "--steps", 3, "--num-timesteps", 10, "--batch-size", 16,
                    "--mlp-hidden", 16, "--num-samples", 16, "--no-progress"]}
    from minidiff import backend
    previous = backend.backend_name()   # a module fixture: the per-test restore does not cover it
    try:
        for name, out in runs.items():
            if counter is not None:
                counter.reset()
            assert run("train", "--out", out, *argv[name], *CUPY) == 0, name
            if counter is not None:
                assert counter.counts["ops"] > 100, f"train {name} did not run on the device"
            assert checkpoint.load(out)["config"]["backend"] == "cupy"
    finally:
        backend.use_backend(previous)
    return runs


SMOKE = {
    "resume": lambda r, d: ["train", "--out", d / "mse", "--resume", "--steps", 4, *TINY],
    "sample ddpm png": lambda r, d: ["sample", "--checkpoint", r["mse"], "--num", 3, "--out", d / "s.png"],
    "sample respaced npz": lambda r, d: ["sample", "--checkpoint", r["mse"], "--num", 3, "--sampler", "ddpm",
                                         "--steps", 4, "--out", d / "s.npz"],
    "sample ddim eta 1": lambda r, d: ["sample", "--checkpoint", r["kl"], "--num", 3, "--sampler", "ddim",
                                       "--steps", 4, "--eta", 1.0, "--out", d / "d.png"],
    "sample progressive": lambda r, d: ["sample", "--checkpoint", r["mse"], "--num", 2, "--progressive",
                                        "--frames", 3, "--out", d / "p.png"],
    "sample toy": lambda r, d: ["sample", "--checkpoint", r["toy"], "--num", 16, "--out", d / "t.png"],
    "forward demo": lambda r, d: ["forward", "mondrian", "--steps", 3, "--image-size", 16, "--out", d / "f.png"],
    "forward reverse": lambda r, d: ["forward", "--checkpoint", r["mse"], "--steps", 3, "--num", 2,
                                     "--out", d / "r.gif"],
    "interpolate": lambda r, d: ["interpolate", "--checkpoint", r["mse"], "--t", 5, "--pairs", 2, "--lambdas", 3,
                                 "--out", d / "i.png"],
    "eval checkpoint": lambda r, d: ["eval", "--checkpoint", r["mse"], "--sampler", "ddim", "--steps", 3,
                                     "--num", 16, "--out", d / "e.json"],
    "eval npz": lambda r, d: ["eval", "--samples", d / "h.npz", "--data", "digits", "--num", 32],
    "eval bpd": lambda r, d: ["eval", "--checkpoint", r["kl"], "--bpd", "--no-metrics", "--bpd-num", 4],
}


# Scoring a file touches no model (the metrics are host float64), and the forward demo is one float64
# picture pushed through 1000 tiny steps on the host: both accept --backend cupy and run without it.
HOST_BY_DESIGN = {"eval npz", "forward demo"}


@pytest.mark.gpu
@pytest.mark.parametrize("path", list(SMOKE))
def test_every_cli_path_runs_on_the_cupy_backend(path, device_runs, cupy_backend, tmp_path):
    """Each command with --backend cupy on the strict stand-in: no host array may meet a device one."""
    if path == "resume":
        import shutil
        shutil.copytree(device_runs["mse"], tmp_path / "mse")
    if path == "eval npz":
        np.savez(tmp_path / "h.npz", arr_0=heldout_digits_uint8()[:32])
    assert run(*SMOKE[path](device_runs, tmp_path), *CUPY) == 0, path
    if path not in HOST_BY_DESIGN and cupy_backend is not None:
        assert cupy_backend.counts["ops"] > 50, f"{path} did not run on the device"
    if path == "resume":
        assert checkpoint.load(tmp_path / "mse")["step"] == 4


@pytest.mark.gpu
def test_minidiff_backend_cupy_trains_on_the_device_with_no_backend_option(tmp_path):
    """`MINIDIFF_BACKEND=cupy minidiff train` in a fresh process: it must not train on numpy.

    With the stand-in, the process starts through tests/standin_launch.py and reports its counters;
    on a real GPU it is plain `python -m minidiff`.
    """
    report = tmp_path / "counts.json"
    env = dict(os.environ, MINIDIFF_BACKEND="cupy", STRICT_CUPY_REPORT=str(report),
               PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS), os.environ.get("PYTHONPATH", "")]))
    launch = [os.path.join(TESTS, "standin_launch.py")] if _device_counter() is not None else ["-m", "minidiff"]
    result = subprocess.run([sys.executable, *launch, "train", "--out", str(tmp_path / "run"), "--steps", "2",
                             *map(str, TINY)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert checkpoint.load(tmp_path / "run")["config"]["backend"] == "cupy"
    if _device_counter() is not None:
        assert json.loads(report.read_text())["ops"] > 1000


def test_train_learn_sigma_and_every_sampler_and_bpd_on_the_run(tmp_path, capsys):
    """--learn-sigma is learned_range + hybrid (stored as those two options); with importance sampling it
    resumes; every sampler and eval --bpd read the learned variance; contradicting options are one line."""
    out = tmp_path / "sigma"
    assert run("train", "--out", out, "--steps", 2, "--learn-sigma", "--timestep-sampler", "importance",
               "--vlb-weight", 0.002, *TINY) == 0
    config = checkpoint.load(out)["config"]
    assert (config["var_type"], config["loss_type"], config["vlb_weight"], config["timestep_sampler"]) == \
        ("learned_range", "hybrid", 0.002, "importance")
    assert run("train", "--out", out, "--resume", "--steps", 3, "--no-progress") == 0
    for sampler in ("ddpm", "ddim", "dpm++", "heun", "euler"):
        assert run("sample", "--checkpoint", out, "--num", 2, "--sampler", sampler, "--steps", 3,
                   "--out", tmp_path / "s.npz") == 0
    capsys.readouterr()
    assert run("eval", "--checkpoint", out, "--bpd", "--no-metrics", "--bpd-num", 4) == 0
    assert "bits_per_dim" in capsys.readouterr().out
    assert run("train", "--out", tmp_path / "x", "--learn-sigma", "--var-type", "fixed_small", *TINY) == 2
    assert "--learn-sigma learns the variance, which --var-type fixed_small contradicts" in one_error_line(capsys)
    assert run("train", "--out", tmp_path / "x", "--loss-type", "hybrid", *TINY) == 2
    assert "--learn-sigma" in one_error_line(capsys)
    assert run("train", "--out", tmp_path / "x", "--var-type", "learned", *TINY) == 2
    assert "no gradient" in one_error_line(capsys)


# ---------------------------------------------------------------- Inception FID: fid-stats and eval --inception


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Random FID Inception weights in torch's file format, named as pytorch-fid's file."""
    from conftest import compat_import
    torch = compat_import("torch")
    from minidiff import inception
    rng = np.random.default_rng(0)
    state = {}
    for name, module in inception.InceptionV3().named_modules():
        if isinstance(module, inception.BasicConv2d):
            o, c, kh, kw = module.weight.shape
            state[f"{name}.conv.weight"] = rng.normal(0, np.sqrt(2 / (c * kh * kw)), (o, c, kh, kw))
            state.update({f"{name}.bn.weight": rng.uniform(0.6, 1.4, o), f"{name}.bn.bias": rng.normal(0, 0.2, o),
                          f"{name}.bn.running_mean": rng.normal(0, 0.3, o),
                          f"{name}.bn.running_var": rng.uniform(0.5, 2, o)})
    state["fc.weight"], state["fc.bias"] = rng.normal(0, 0.02, (1008, 2048)), rng.normal(0, 0.5, 1008)
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}, path)
    return path


def _digit_like(n, seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_fid_stats_then_eval_against_the_stats_and_against_data(inception_weights, tmp_path, capsys):
    from minidiff import inception, metrics
    real = tmp_path / "real.npz"
    np.savez(real, images=_digit_like(10, 0))
    assert run("fid-stats", "--data", real, "--inception", inception_weights, "--out", tmp_path / "ref.npz") == 0
    err = capsys.readouterr().err
    assert "wrote" in err and "fewer than 10,000" in err
    mu, sigma = metrics.load_statistics(tmp_path / "ref.npz")
    model = inception.load(inception_weights)
    real_features = model.features(_digit_like(10, 0).transpose(0, 3, 1, 2))
    want_mu, want_sigma = metrics.feature_statistics(real_features)
    np.testing.assert_allclose(mu, want_mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-3, atol=1e-5)

    samples = _digit_like(8, 1)
    np.savez(tmp_path / "s.npz", samples)
    assert run("eval", "--samples", tmp_path / "s.npz", "--inception", inception_weights, "--ref", tmp_path / "ref.npz",
               "--out", tmp_path / "stats.json") == 0
    assert "FID below 10,000 samples is biased upward" in capsys.readouterr().err
    report = json.load(open(tmp_path / "stats.json"))
    assert "quality" not in report                         # no --data: minidiff's digit metrics do not apply
    feats = model.features(samples.transpose(0, 3, 1, 2))
    fid = metrics.frechet_distance(*metrics.feature_statistics(feats), want_mu, want_sigma)
    assert report["inception"]["fid"] == pytest.approx(fid, rel=1e-3) and "kid_mean" not in report["inception"]
    score = metrics.inception_score(model.logits_of(feats, bias=False), splits=8)
    assert report["inception"]["is_mean"] == pytest.approx(score["is_mean"], rel=1e-6)

    folder = tmp_path / "pngs"                             # an image folder as --samples, data as --ref
    folder.mkdir()
    for i, img in enumerate(samples[:6]):
        Image.fromarray(img).save(folder / f"{i}.png")
    assert run("eval", "--samples", folder, "--inception", inception_weights, "--ref", real,
               "--out", tmp_path / "data.json") == 0
    got = json.load(open(tmp_path / "data.json"))["inception"]
    kid = metrics.kernel_inception_distance(feats[:6], real_features)
    assert got["kid_mean"] == pytest.approx(kid["kid_mean"], rel=1e-3, abs=1e-6) and got["kid_subset_size"] == 6
    assert {"fid", "precision", "recall", "reference_is_mean"} <= set(got) and got["reference_num"] == 10


def test_inception_errors_are_one_line_and_write_nothing(inception_weights, tmp_path, capsys):
    import torch
    np.savez(tmp_path / "s.npz", _digit_like(4, 0))
    base = ["eval", "--samples", tmp_path / "s.npz", "--out", tmp_path / "r.json"]
    assert run(*base, "--inception", inception_weights) == 2
    assert "--ref" in one_error_line(capsys)
    assert run(*base, "--inception", tmp_path / "absent.pth", "--ref", "digits") == 2
    assert "pt_inception-2015-12-05" in one_error_line(capsys)
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tmp_path / "other.pth")
    assert run(*base, "--inception", tmp_path / "other.pth", "--ref", "digits") == 2
    assert "not the FID Inception weights" in one_error_line(capsys)

    class Trap:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)
    torch.save({"x": Trap()}, tmp_path / "trap.pth")
    assert run("fid-stats", "--data", "digits", "--inception", tmp_path / "trap.pth", "--out", tmp_path / "t.npz") == 2
    assert "refused pickle global posix.system" in one_error_line(capsys) and not (tmp_path / "ran").exists()
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    assert run(*base, "--inception", inception_weights, "--ref", tmp_path / "small.npz") == 2
    assert "2048" in one_error_line(capsys)
    np.savez(tmp_path / "broken.npz", mu=np.zeros(2048))
    assert run(*base, "--inception", inception_weights, "--ref", tmp_path / "broken.npz") == 2
    assert "sigma" in one_error_line(capsys)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "t.npz").exists()


def test_each_option_states_its_default_once(capsys):
    from minidiff.cli import build_parser
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            text = action.help or ""   # a stated default, "(default 64)", and an appended "(default: 0)" clash
            assert text.count("(default:") <= 1 and not ("(default:" in text and "(default " in text), \
                (name, action.dest, text)
    assert run("forward", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "0 means 64" in text and "default 64" not in text
    assert text.count("$MINIDIFF_BACKEND") == 1 and "(default: numpy)" not in text
    assert run("train", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "created (with its parents) if missing" in text and "parent must exist" not in text


def test_interpolate_mixes_small_images_earlier_by_default(trained, tmp_path, capsys):
    from minidiff.cli import interpolation_t
    assert interpolation_t(1000, 8) == 250 and interpolation_t(1000, 32) == 500 and interpolation_t(10, 8) == 2
    capsys.readouterr()
    assert run("interpolate", "--checkpoint", trained, "--pairs", 1, "--lambdas", 2, "--out", tmp_path / "i.png") == 0
    assert "at t=2 " in capsys.readouterr().err   # the tiny run's T = 10, 8x8 digits


def test_eval_draws_with_one_progress_bar_over_every_batch(trained, tmp_path, capsys):
    assert run("eval", "--checkpoint", trained, "--num", 12, "--batch-size", 5, "--steps", 2) == 0
    err = capsys.readouterr().err
    assert "12/12" in err and "sample" in err          # one bar counting samples across the 3 batches
    assert "2/2" not in err                             # no per-batch step bars restarting
