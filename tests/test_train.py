"""Training: exact resume, NaN handling, presets and the 2-D MLP, on tiny configs (seconds)."""
import contextlib
import json
import math

import numpy as np
import pytest

from minidiff import backend, checkpoint, diffusion, kernels
from minidiff import train as training
from minidiff.config import PRESETS, TrainConfig, config_from_dict, make_config, preset_for
from minidiff.sampling import load_model
from minidiff.train import TrainingDiverged, Trainer, train
from minidiff.unet import MLPDenoiser

# A U-Net small enough that a step takes milliseconds; dropout and flips exercise every random stream.
TINY = dict(ch=8, ch_mult=(1,), attn_resolutions=(), num_res_blocks=1, batch_size=8, num_timesteps=10,
            num_samples=4, dropout=0.1, hflip=True, warmup=2, checkpoint_every=100)


def tiny(**overrides):
    return make_config("digits", **{**TINY, **overrides})


def test_default_config_is_the_digits_preset():
    config = TrainConfig()
    assert config.preset == "digits" and config.data == "digits"
    assert (config.ch, config.ch_mult, config.num_res_blocks, config.attn_resolutions) == (32, (1, 2), 1, (4,))
    assert config.batch_size == 128 and config.grad_clip == 1.0 and config.num_timesteps == 1000
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


def test_a_nan_loss_never_reaches_the_weights_or_the_adam_moments(monkeypatch):
    trainer = Trainer(tiny(steps=3))
    trainer.train_step()
    before = [np.array(backend.to_numpy(a)) for a in trainer.replicated_arrays()[:3]]   # weights, Adam m and v
    original = diffusion.GaussianDiffusion.training_losses
    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_losses",
                        lambda self, *a, **k: {"loss": original(self, *a, **k)["loss"] * float("nan")})
    with pytest.raises(TrainingDiverged, match="loss is nan at step 2"):
        trainer.train_step()
    assert trainer.step == 1 and trainer.optimizer.step_count == 1
    for old, new in zip(before, trainer.replicated_arrays()[:3]):
        np.testing.assert_array_equal(old, backend.to_numpy(new))


def test_algorithm_1_step_is_lines_3_to_5_with_a_check_between_gradient_and_update():
    """t and eps from `rng` (lines 3-4), the gradient of the loss, `before_update(loss)`, then the step (line 5)."""
    trainer = Trainer(tiny())
    x_start = backend.to_active(next(trainer.batches))
    flat = trainer.optimizer.flat
    weights = np.array(backend.to_numpy(flat.data))
    seen = []

    def before_update(loss):
        seen.append((float(loss.data), all(p.grad is not None for p in trainer.model.parameters()),
                     np.array_equal(backend.to_numpy(flat.data), weights)))

    loss, grad_norm, t_drawn, losses = training.algorithm_1_step(trainer.diffusion, trainer.model, trainer.optimizer,
                                                                 x_start, trainer.rng, before_update=before_update)
    assert seen == [(float(loss.data), True, True)]   # the gradient is there, the weights not yet updated
    assert grad_norm > 0 and not np.array_equal(backend.to_numpy(flat.data), weights)
    # the same draws of t and eps give the same loss: the step is lines 3-5 and nothing else
    replay = Trainer(tiny())
    t = replay.rng.integers(0, replay.diffusion.num_timesteps, (len(x_start),))
    noise = replay.rng.normal(x_start.shape)
    expected = replay.diffusion.training_losses(replay.model, x_start, t, noise=noise)["loss"]
    assert float(expected.mean().data) == float(loss.data)
    # it also returns the t it drew and the per-sample losses (what an importance sampler learns from)
    np.testing.assert_array_equal(backend.to_numpy(t_drawn), backend.to_numpy(t))
    np.testing.assert_array_equal(backend.to_numpy(losses), backend.to_numpy(expected.data))


def test_mlp_denoiser_learns_a_swiss_roll_direction():
    """The 2-D preset runs end to end: shapes, records, and the loss goes down."""
    model = MLPDenoiser(hidden=16, layers=2)
    assert model(backend.to_active(np.zeros((5, 2), np.float32)), np.arange(5)).shape == (5, 2)
    records = list(train(make_config(data="swissroll", steps=60, num_timesteps=20, batch_size=64, mlp_hidden=32,
                                     warmup=5, lr=1e-2)))
    losses = [r["loss"] for r in records]
    assert math.isfinite(losses[-1]) and np.mean(losses[-10:]) < np.mean(losses[:10])


# ---------------------------------------------------------------- class-conditional training (Ho & Salimans 2022)

DATA_DIR = __import__("pathlib").Path(__file__).resolve().parent / "data"


def test_conditional_training_feeds_the_batch_labels_and_drops_them_with_p_uncond():
    """Ho & Salimans' Algorithm 1: each sample's label, replaced by NO_LABEL with probability p_uncond."""
    from minidiff import data
    config = tiny(conditional=True, p_uncond=0.3, steps=40)
    trainer = Trainer(config)
    assert trainer.num_classes == 10 and trainer.model.num_classes == 10
    seen = []
    original = trainer.model.forward

    def spy(x, t, y=None):
        seen.append(np.asarray(y).copy())
        return original(x, t, y)

    trainer.model.forward = spy
    replay = data.Batches(trainer.data, config.batch_size, rng=[config.seed, 1], hflip=True, labels=trainer.labels)
    for _ in range(config.steps):
        trainer.train_step()
    kept = dropped = 0
    for y in seen:
        _, labels = next(replay)
        keep = y != diffusion.NO_LABEL
        np.testing.assert_array_equal(y[keep], labels[keep])   # the batch's own labels where kept
        kept, dropped = kept + keep.sum(), dropped + (~keep).sum()
    assert dropped / (kept + dropped) == pytest.approx(0.3, abs=0.08)   # 320 draws: sd 0.026


def test_unconditional_training_is_unchanged_by_the_conditional_options():
    """An unconditional run draws no label randomness: p_uncond does not change it, bit for bit."""
    def losses(config):   # one Trainer at a time: each installs the package-wide default generator
        trainer = Trainer(config)
        assert "label_emb.weight" not in dict(trainer.model.named_parameters())
        return [trainer.train_step() for _ in range(3)]

    assert losses(tiny(steps=3)) == losses(tiny(steps=3, p_uncond=0.5, guidance=4.0))


@pytest.mark.parametrize("name", ["swissroll", "npy"])
def test_conditional_on_unlabelled_data_is_a_clear_error(name, tmp_path):
    from minidiff.data import DataError
    if name == "npy":
        name = str(tmp_path / "x.npy")
        np.save(name, np.zeros((10, 8, 8), np.uint8))
    with pytest.raises(DataError, match="--conditional needs label"):
        Trainer(tiny(conditional=True, data=name))


def test_bad_p_uncond_is_refused():
    with pytest.raises(ValueError, match="p_uncond"):
        tiny(p_uncond=1.0)


def test_conditional_checkpoint_round_trips_resumes_and_samples_one_row_per_class(tmp_path):
    config = tiny(conditional=True, steps=4, checkpoint_every=2, sample_every=2, num_samples=20)
    run_to_end(config, tmp_path / "straight")
    run = train(config, tmp_path / "resumed")
    for record in run:
        if record["step"] == 2:
            break
    run.close()
    run_to_end(config, tmp_path / "resumed", resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")

    state = checkpoint.load(tmp_path / "straight")
    assert state["model_config"]["num_classes"] == 10 and state["data_info"]["num_classes"] == 10
    model, d, loaded_config, info = load_model(tmp_path / "straight")
    assert model.num_classes == 10 and loaded_config.conditional
    ema = {k[len("shadow."):]: v for k, v in state["ema"].items() if k.startswith("shadow.")}
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(np.asarray(value), ema[name])
    # (drawing guided samples from such a checkpoint: tests/test_sampling.py)
    from PIL import Image
    with Image.open(tmp_path / "straight" / "samples.png") as grid:   # 10 rows of 2 (8x8 images, scaled)
        assert grid.size[1] > 4 * grid.size[0]


def test_resume_refuses_to_switch_conditioning(tmp_path):
    run_to_end(tiny(steps=2), tmp_path)
    with pytest.raises(ValueError, match="conditional"):
        run_to_end(tiny(steps=4, conditional=True), tmp_path, resume=True)


def test_a_checkpoint_written_before_classifier_free_guidance_loads_samples_and_resumes_unchanged(tmp_path):
    """tests/data holds a 2-step unconditional run saved by the code before classifier-free guidance
    (hence the files' names), with its model's eps and a 5-step DDIM draw as that code computed them."""
    from minidiff import backend
    from minidiff.tensor import Tensor
    old = DATA_DIR / "unconditional_before_issue14.safetensors"
    model, d, config, info = load_model(old)
    assert model.num_classes is None and not config.conditional and "num_classes" not in info
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    # float32 tolerance, not bits: the stored arrays were computed on another CPU, whose BLAS kernels round
    # differently (this failed bit-for-bit at the previous main too, on this machine); a wrong load is far off
    np.testing.assert_allclose(backend.to_numpy(model(Tensor(x), np.array([1, 7])).data),
                               np.load(DATA_DIR / "unconditional_before_issue14_eps.npy"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(backend.to_numpy(d.ddim_sample_loop(model, (2, 1, 8, 8), num_steps=5, seed=3)),
                               np.load(DATA_DIR / "unconditional_before_issue14_ddim.npy"), rtol=1e-5, atol=1e-5)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.safetensors").write_bytes(old.read_bytes())
    saved = checkpoint.load(old)["config"]
    resumed = run_to_end(config_from_dict({**saved, "steps": 3}), run_dir, resume=True)
    assert [r["step"] for r in resumed] == [3]


def test_conditional_training_on_an_npz_with_uint8_labels(tmp_path):
    """NO_LABEL (-1) must not wrap around to 255 in a uint8 label array."""
    rng = np.random.default_rng(0)
    path = tmp_path / "x.npz"
    np.savez(path, images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
             labels=rng.integers(0, 3, 40).astype(np.uint8))
    trainer = Trainer(tiny(conditional=True, data=str(path), p_uncond=0.5))
    assert trainer.num_classes == 3 and trainer.labels.dtype == np.int64
    for _ in range(3):
        trainer.train_step()
    from minidiff.diffusion import GaussianDiffusion
    from minidiff.schedule import get_named_beta_schedule
    d = GaussianDiffusion(get_named_beta_schedule("linear", 10))
    trainer.model.eval()
    d.ddim_sample_loop(trainer.model, (2, 1, 8, 8), num_steps=2, model_kwargs={"y": np.array([0, 2], np.uint8)},
                       guidance=1.0)


# ---------------------------------------------------------------- a step shaped for a GPU


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_a_digits_training_step_fits_the_gpu_budget(standin, mode):
    """digits preset, --dropout 0.1, batch 64, on the strict CuPy stand-in: per step at most 4x the batch's
    own bytes copied host->device and two syncs, in both kernel modes; with the kernels (the fast mode, which
    a GPU run uses) at most 3000 array operations (kernel launches). The plain math layer launches about
    twice as many (5980 when measured): its Adam and EMA loop over the 72 parameter tensors, where the
    kernels update one flat buffer, and its col2im adds one slice per kernel offset.

    Before the step was reshaped for a GPU: 7214 operations and 2,916,864 bytes (178x: the dropout masks).
    benchmarks/count_step.py prints the same count with a breakdown.
    """
    kernels.use_kernels(mode)
    config = make_config(preset="digits", dropout=0.1, batch_size=64, backend="cupy")
    trainer = Trainer(config)
    for _ in range(2):  # warm-up: the schedule tables and group-norm averagers reach the device once
        trainer.train_step()
    standin.reset()
    trainer.train_step()
    ops, h2d = standin.counts["ops"], standin.counts["h2d_bytes"]
    batch_bytes = trainer.data[:64].nbytes
    assert isinstance(trainer.model.parameters()[0].data, standin.ndarray)  # it really ran on the device
    budget = 3000 if mode == "fast" else 6500
    assert ops <= budget, f"{ops} array operations per step (budget {budget}); see benchmarks/count_step.py --sites"
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


def test_conditional_training_and_guided_sampling_stay_on_the_device(standin):
    """Classifier-free guidance on the strict CuPy stand-in: labels, the p_uncond drop and the doubled guided batch
    never mix host and device arrays, and the model runs on the device."""
    trainer = Trainer(tiny(conditional=True, backend="cupy", p_uncond=0.5))
    for _ in range(2):
        trainer.train_step()
    standin.reset()
    samples = trainer.sample(10, seed=0, steps=3)   # one per class, guided with config.guidance = 2
    assert samples.shape == (10, 1, 8, 8) and standin.counts["ops"] > 100
    assert isinstance(trainer.model.label_emb.weight.data, standin.ndarray)


# ---------------------------------------------------------------- learned variances and importance sampling


def test_a_learned_variance_run_trains_the_hybrid_loss_on_a_model_with_twice_the_channels(tmp_path):
    """--learn-sigma's config: the U-Net outputs 2C channels (out_channels), the checkpoint describes and
    validates that model, and the loaded run samples with its learned variance."""
    config = tiny(steps=3, var_type="learned_range", loss_type="hybrid")
    records = run_to_end(config, tmp_path)
    assert all(math.isfinite(r["loss"]) for r in records)
    model, d, loaded, info = load_model(tmp_path)
    assert model.config["out_channels"] == 2 * info["channels"] and d.learn_sigma and d.loss_type == "hybrid"
    assert checkpoint.load(tmp_path)["model_config"]["out_channels"] == 2
    x = d.respaced(5).p_sample_loop(model, (2, 1, 8, 8), seed=0)
    assert x.shape == (2, 1, 8, 8) and np.isfinite(backend.to_numpy(x)).all()


def test_the_learned_variance_mlp_outputs_four_values_per_point(tmp_path):
    config = make_config("toy2d", steps=2, batch_size=16, num_samples=8, var_type="learned", loss_type="kl",
                         checkpoint_every=100, sample_every=0)
    run_to_end(config, tmp_path)
    model, d, _, _ = load_model(tmp_path)
    assert model.config["out_dim"] == 4 and d.p_sample_loop(model, (3, 2), seed=0).shape == (3, 2)


def test_an_importance_sampled_run_resumes_bit_identically_with_its_loss_history(tmp_path):
    """T = 10 and batch 8: the history fills (10 values per t) after ~13 steps, so the run crosses from uniform
    to importance sampling; stopped at step 9 and resumed, it ends equal to a straight run, history included."""
    config = tiny(steps=22, var_type="learned_range", loss_type="hybrid", timestep_sampler="importance",
                  checkpoint_every=100)
    straight = run_to_end(config, tmp_path / "straight")
    run = train(config, tmp_path / "resumed")
    for record in run:
        if record["step"] == 9:
            break
    run.close()
    history = checkpoint.load(tmp_path / "resumed")["timestep_sampler"]
    counts = history["counts"]
    assert counts.max() == 10 and counts.min() < 10 and counts.sum() < 9 * 8   # some t full (kept last 10), not all
    resumed = run_to_end(config, tmp_path / "resumed", resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert [r["loss"] for r in straight[9:]] == [r["loss"] for r in resumed]
    a, b = (checkpoint.load(tmp_path / name)["timestep_sampler"] for name in ("straight", "resumed"))
    assert (a["counts"] == 10).all()   # warmed up: the last steps drew t by importance
    for key in ("history", "counts"):
        np.testing.assert_array_equal(a[key], b[key])


def test_importance_sampling_draws_t_from_the_history_and_weights_the_loss():
    """Once warmed up, t follows p_t and the step's loss is mean(loss_i / (T p_t_i)): replayed by hand."""
    trainer = Trainer(tiny(var_type="learned_range", loss_type="kl", timestep_sampler="importance"))
    sampler = trainer.timestep_sampler
    rng = np.random.default_rng(0)
    T = trainer.diffusion.num_timesteps
    sampler.update(np.repeat(np.arange(T), 10), rng.uniform(0.01, 5.0, 10 * T) * np.repeat(np.arange(1, T + 1), 10))
    p = sampler.probabilities()
    assert sampler.warmed_up() and p[-1] > 5 * p[0]
    x_start = backend.to_active(next(trainer.batches))
    state = trainer.rng.get_state()
    loss, _, t, losses = training.algorithm_1_step(trainer.diffusion, trainer.model, trainer.optimizer, x_start,
                                                   trainer.rng, timestep_sampler=sampler)
    trainer.rng.set_state(state)
    u = trainer.rng.uniform((len(x_start),), dtype=np.float64)
    expected_t = np.minimum(np.searchsorted(np.cumsum(p), backend.to_numpy(u), side="right"), T - 1)
    np.testing.assert_array_equal(backend.to_numpy(t), expected_t)
    weighted = np.mean(backend.to_numpy(losses).astype(np.float64) / (T * p[expected_t]))
    assert float(loss.data) == pytest.approx(weighted, rel=1e-5)


def test_a_corrupt_loss_history_is_refused_on_resume(tmp_path):
    config = tiny(steps=2, var_type="learned_range", loss_type="hybrid", timestep_sampler="importance")
    run_to_end(config, tmp_path)
    state = checkpoint.load(tmp_path)
    state["timestep_sampler"]["counts"][0] = 99
    checkpoint.save(tmp_path / checkpoint.FILENAME, state)
    with pytest.raises(ValueError, match="timestep sampler state is unusable: the history counts must lie in"):
        run_to_end(tiny(**{**TINY, "steps": 4, "var_type": "learned_range", "loss_type": "hybrid",
                           "timestep_sampler": "importance"}), tmp_path, resume=True)


@pytest.mark.parametrize("bad,match", [
    (dict(loss_type="hybrid"), "loss_type hybrid trains a learned variance.*--learn-sigma"),
    (dict(var_type="learned_range"), "gives it no gradient.*--learn-sigma"),
    (dict(var_type="learned_range", loss_type="hybrid", vlb_weight=0.0), "vlb_weight must be positive"),
    (dict(timestep_sampler="often"), "timestep_sampler"),
])
def test_learned_variance_settings_that_cannot_train_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)
