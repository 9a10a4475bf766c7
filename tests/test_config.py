"""config.validate and config.check_fits: every setting refused by name when it is wrong, before any work."""
import dataclasses
import math

import pytest

from minidiff import checkpoint, config
from minidiff.config import PRESETS, TrainConfig, check_fits, config_from_dict, make_config, validate

FLOATS = [f.name for f in dataclasses.fields(TrainConfig) if isinstance(f.default, float)]


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_non_finite_float_setting_is_refused_by_name(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
        make_config(**{name: value})


@pytest.mark.parametrize("overrides, message", [
    ({"lr": 1e6}, "lr must be at most"), ({"lr": 0.0}, "lr must be positive"), ({"grad_clip": -1.0}, "grad_clip"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"), ({"guidance": 1e308}, "guidance must lie"),
    ({"num_timesteps": 1}, "num_timesteps must be at least 2"), ({"num_timesteps": 10 ** 9}, "num_timesteps must be at most"),
    ({"ch": 10 ** 6}, "ch must be at most"), ({"ch_mult": (1,) * 12}, "ch_mult must hold"), ({"ch_mult": ()}, "ch_mult"),
    ({"ch_mult": (1, 0)}, "ch_mult"), ({"ch": 4096, "ch_mult": (1, 32)}, "ch_mult must keep"),
    ({"num_res_blocks": 10 ** 6}, "num_res_blocks must be at most"), ({"image_size": 2 ** 30}, "image_size must be at most"),
    ({"batch_size": 2 ** 40}, "batch_size must be at most"), ({"seed": -1}, "seed must be >= 0"),
    ({"attn_resolutions": (0,)}, "attn_resolutions"), ({"ch": True}, "ch must be a whole number"),
    ({"ch_mult": ("1", "2")}, "ch_mult must be a list of whole numbers"), ({"lr": "0.1"}, "lr must be a number"),
    ({"hflip": 1}, "hflip must be true or false"),
    ({"zero_terminal_snr": True}, "zero_terminal_snr needs mean_type v"),
    ({"zero_terminal_snr": True, "mean_type": "v", "sampler": "heun"}, "sampler heun starts at sigma_max"),
    ({"sampler": "plms"}, "unknown sampler 'plms'"), ({"zero_terminal_snr": 1}, "zero_terminal_snr must be true"),
])
def test_out_of_range_and_wrongly_typed_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_the_presets_and_their_data_sizes_are_accepted():
    for name, size in (("digits", 8), ("mnist", 32)):
        check_fits(make_config(name), size)
    validate(make_config("toy2d"))
    check_fits(make_config("toy2d"), None)
    assert set(PRESETS) == {"digits", "mnist", "toy2d"}


@pytest.mark.parametrize("overrides, size, message", [
    ({}, 32, "attn_resolutions 4 never occur"),                     # the digits preset on 32x32 data
    ({"ch_mult": (1, 2, 2, 2, 2)}, 8, "only 3 times: use at most 4"),
    ({"attn_resolutions": ()}, 1, "at least 2 pixels"),
    ({"ch_mult": (1, 2), "attn_resolutions": ()}, 7, "only 0 times"),
])
def test_check_fits_refuses_a_model_the_images_cannot_hold(overrides, size, message):
    with pytest.raises(ValueError, match=message):
        check_fits(make_config(**overrides), size)


def test_build_model_checks_the_fit_too():
    with pytest.raises(ValueError, match="never occur"):
        config.build_model(make_config(), 1, 32)


def test_config_from_dict_turns_junk_into_a_named_error():
    values = dataclasses.asdict(make_config())
    with pytest.raises(ValueError, match="num_timesteps must be a whole number"):
        validate(config_from_dict({**values, "num_timesteps": "1000"}))
    with pytest.raises(ValueError, match="unknown training options"):
        config_from_dict({**values, "nonsense": 1})


def test_the_limits_agree_with_the_checkpoint_reader():
    assert config.MAX_TIMESTEPS == checkpoint.MAX_TIMESTEPS
    assert config.MAX_IMAGE_SIZE == checkpoint.MAX_IMAGE_SIZE
    assert config.MAX_WIDTH == checkpoint.MAX_WIDTH and config.MAX_LEVELS == checkpoint.MAX_LEVELS
    assert config.MAX_RES_BLOCKS == checkpoint.MAX_RES_BLOCKS
    from minidiff import diffusion
    assert diffusion.LEARNED_VAR_TYPES == checkpoint.LEARNED_VAR_TYPES   # checkpoint.py imports backend only


def test_zero_terminal_snr_builds_the_rescaled_chain():
    """--zero-terminal-snr (with v prediction, Lin et al. 2023): alpha_bar_T = 0, the first step unchanged."""
    plain = config.build_diffusion(make_config(mean_type="v"))
    rescaled = config.build_diffusion(make_config(mean_type="v", zero_terminal_snr=True))
    assert rescaled.zero_terminal_snr and rescaled.alphas_cumprod[-1] == 0 and not plain.zero_terminal_snr
    assert rescaled.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0], rel=1e-12)
