"""Training: exact resume, NaN handling, presets and the 2-D MLP, on tiny configs (seconds)."""
import contextlib
import json
import math

import numpy as np
import pytest

from minidiff import backend, checkpoint, diffusion
from minidiff import train as training
from minidiff.train import (PRESETS, MLPDenoiser, TrainConfig, TrainingDiverged, Trainer, load_model, make_config,
                            preset_for, train)

# A U-Net small enough that a step takes milliseconds; dropout and flips exercise every random stream.
TINY = dict(ch=8, ch_mult=(1,), attn_resolutions=(), num_res_blocks=1, batch_size=8, num_timesteps=10,
            num_samples=4, dropout=0.1, hflip=True, warmup=2, checkpoint_every=100)


def tiny(**overrides):
    return make_config("digits", **{**TINY, **overrides})


def test_default_config_is_the_digits_preset():
    config = TrainConfig()
    assert config.preset == "digits" and config.data == "digits"
    assert (config.ch, config.ch_mult, config.num_res_blocks, config.attn_resolutions) == (32, (1, 2), 1, (4,))
    assert config.batch_size == 64 and config.grad_clip == 1.0 and config.num_timesteps == 1000
    assert make_config() == config


def test_presets_build_and_data_picks_its_preset():
    assert preset_for("swissroll") == "toy2d" and preset_for("mnist") == "mnist" and preset_for("x.npz") == "digits"
    for name in PRESETS:
        assert make_config(name).preset == name
    assert make_config(data="moons").preset == "toy2d"


def test_every_knob_has_help():
    import dataclasses
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help text"


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "steps must be a positive"), (dict(batch_size=-1), "batch_size"),
    (dict(ema_decay=1.0), "ema_decay"), (dict(lr=0.0), "lr"), (dict(preset="huge"), "unknown preset"),
    (dict(bogus=1), "unknown training options")])
def test_bad_configs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        make_config(**bad) if "preset" not in bad else make_config(bad["preset"])


def test_records_and_loss_decrease_on_a_fixed_setting():
    records = list(train(tiny(steps=40, lr=3e-3, dropout=0.0)))
    assert [r["step"] for r in records] == list(range(1, 41))
    assert {"step", "loss", "lr", "grad_norm", "time"} <= set(records[0])
    assert records[0]["lr"] == pytest.approx(3e-3 / 2)          # linear warmup over 2 steps
    assert records[5]["lr"] == pytest.approx(3e-3)
    first, last = np.mean([r["loss"] for r in records[:5]]), np.mean([r["loss"] for r in records[-5:]])
    assert last < first


def run_to_end(config, out_dir, resume=False):
    with contextlib.closing(train(config, out_dir, resume=resume)) as run:
        return [r for r in run]


def assert_same_run(dir_a, dir_b):
    a, b = checkpoint.load(dir_a), checkpoint.load(dir_b)
    assert a["step"] == b["step"]
    for part in ("model", "ema", "optimizer"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            np.testing.assert_array_equal(a[part][key], b[part][key], err_msg=f"{part}/{key}")   # bit for bit
    assert a["rng"] == b["rng"]


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, backend_name):
    """Stop after 3 of 7 steps (closing the generator saves), resume, and compare with one straight run.

    Sample grids every 2 steps must not disturb the training's random streams either."""
    config = tiny(steps=7, sample_every=2, backend=backend_name)
    straight = run_to_end(config, tmp_path / "straight")

    run = train(config, tmp_path / "resumed")
    for record in run:
        if record["step"] == 3:
            break
    run.close()   # what the CLI does on Ctrl-C
    assert checkpoint.load(tmp_path / "resumed")["step"] == 3
    resumed = run_to_end(config, tmp_path / "resumed", resume=True)
    assert [r["step"] for r in resumed] == [4, 5, 6, 7]

    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert [r["loss"] for r in straight[3:]] == [r["loss"] for r in resumed]
    log = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 8))      # no duplicated or missing lines
    for name in ("samples.png", "loss.png", "checkpoint.safetensors", "samples/step_0000004.png"):
        assert (tmp_path / "resumed" / name).is_file()


def test_resume_from_a_periodic_checkpoint_after_a_hard_crash(tmp_path):
    """A crash (an exception inside a step) loses the steps since the last checkpoint, nothing else."""
    config = tiny(steps=6, checkpoint_every=2, log_format="csv")
    run_to_end(config, tmp_path / "straight")
    calls = {"n": 0}
    original = Trainer.train_step

    def crash_on_step_4(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("power cut")
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", crash_on_step_4)
        with pytest.raises(RuntimeError, match="power cut"):
            run_to_end(config, tmp_path / "crashed")
    assert checkpoint.load(tmp_path / "crashed")["step"] == 2
    run_to_end(config, tmp_path / "crashed", resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed")
    lines = (tmp_path / "crashed" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss") and [int(l.split(",")[0]) for l in lines[1:]] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_changed_model(tmp_path):
    run_to_end(tiny(steps=2), tmp_path)
    with pytest.raises(ValueError, match="ch"):
        run_to_end(tiny(steps=4, ch=16), tmp_path, resume=True)
    with pytest.raises(ValueError, match="already trained 2 steps"):
        run_to_end(tiny(steps=2), tmp_path, resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = diffusion.GaussianDiffusion.training_losses
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = original(self, *args, **kwargs)
        return {"loss": out["loss"] * float("nan")} if calls["n"] == 5 else out

    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_losses", poisoned)
    config = tiny(steps=10, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*last good checkpoint \(step 4\)"):
        run_to_end(config, tmp_path)
    state = checkpoint.load(tmp_path)
    assert state["step"] == 4
    assert all(np.isfinite(v).all() for v in state["model"].values())


def test_load_model_gives_the_ema_or_live_weights(tmp_path):
    run_to_end(tiny(steps=3), tmp_path)
    state = checkpoint.load(tmp_path)
    ema_model, diff, config, info = load_model(tmp_path)
    live_model, *_ = load_model(tmp_path / "checkpoint.safetensors", use_ema=False)
    name = "conv_in.weight"
    np.testing.assert_array_equal(backend.to_numpy(ema_model.state_dict()[name]), state["ema"][f"shadow.{name}"])
    np.testing.assert_array_equal(backend.to_numpy(live_model.state_dict()[name]), state["model"][name])
    assert diff.num_timesteps == 10 and info["image_size"] == 8 and config == tiny(steps=3)


def test_mlp_denoiser_learns_a_swiss_roll_direction():
    """The 2-D preset runs end to end: shapes, records, and the loss goes down."""
    model = MLPDenoiser(hidden=16, layers=2)
    assert model(backend.to_active(np.zeros((5, 2), np.float32)), np.arange(5)).shape == (5, 2)
    records = list(train(make_config(data="swissroll", steps=60, num_timesteps=20, batch_size=64, mlp_hidden=32,
                                     warmup=5, lr=1e-2)))
    losses = [r["loss"] for r in records]
    assert math.isfinite(losses[-1]) and np.mean(losses[-10:]) < np.mean(losses[:10])


def test_one_policy_for_sampling_with_fewer_steps():
    """All T steps: Algorithm 2. Fewer: DDIM by default; ancestral only when asked, on a respaced chain."""
    from minidiff.diffusion import GaussianDiffusion
    from minidiff.schedule import get_named_beta_schedule
    d = GaussianDiffusion(get_named_beta_schedule("linear", 100))
    assert training.sampling_plan(d) == (d, 100, False)
    assert training.sampling_plan(d, steps=100) == (d, 100, False)
    assert training.sampling_plan(d, steps=10) == (d, 10, True)
    assert training.sampling_plan(d, "ddim") == (d, 50, True)
    spaced, steps, ddim = training.sampling_plan(d, "ddpm", 10)
    assert (spaced.num_timesteps, steps, ddim) == (10, 10, False) and spaced.timestep_map is not None
    with pytest.raises(ValueError, match="between 1 and T = 100"):
        training.sampling_plan(d, steps=101)


def test_draw_samples_batches_are_seeded_streams():
    """The first batch is the same whatever the number drawn; a respaced draw keeps num_bins."""
    from minidiff.diffusion import GaussianDiffusion
    from minidiff.schedule import get_named_beta_schedule
    d = GaussianDiffusion(get_named_beta_schedule("linear", 20), num_bins=17)
    model = lambda x, t: x * 0.1  # noqa: E731
    a = training.draw_samples(d, model, (1, 2, 2), num=3, seed=4, steps=5, batch_size=2)
    b = training.draw_samples(d, model, (1, 2, 2), num=2, seed=4, steps=5, batch_size=2)
    assert a.shape == (3, 1, 2, 2)
    np.testing.assert_array_equal(a[:2], b)
    assert d.respaced(5).num_bins == 17
    with pytest.raises(ValueError, match="num_bins"):
        GaussianDiffusion(get_named_beta_schedule("linear", 20), num_bins=1)


# ---------------------------------------------------------------- issue 10: a step shaped for a GPU


def test_a_digits_training_step_fits_the_gpu_budget(standin):
    """digits preset, --dropout 0.1, batch 64, on the strict CuPy stand-in: per step at most 3000 array
    operations (kernel launches) and at most 4x the batch's own bytes copied host->device.

    Before issue 10 (commit 0b8bd53): 7214 operations and 2,916,864 bytes (178x: the dropout masks).
    benchmarks/count_step.py prints the same count with a breakdown.
    """
    config = make_config(preset="digits", dropout=0.1, batch_size=64, backend="cupy")
    trainer = Trainer(config)
    for _ in range(2):  # warm-up: the schedule tables and group-norm averagers reach the device once
        trainer.train_step()
    standin.reset()
    trainer.train_step()
    ops, h2d = standin.counts["ops"], standin.counts["h2d_bytes"]
    batch_bytes = trainer.data[:64].nbytes
    assert isinstance(trainer.model.parameters()[0].data, standin.ndarray)  # it really ran on the device
    assert ops <= 3000, f"{ops} array operations per step (budget 3000); see benchmarks/count_step.py --sites"
    assert h2d <= 4 * batch_bytes, f"{h2d} bytes host->device per step; the batch itself is {batch_bytes}"
    assert standin.counts["syncs"] <= 2  # the loss and the gradient norm, nothing else


def test_a_seed_draws_the_same_streams_on_both_backends(standin):
    """Weights, batches, t, eps and dropout masks: the same numbers on numpy and cupy for one seed.

    The stand-in computes with NumPy, so any difference here is a random stream that differs
    between the backends (on a GPU, float32 rounding would add its own, smaller, differences).
    """
    runs = {}
    for name in ("numpy", "cupy"):
        trainer = Trainer(tiny(backend=name))
        losses = [trainer.train_step()[0] for _ in range(3)]
        runs[name] = losses, {k: backend.to_numpy(v) for k, v in trainer.model.state_dict().items()}
    assert runs["numpy"][0] == runs["cupy"][0]
    for key, value in runs["numpy"][1].items():
        np.testing.assert_array_equal(value, runs["cupy"][1][key], err_msg=key)
