"""examples/: every script's --help, default paths that do not depend on the current folder, and the
cheap ones end to end (tiny steps, or a tiny pre-trained run) writing pictures of sane sizes where they say."""
import importlib.util
import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest
from PIL import Image

from minidiff.config import make_config
from minidiff.train import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(p.stem for p in EXAMPLES.glob("*.py") if p.stem != "common")
# Which default run folder (under the repository's runs/) each model example uses.
RUN_DIRS = {"digits": "digits", "ddpm_vs_ddim": "digits", "progressive": "digits", "interpolation": "digits",
            "guidance": "digits-cond", "mnist": "mnist"}
# A run small enough to train in well under a second: T = 1000 as in the presets, a one-level U-Net.
TINY = dict(steps=20, ch=8, ch_mult=(1,), attn_resolutions=(), batch_size=16, num_samples=4, sample_every=0,
            sampler="ddim", sample_steps=2, backend="numpy")


def test_every_example_is_listed():
    assert set(SCRIPTS) == {"ddpm_vs_ddim", "digits", "forward_process", "guidance", "interpolation", "mnist",
                            "progressive", "swissroll"}


def _env():
    env = {k: v for k, v in os.environ.items() if k != "MINIDIFF_BACKEND"}
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def run_example(name, *args, cwd):
    """Run examples/NAME.py in `cwd` on numpy; returns its stdout (it must succeed)."""
    done = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{name} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def written(stdout):
    """The files an example says it wrote ('wrote PATH' or 'wrote PATH (what)')."""
    return [pathlib.Path(p) for p in re.findall(r"^wrote (.+?)(?: \(.*\))?$", stdout, flags=re.M)]


def load_example(name, monkeypatch):
    """examples/NAME.py imported afresh (with a fresh `common`), as in the current folder."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, "common", raising=False)
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def defaults(name, monkeypatch):
    return {k: p.default for k, p in inspect.signature(load_example(name, monkeypatch).main).parameters.items()}


def assert_sane_picture(path, min_side=100, max_side=2500, max_ratio=4):
    with Image.open(path) as im:
        im.load()
        width, height = im.size
    assert min_side <= width <= max_side and min_side <= height <= max_side, (path, im.size)
    assert width <= max_ratio * height and height <= max_ratio * width, (path, im.size)
    return width, height


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_runs_and_lists_backend(name, tmp_path):
    out = run_example(name, "--help", cwd=tmp_path)
    assert "--backend" in out and "--backend-name" not in out
    assert list(tmp_path.iterdir()) == []                          # --help writes nothing


@pytest.mark.parametrize("name", SCRIPTS)
def test_default_paths_do_not_depend_on_the_current_folder(name, tmp_path, monkeypatch):
    seen = []
    for cwd in (ROOT, EXAMPLES, tmp_path):
        monkeypatch.chdir(cwd)
        seen.append(defaults(name, monkeypatch))
    assert seen[0] == seen[1] == seen[2]
    found = seen[0]
    assert "backend" in found and "backend_name" not in found
    assert pathlib.Path(found["out"]).parent == ROOT / "examples" / "out"
    if name in RUN_DIRS:
        assert pathlib.Path(found["run_dir"]) == ROOT / "runs" / RUN_DIRS[name]
    common = load_example("common", monkeypatch)
    assert pathlib.Path(common.default_run("digits")) == ROOT / "runs" / "digits"
    assert pathlib.Path(inspect.signature(common.digits_model).parameters["run_dir"].default) == ROOT / "runs" / "digits"


def test_examples_out_is_ignored_by_git():
    assert "/examples/out/" in (ROOT / ".gitignore").read_text().split()


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny unconditional and a tiny conditional digits run, as `minidiff train --steps 20 --out DIR` writes."""
    folder = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, conditional in (("digits", False), ("digits-cond", True)):
        runs[name] = folder / name
        for _ in train(make_config("digits", conditional=conditional, **TINY), str(runs[name])):
            pass
    return runs


def test_forward_process_end_to_end(tmp_path):
    out = run_example("forward_process", "--size", "16", "--frames", "4", "--out", "pics/fp.png", cwd=tmp_path)
    files = written(out)
    assert files == [tmp_path / "pics" / "fp.png", tmp_path / "pics" / "fp_alpha_bar.png"]
    width, height = assert_sane_picture(files[0], min_side=60)
    assert width > 4 * 16 * 4 and height > 3 * 16 * 4        # 4 frames of 4x-scaled 16 px, 3 labelled rows
    assert assert_sane_picture(files[1]) == (640, 400)


def test_swissroll_end_to_end(tmp_path):
    out = run_example("swissroll", "--steps", "20", "--num", "64", "--paths", "4", "--out", "s.png", cwd=tmp_path)
    assert "training on swissroll" not in out                # the progress bar is on stderr
    (file,) = written(out)
    assert file == tmp_path / "s.png"
    width, height = assert_sane_picture(file)
    assert width > 3 * 300 > height                           # three 300 px panels side by side


@pytest.mark.parametrize("name, args, rows_by_cols", [
    ("digits", ["--num", "16"], None),
    ("progressive", ["--num", "2", "--frames", "4"], (2, 4)),
    ("interpolation", ["--lambdas", "3"], (3, 5)),
    ("ddpm_vs_ddim", ["--num", "2"], (2, 6)),
    ("guidance", ["--steps", "2"], (10, 5)),
])
def test_model_examples_end_to_end_on_a_tiny_run(name, args, rows_by_cols, tiny_runs, tmp_path):
    run_dir = tiny_runs[RUN_DIRS[name]]
    out = run_example(name, "--run-dir", str(run_dir), "--backend", "numpy", "--out", f"out/{name}.png", *args,
                      cwd=tmp_path)
    assert "No trained model" not in out and str(run_dir) in out     # reused, never retrained
    files = written(out)
    assert files and files[0] == tmp_path / "out" / f"{name}.png"
    for file in files:
        assert file.exists()
    width, height = assert_sane_picture(files[0])
    if rows_by_cols is not None:                              # 8x8 digits drawn 64 px, plus labels
        rows, cols = rows_by_cols
        assert cols * 64 < width < cols * 66 + 200 and rows * 64 < height < rows * 66 + 60
    if name == "digits":                                      # two 4 x 4 grids side by side, titled; the loss
        assert 2 * 4 * 64 < width < 2 * 4 * 66 + 100 and 4 * 64 < height < 4 * 66 + 60
        assert files[1] == tmp_path / "out" / "digits_loss.png" and assert_sane_picture(files[1]) == (640, 400)


def test_digits_trains_with_a_progress_bar_when_the_run_is_missing(tmp_path, monkeypatch, capsys):
    digits = load_example("digits", monkeypatch)
    tiny = {k: v for k, v in TINY.items() if k not in ("steps", "backend")}
    monkeypatch.setattr(digits, "make_config", lambda *a, **kw: make_config(*a, **{**kw, **tiny}))
    run_dir = tmp_path / "new-run"
    digits.main(run_dir=str(run_dir), steps=3, num=4, backend="numpy", out=str(tmp_path / "d.png"))
    captured = capsys.readouterr()
    assert f"No trained model in {run_dir}: training the digits preset there first: 3 steps" in captured.out
    assert "seconds" in captured.out or "minutes" in captured.out                  # how long it takes
    assert "training" in captured.err and "3/3" in captured.err                    # tqdm's bar
    assert (run_dir / "checkpoint.safetensors").exists()
    assert written(captured.out) == [tmp_path / "d.png", tmp_path / "d_loss.png"]


def test_digits_model_announces_a_full_training(tmp_path, monkeypatch, capsys):
    common = load_example("common", monkeypatch)
    config = make_config("digits")
    common.announce_training(config, "somewhere")
    said = capsys.readouterr().out
    assert f"{config.steps} steps" in said and "somewhere" in said and "7 minutes" in said
