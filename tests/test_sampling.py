"""Sampling for callers: loading a finished model, the fewer-steps policy, seeded batches, labels and guidance."""
import contextlib

import numpy as np
import pytest

from minidiff import backend, checkpoint, pretrained
from minidiff.checkpoint import CheckpointError
from minidiff.config import make_config
from minidiff.diffusion import GaussianDiffusion
from minidiff.sampling import draw_samples, every_class, load_model, sampling_plan
from minidiff.schedule import get_named_beta_schedule
from minidiff.train import train
from minidiff.unet import UNet

# A U-Net small enough that a training step takes milliseconds (the same as tests/test_train.py's).
TINY = dict(ch=8, ch_mult=(1,), attn_resolutions=(), num_res_blocks=1, batch_size=8, num_timesteps=10,
            num_samples=4, dropout=0.1, hflip=True, warmup=2, checkpoint_every=100)


def tiny(**overrides):
    return make_config("digits", **{**TINY, **overrides})


def trained_run(config, out_dir):
    with contextlib.closing(train(config, out_dir)) as run:
        for _ in run:
            pass
    return out_dir


# ---------------------------------------------------------------- load_model


def test_load_model_gives_the_ema_or_live_weights(tmp_path):
    trained_run(tiny(steps=3), tmp_path)
    state = checkpoint.load(tmp_path)
    ema_model, diff, config, info = load_model(tmp_path)
    live_model, *_ = load_model(tmp_path / "checkpoint.safetensors", use_ema=False)
    name = "conv_in.weight"
    np.testing.assert_array_equal(backend.to_numpy(ema_model.state_dict()[name]), state["ema"][f"shadow.{name}"])
    np.testing.assert_array_equal(backend.to_numpy(live_model.state_dict()[name]), state["model"][name])
    assert not np.array_equal(state["ema"][f"shadow.{name}"], state["model"][name])   # two different sets
    assert diff.num_timesteps == 10 and info["image_size"] == 8 and config == tiny(steps=3)
    assert not ema_model.training


def test_load_model_reads_a_converted_model_with_its_one_set_of_weights(tmp_path):
    backend.manual_seed(0)
    model = UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 10))
    path = tmp_path / "converted.safetensors"
    pretrained.save_converted(path, model, diffusion, {"image_size": 8, "channels": 1, "clip_denoised": False})
    loaded, loaded_diffusion, config, info = load_model(path)
    assert config is None and info["clip_denoised"] is False
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(backend.to_numpy(loaded.state_dict()[name]), backend.to_numpy(value))
    np.testing.assert_array_equal(loaded_diffusion.betas, diffusion.betas)
    with pytest.raises(CheckpointError, match="one set of weights"):
        load_model(path, use_ema=False)


def test_load_model_names_a_checkpoint_it_cannot_rebuild(tmp_path):
    trained_run(tiny(steps=1), tmp_path)
    state = checkpoint.load(tmp_path)
    state["config"]["no_such_option"] = 1   # as a newer minidiff might write
    checkpoint.save(tmp_path / "other.safetensors", state)
    with pytest.raises(CheckpointError, match=r"other\.safetensors: cannot rebuild the model .*no_such_option"):
        load_model(tmp_path / "other.safetensors")
    checkpoint.save(tmp_path / "foreign.safetensors", {"format": "something else"})
    with pytest.raises(CheckpointError, match="not a minidiff training checkpoint"):
        load_model(tmp_path / "foreign.safetensors")


# ---------------------------------------------------------------- the policy and the draws


def test_one_policy_for_sampling_with_fewer_steps():
    """All T steps: Algorithm 2. Fewer: DDIM by default; ancestral only when asked, on a respaced chain;
    each few-step sampler's own default number of steps and options."""
    d = GaussianDiffusion(get_named_beta_schedule("linear", 100))
    assert sampling_plan(d) == (d, "ddpm", 100, {})
    assert sampling_plan(d, steps=100) == (d, "ddpm", 100, {})
    assert sampling_plan(d, steps=10) == (d, "ddim", 10, {"eta": 0.0})
    assert sampling_plan(d, "ddim") == (d, "ddim", 50, {"eta": 0.0})
    assert sampling_plan(d, "ddim", 10, eta=1.0, spacing="trailing") == (d, "ddim", 10,
                                                                          {"eta": 1.0, "spacing": "trailing"})
    spaced, sampler, steps, options = sampling_plan(d, "ddpm", 10)
    assert (spaced.num_timesteps, sampler, steps) == (10, "ddpm", 10) and spaced.timestep_map is not None
    assert sampling_plan(d, "dpm++") == (d, "dpm++", 20, {"order": 2, "spacing": "linspace"})
    assert sampling_plan(d, "dpm++", 5, order=3, spacing="trailing").options == {"order": 3, "spacing": "trailing"}
    assert sampling_plan(d, "heun") == (d, "heun", 10, {"solver": "heun"})
    assert sampling_plan(d, "heun").network_calls == 19 and sampling_plan(d, "euler").network_calls == 20
    settings = {"spacing": "trailing", "set_alpha_to_one": False, "steps_offset": 0}   # a converted DDIM's
    assert sampling_plan(d, "ddim", 10, ddim_settings=settings).options == {"eta": 0.0, **settings}
    assert sampling_plan(d, "ddim", 10, spacing="linspace", ddim_settings=settings).options["spacing"] == "linspace"
    assert sampling_plan(d, "dpm++", ddim_settings=settings).options == {"order": 2, "spacing": "linspace"}
    with pytest.raises(ValueError, match="between 1 and T = 100"):
        sampling_plan(d, steps=101)
    with pytest.raises(ValueError, match="unknown sampler"):
        sampling_plan(d, "plms")
    for sampler, kwargs, match in [("ddpm", {"eta": 1.0}, "^eta is DDIM's"), ("heun", {"order": 2}, "^order is"),
                                   ("dpm++", {"order": 4}, "^order must be 1, 2 or 3"),
                                   ("euler", {"spacing": "trailing"}, "^spacing places"),
                                   ("ddpm", {"spacing": "trailing"}, "^spacing places"),
                                   ("ddim", {"spacing": "even"}, "unknown spacing"),
                                   ("dpm++", {"steps": 100}, "cannot place 100 distinct timesteps")]:
        with pytest.raises(ValueError, match=match):
            sampling_plan(d, sampler, **kwargs)


def test_every_sampler_runs_through_its_plan_with_the_calls_it_announces():
    """plan.run reaches each loop (and its progressive twin) with the plan's steps and options."""
    d = GaussianDiffusion(get_named_beta_schedule("linear", 30))
    calls = []

    def model(x, t):
        calls.append(np.asarray(t)[0])
        return 0.1 * x

    for sampler in ("ddpm", "ddim", "dpm++", "heun", "euler"):
        plan = sampling_plan(d, sampler, 6)
        calls.clear()
        x = plan.run(model, (3, 2), seed=0, clip_denoised=False)
        assert x.shape == (3, 2) and len(calls) == plan.network_calls, sampler
        steps = list(plan.run(model, (3, 2), progressive=True, seed=0, clip_denoised=False))
        assert len(steps) == 6 and np.array_equal(steps[-1]["sample"], x), sampler
    assert sampling_plan(d, "heun", 6).network_calls == 11


def test_draw_samples_batches_are_seeded_streams():
    """The first batch is the same whatever the number drawn; a respaced draw keeps num_bins."""
    d = GaussianDiffusion(get_named_beta_schedule("linear", 20), num_bins=17)
    model = lambda x, t: x * 0.1  # noqa: E731
    a = draw_samples(d, model, (1, 2, 2), num=3, seed=4, steps=5, batch_size=2)
    b = draw_samples(d, model, (1, 2, 2), num=2, seed=4, steps=5, batch_size=2)
    assert a.shape == (3, 1, 2, 2)
    np.testing.assert_array_equal(a[:2], b)
    assert not np.array_equal(a[:2], draw_samples(d, model, (1, 2, 2), num=2, seed=5, steps=5, batch_size=2))
    assert d.respaced(5).num_bins == 17
    with pytest.raises(ValueError, match="num_bins"):
        GaussianDiffusion(get_named_beta_schedule("linear", 20), num_bins=1)


def test_every_class_gives_one_grid_row_per_class():
    assert every_class(10, 20).tolist() == [c for c in range(10) for _ in range(2)]
    assert every_class(3, 2).tolist() == [0, 1, 2]   # at least one of each


def test_guided_draws_of_a_conditional_checkpoint_ask_for_every_class(tmp_path):
    """Labels reach the model batch by batch, each step on [labels; no label] (Ho & Salimans 2022, Eq. 6)."""
    trained_run(tiny(conditional=True, steps=2), tmp_path)
    model, d, config, _ = load_model(tmp_path)
    assert model.num_classes == 10 and config.conditional
    labels = every_class(10, 20)
    a = draw_samples(d, model, (1, 8, 8), 20, seed=1, steps=5, labels=labels, guidance=2.0)
    seen = []

    def spy(x, t, y):
        seen.append(np.asarray(y).tolist())
        return model(x, t, y)

    b = draw_samples(d, spy, (1, 8, 8), 20, seed=1, steps=5, labels=labels, guidance=2.0, batch_size=7)
    np.testing.assert_allclose(a[:7], b[:7], atol=1e-6)   # batch 0 has the same stream [seed, 0]
    starts = [0] * 5 + [7] * 5 + [14] * 5   # 5 DDIM steps per batch, each on [labels; no label]
    assert seen == [labels[s:s + 7].tolist() + [-1] * len(labels[s:s + 7]) for s in starts]
    assert not np.allclose(a, draw_samples(d, model, (1, 8, 8), 20, seed=1, steps=5))
    with pytest.raises(ValueError, match="one label per sample"):
        draw_samples(d, model, (1, 8, 8), 5, seed=1, steps=5, labels=labels)
    with pytest.raises(ValueError, match="guidance needs labels"):
        draw_samples(d, model, (1, 8, 8), 5, seed=1, steps=5, guidance=1.0)
