"""minidiff.pretrained held to diffusers: folders written by diffusers itself, loaded and run by minidiff.

The U-Net tests build UNet2DModels with diffusers, perturb every parameter (so that no
zero or one initialisation can hide a wrong mapping), save them with save_pretrained in
both layouts and require minidiff's output to match diffusers' to 1e-4 of its scale.
The scheduler tests compare minidiff's schedule, p_sample and DDIM with DDPMScheduler and
DDIMScheduler where the conventions coincide, and pin down where they differ by design.
Tests that need torch and diffusers (the `compat` extra) skip without it, and fail in CI.
The refusals and file checks need neither and always run.
"""
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import compat_import
from safetensors.numpy import load_file, save_file
from safetensors.numpy import save as save_safetensors

from minidiff import backend, checkpoint, images, pretrained
from minidiff.cli import main
from minidiff.diffusion import GaussianDiffusion
from minidiff.pretrained import PretrainedError
from minidiff.schedule import get_named_beta_schedule
from minidiff.tensor import Tensor

# google/ddpm-cifar10-32's config.json, at a chosen width
CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, norm_eps=1e-6,
               down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
               downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None,
               act_fn="silu", center_input_sample=False, time_embedding_type="positional", mid_block_scale_factor=1)
CIFAR10_FULL = dict(CIFAR10, block_out_channels=[128, 256, 256, 256], norm_num_groups=32)
CIFAR10_NARROW = dict(CIFAR10, block_out_channels=[32, 64, 64, 64], norm_num_groups=8)
# google/ddpm-celebahq-256 (church, bedroom, cat alike): six levels, attention at 16x16; here 64x64 and narrow
CELEBAHQ_SMALL = dict(CIFAR10, sample_size=64, block_out_channels=[16, 16, 32, 32, 64, 64], norm_num_groups=4,
                      down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                        "DownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D",
                                      "UpBlock2D"])
# diffusers' own defaults where the DDPM models differ: eps 1e-5, symmetric padding, cos first, 4 heads of 8
DIFFUSERS_DEFAULTS = dict(sample_size=16, in_channels=1, out_channels=2, block_out_channels=[32, 64],
                          norm_num_groups=8, layers_per_block=1, attention_head_dim=8,
                          down_block_types=["AttnDownBlock2D", "DownBlock2D"],
                          up_block_types=["UpBlock2D", "AttnUpBlock2D"])


@pytest.fixture(scope="module")
def diffusers():
    compat_import("torch")
    return compat_import("diffusers")


def perturbed_unet(diffusers, config, seed=0):
    """A UNet2DModel with every parameter moved off its initial value (norms off 1 and 0, biases off 0)."""
    import torch
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.2 * torch.randn_like(p)).add_(0.03 * torch.randn_like(p))  # no 0s, no 1s, same scale
    return model


def save_folder(diffusers, model, path, layout, scheduler=None):
    """What diffusers writes: flat (model + scheduler side by side) or a DDPMPipeline folder."""
    scheduler = scheduler or diffusers.DDPMScheduler(variance_type="fixed_large")
    if layout == "pipeline":
        diffusers.DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(path)
        assert os.path.isfile(os.path.join(path, "model_index.json"))
    else:
        model.save_pretrained(path)
        scheduler.save_pretrained(path)
    return path


def diffusers_output(model, x, t):
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()


def assert_matches_diffusers(model, folder, batch=3, seed=1):
    size, channels = model.config.sample_size, model.config.in_channels
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    t = rng.integers(0, 1000, batch).astype(np.int64)
    ours, diffusion = pretrained.load(folder)
    expected = diffusers_output(model, x, t)
    got = backend.to_numpy(ours(Tensor(backend.to_active(x)), backend.to_active(t)).data)
    scale = np.abs(expected).max()
    assert scale > 0.1 and got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * scale, (np.abs(got - expected).max(), scale)
    return ours, diffusion


# ---------------------------------------------------------------- the U-Net against diffusers


@pytest.mark.parametrize("layout", ["flat", "pipeline"])
def test_cifar10_configuration_matches_diffusers(diffusers, tmp_path, layout, backend_name):
    model = perturbed_unet(diffusers, CIFAR10_NARROW)
    ours, diffusion = assert_matches_diffusers(model, save_folder(diffusers, model, str(tmp_path), layout))
    assert ours.config["attn_resolutions"] == (16,) and ours.config["ch_mult"] == (1, 2, 2, 2)
    assert diffusion.model_var_type == "fixed_large" and diffusion.num_timesteps == 1000


def test_full_width_cifar10_model_matches_diffusers(diffusers, tmp_path):
    """The paper's 35.7M-parameter CIFAR-10 model: one forward pass."""
    model = perturbed_unet(diffusers, CIFAR10_FULL)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    ours, _ = assert_matches_diffusers(model, save_folder(diffusers, model, str(tmp_path), "flat"), batch=2)
    assert ours.num_parameters() == 35_746_307
    # the paper's own minidiff configuration, with the original code's options as UNet defaults
    assert ours.config == dict(image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                               attn_resolutions=(16,), dropout=0.0, out_channels=3, num_groups=32)


def test_six_level_celebahq_shaped_model_matches_diffusers(diffusers, tmp_path):
    model = perturbed_unet(diffusers, CELEBAHQ_SMALL)
    ours, _ = assert_matches_diffusers(model, save_folder(diffusers, model, str(tmp_path), "pipeline"), batch=2)
    assert ours.config["attn_resolutions"] == (16,) and len(ours.config["ch_mult"]) == 6


def test_diffusers_default_options_match(diffusers, tmp_path):
    """norm_eps 1e-5, downsample_padding 1, flip_sin_to_cos, freq_shift 0 and multi-head attention."""
    model = perturbed_unet(diffusers, DIFFUSERS_DEFAULTS)
    ours, _ = assert_matches_diffusers(model, save_folder(diffusers, model, str(tmp_path), "flat"))
    assert ours.config["attn_head_dim"] == 8 and ours.config["downsample_padding"] == "symmetric"
    assert ours.config["flip_sin_to_cos"] is True and ours.config["freq_shift"] == 0


def test_missing_config_fields_take_diffusers_defaults(diffusers):
    """A config.json that omits a field means diffusers' __init__ default: the table must equal them."""
    import inspect
    params = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    assert {k: p.default for k, p in params.items() if k != "self"} == pretrained.UNET_DEFAULTS
    params = inspect.signature(diffusers.DDPMScheduler.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k in pretrained.SCHEDULER_DEFAULTS}
    assert defaults == pretrained.SCHEDULER_DEFAULTS
    params = inspect.signature(diffusers.DDIMScheduler.__init__).parameters
    shared = {**pretrained.SCHEDULER_DEFAULTS, **pretrained.DDIM_DEFAULTS}
    shared = {k: v for k, v in shared.items() if k not in ("variance_type",)}   # DDIM has no variance
    assert {k: p.default for k, p in params.items() if k in shared} == shared


def test_older_attention_names_load(diffusers, tmp_path):
    """Checkpoints from before diffusers 0.14 name attention query/key/value/proj_attn."""
    model = perturbed_unet(diffusers, CIFAR10_NARROW)
    folder = save_folder(diffusers, model, str(tmp_path), "flat")
    path = os.path.join(folder, pretrained.WEIGHTS)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, value in load_file(path).items():
        for new, name in old.items():
            key = key.replace(f".{new}.", f".{name}.")
        tensors[key] = value
    assert any(".query." in k for k in tensors)
    save_file(tensors, path)
    assert_matches_diffusers(model, folder)


@pytest.fixture(scope="module")
def cifar_folder(diffusers, tmp_path_factory):
    model = perturbed_unet(diffusers, CIFAR10_NARROW)
    return save_folder(diffusers, model, str(tmp_path_factory.mktemp("cifar")), "flat")


def copy_folder(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


def test_damaged_weights_name_the_problem(cifar_folder, tmp_path):
    weights = pretrained.WEIGHTS
    truncated = copy_folder(cifar_folder, str(tmp_path / "truncated"))
    data = open(os.path.join(cifar_folder, weights), "rb").read()
    with open(os.path.join(truncated, weights), "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(PretrainedError, match="not a readable safetensors file"):
        pretrained.load(truncated)

    tensors = load_file(os.path.join(cifar_folder, weights))
    missing = copy_folder(cifar_folder, str(tmp_path / "missing"))
    save_file({k: v for k, v in tensors.items() if k != "mid_block.attentions.0.to_k.weight"},
              os.path.join(missing, weights))
    with pytest.raises(PretrainedError, match=r"mid_block\.attentions\.0\.to_k\.weight is missing"):
        pretrained.load(missing)

    wrong = copy_folder(cifar_folder, str(tmp_path / "wrong"))
    save_file({**tensors, "conv_in.weight": np.zeros((32, 3, 5, 5), np.float32)}, os.path.join(wrong, weights))
    with pytest.raises(PretrainedError, match=r"conv_in\.weight has shape \(32, 3, 5, 5\)"):
        pretrained.load(wrong)

    extra = copy_folder(cifar_folder, str(tmp_path / "extra"))
    save_file({**tensors, "class_embedding.weight": np.zeros((10, 128), np.float32)}, os.path.join(extra, weights))
    with pytest.raises(PretrainedError, match="class_embedding.weight"):
        pretrained.load(extra)


# ---------------------------------------------------------------- the command line


def run(*argv):
    return main([str(a) for a in argv])


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("sampler", [["--sampler", "ddpm", "--steps", "3"], ["--sampler", "ddim", "--steps", "3"],
                                     ["--sampler", "ddim", "--steps", "2", "--eta", "1", "--progressive"]])
def test_cli_samples_from_a_diffusers_folder_and_its_conversion_alike(cifar_folder, tmp_path, sampler):
    out = tmp_path / "pretrained.png"
    assert run("sample", "--pretrained", cifar_folder, "--num", 2, *sampler, "--out", out) == 0
    converted = tmp_path / "cifar.safetensors"
    assert run("convert", "--pretrained", cifar_folder, "--out", converted) == 0
    assert run("sample", "--checkpoint", converted, "--num", 2, *sampler, "--out", tmp_path / "converted.png") == 0
    assert out.read_bytes() == (tmp_path / "converted.png").read_bytes()


def test_converted_checkpoint_needs_no_diffusers_files(cifar_folder, tmp_path):
    converted = tmp_path / "cifar.safetensors"
    assert run("convert", "--pretrained", cifar_folder, "--out", converted) == 0
    model, diffusion, info = pretrained.load_converted(converted)
    original, original_diffusion = pretrained.load(cifar_folder)
    for (name, a), (_, b) in zip(model.named_parameters(), original.named_parameters()):
        np.testing.assert_array_equal(backend.to_numpy(a.data), backend.to_numpy(b.data), err_msg=name)
    np.testing.assert_array_equal(diffusion.betas, original_diffusion.betas)
    assert diffusion.model_var_type == "fixed_large" and info["clip_denoised"] is True


def test_cli_interpolates_with_a_pretrained_model(cifar_folder, tmp_path, capsys):
    pictures = (np.random.default_rng(0).random((20, 40, 40, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "pictures.npz", pictures)
    out = tmp_path / "interpolate.png"
    assert run("interpolate", "--pretrained", cifar_folder, "--t", 3, "--pairs", 1, "--lambdas", 3,
               "--out", out) == 2
    assert "--data" in one_error_line(capsys)
    assert run("interpolate", "--pretrained", cifar_folder, "--data", tmp_path / "pictures.npz", "--t", 3,
               "--pairs", 1, "--lambdas", 3, "--out", out) == 0
    assert out.stat().st_size > 0


# ---------------------------------------------------------------- schedules and samplers against diffusers


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_betas_and_alphas_cumprod_equal_ddpm_schedulers(diffusers, tmp_path, schedule):
    ours = diffusion_for(dict(beta_schedule=schedule, beta_start=2e-4, beta_end=0.03, num_train_timesteps=500),
                         tmp_path)
    theirs = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=2e-4, beta_end=0.03, num_train_timesteps=500)
    # diffusers holds its tables in float32; minidiff computes in float64 (schedule.py says why)
    np.testing.assert_allclose(ours.betas, theirs.betas.double().numpy(), rtol=2e-6)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.double().numpy(), rtol=2e-5)


def test_the_ddpm_models_schedule_is_minidiffs_linear_schedule(tmp_path):
    """google/ddpm-*'s scheduler_config.json (linear, 1e-4 .. 0.02, T = 1000) is minidiff's default, bit for bit."""
    ours = diffusion_for({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                          "num_train_timesteps": 1000, "clip_sample": True}, tmp_path)
    np.testing.assert_array_equal(ours.betas, get_named_beta_schedule("linear", 1000))


def diffusion_for(scheduler_config, tmp_path):
    """minidiff's GaussianDiffusion for a scheduler_config.json (through the file, as load reads it)."""
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "DDPMScheduler", **scheduler_config}))
    betas, kwargs, _ = pretrained.scheduler_settings(json.loads(path.read_text()), str(path))
    return GaussianDiffusion(betas, **kwargs)


def test_ddim_scheduler_settings_are_honoured_and_the_inexpressible_refused(tmp_path):
    """A DDIMScheduler's timestep_spacing, steps_offset and set_alpha_to_one become minidiff's DDIM defaults for
    the model; rescale_betas_zero_snr rescales the betas (Lin et al. 2023); what cannot be expressed is one
    PretrainedError naming the field."""
    def settings(**fields):
        return pretrained.scheduler_settings({"_class_name": "DDIMScheduler", **fields}, "s.json")

    betas, kwargs, sampling_settings = settings()
    assert sampling_settings == {"clip_denoised": True,
                                 "ddim": {"spacing": "leading", "set_alpha_to_one": True, "steps_offset": 0}}
    _, _, s = settings(timestep_spacing="trailing", steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    assert s == {"clip_denoised": False, "ddim": {"spacing": "trailing", "set_alpha_to_one": False, "steps_offset": 1}}
    betas, kwargs, _ = settings(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    d = GaussianDiffusion(betas, **kwargs)
    assert d.zero_terminal_snr and d.alphas_cumprod[-1] == 0 and kwargs["model_mean_type"] == "v"
    np.testing.assert_allclose(np.sqrt(d.alphas_cumprod[0]), np.sqrt(1 - 1e-4))   # the first step is kept
    for fields, field in [({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),   # an eps model
                          ({"timestep_spacing": "even"}, "timestep_spacing"),
                          ({"steps_offset": -1}, "steps_offset"), ({"steps_offset": 1000}, "steps_offset"),
                          ({"set_alpha_to_one": "no"}, "set_alpha_to_one")]:
        with pytest.raises(pretrained.PretrainedError, match=f"s.json.*{field}"):
            settings(**fields)


def test_a_converted_ddim_model_samples_with_its_schedulers_settings(diffusers, tmp_path):
    """sample --sampler ddim on a diffusers folder whose DDIM config says trailing and set_alpha_to_one=False
    draws exactly ddim_sample_loop with those settings (and --spacing overrides the spacing)."""
    scheduler = diffusers.DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    folder = save_folder(diffusers, perturbed_unet(diffusers, CIFAR10_NARROW), str(tmp_path / "ddim"), "flat",
                         scheduler)
    model, d, info = pretrained.load_with_info(folder)
    assert info["ddim"] == {"spacing": "trailing", "set_alpha_to_one": False, "steps_offset": 0}
    converted = tmp_path / "converted.safetensors"
    pretrained.save_converted(converted, model, d, info)
    _, _, again = pretrained.load_converted(converted)
    assert again["ddim"] == info["ddim"]
    shape = (2, model.in_channels, model.image_size, model.image_size)
    for extra, spacing in (([], "trailing"), (["--spacing", "linspace"], "linspace")):
        out = tmp_path / f"{spacing}.npz"
        assert main(["sample", "--checkpoint", str(converted), "--sampler", "ddim", "--steps", "3", "--num", "2",
                     "--out", str(out), *extra]) == 0
        want = d.ddim_sample_loop(model, shape, num_steps=3, seed=[0, 0], clip_denoised=False, spacing=spacing,
                                  set_alpha_to_one=False)
        np.testing.assert_array_equal(np.load(out)["arr_0"], images.to_uint8(backend.to_numpy(want)))


def eps_model(x, t):
    """A fixed stand-in for eps_theta: smooth in x, different at every t."""
    x = x.data if isinstance(x, Tensor) else x
    t = backend.to_numpy(t).astype(np.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return np.tanh(backend.to_numpy(x)) * np.cos(t / 300.0) + 0.1 * np.sin(t / 50.0)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_p_sample_equals_ddpm_scheduler_step(diffusers, tmp_path, variance_type, prediction_type):
    import torch
    config = dict(variance_type=variance_type, prediction_type=prediction_type)
    ours = diffusion_for(config, tmp_path)
    theirs = diffusers.DDPMScheduler(**config)
    # posterior variances beta_tilde_t (Eq. 7), t >= 1 (at t = 0 diffusers clamps 0 to 1e-20)
    tilde = np.array([float(theirs._get_variance(t)) for t in range(1, 1000)]) if variance_type == "fixed_small" \
        else None
    if tilde is not None:
        # diffusers forms 1 - alpha_bar in float32 and loses ~6e-8 of it to cancellation at small t (4e-4
        # relative at t = 1); minidiff does not (diffusion.py's one_minus_alphas_cumprod), hence the atol.
        np.testing.assert_allclose(ours.posterior_variance[1:], tilde, rtol=1e-4, atol=1e-7)
    rng = np.random.default_rng(2)
    for t in (999, 600, 150, 1, 0):
        x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
        # DDPMScheduler.step takes no variance_noise (DDIMScheduler.step does): it draws randn from
        # `generator`, so the same seeded draw, made here first, is the noise given to p_sample.
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        out = eps_model(x, np.array([t, t]))
        got = ours.p_sample(lambda *_: out, x, np.array([t, t]), noise=noise.numpy())["sample"]
        expected = theirs.step(torch.from_numpy(out), t, torch.from_numpy(x),
                               generator=torch.Generator().manual_seed(t)).prev_sample.numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"t={t}")


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_loop_equals_ddim_scheduler_where_conventions_coincide(diffusers, tmp_path, eta):
    """minidiff's DDIM is DDIMScheduler with "leading" spacing, steps_offset 0, alpha_bar = 1 after the
    last step (set_alpha_to_one) and use_clipped_model_output=True (eps recomputed from the clipped x_0)."""
    import torch
    ours = diffusion_for({}, tmp_path)
    theirs = diffusers.DDIMScheduler(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True)
    steps, shape, seed = 10, (2, 3, 4, 4), 7
    theirs.set_timesteps(steps)
    np.testing.assert_array_equal(theirs.timesteps.numpy(), ours.ddim_timesteps(steps)[::-1])
    got = ours.ddim_sample_loop(eps_model, shape, num_steps=steps, eta=eta, seed=seed)
    # replay minidiff's draws: x_T first, then one normal per step that adds noise (sigma > 0)
    generator = backend.Generator(seed)
    x = torch.from_numpy(backend.to_numpy(generator.normal(shape)))
    for t in theirs.timesteps.tolist():
        last = t == theirs.timesteps[-1]
        noise = np.zeros(shape, np.float32) if eta == 0 or last else backend.to_numpy(generator.normal(shape))
        out = torch.from_numpy(eps_model(x.numpy(), np.array([t, t])))
        x = theirs.step(out, t, x, eta=eta, use_clipped_model_output=True,
                        variance_noise=torch.from_numpy(noise)).prev_sample
    np.testing.assert_allclose(backend.to_numpy(got), x.numpy(), rtol=1e-4, atol=1e-4)


def test_documented_differences_from_diffusers(diffusers, tmp_path):
    """Where minidiff differs from diffusers by design; pinned so that a change is noticed.

    1. DDIM spacing: both default to "leading", 0, c, ..., (n - 1) c with c = T // n (the DDIM paper's);
       "linspace" and "trailing" end at T - 1 in both (spacing=...; tests/test_sampler_conformance.py
       holds their grids and steps to diffusers').
    2. Fewer DDPM steps: minidiff respaces the chain over round(i (T - 1) / (n - 1)) (improved-diffusion,
       first and last step kept); DDPMScheduler.set_timesteps(n) takes "leading" steps that stop short of T - 1.
    3. DDIMScheduler.step defaults to use_clipped_model_output=False: with clipping it keeps the raw eps;
       minidiff recomputes eps from the clipped x_0 (the original DDIM code), as use_clipped_model_output=True.
    """
    import torch
    ours = diffusion_for({}, tmp_path)
    for spacing in ("linspace", "trailing"):
        scheduler = diffusers.DDIMScheduler(timestep_spacing=spacing)
        scheduler.set_timesteps(10)
        assert scheduler.timesteps[0] == 999 and ours.ddim_timesteps(10).max() == 900
        assert ours.ddim_timesteps(10, spacing).max() == 999
    scheduler = diffusers.DDPMScheduler()
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.max() == 900 and ours.respaced(10).timestep_map.max() == 999

    scheduler = diffusers.DDIMScheduler()
    scheduler.set_timesteps(10)
    x = torch.full((1, 1, 2, 2), 3.0)  # x_0 = x_t / sqrt(alpha_bar) - ... lies far outside [-1, 1]: clipping acts
    eps = torch.zeros_like(x)
    raw = scheduler.step(eps, 900, x).prev_sample
    clipped = scheduler.step(eps, 900, x, use_clipped_model_output=True).prev_sample
    assert not torch.allclose(raw, clipped, rtol=1e-3)
    first = next(ours.ddim_sample_loop_progressive(lambda *_: np.zeros((1, 1, 2, 2), np.float32), (1, 1, 2, 2),
                                                   num_steps=10, noise=np.full((1, 1, 2, 2), 3.0, np.float32)))
    np.testing.assert_allclose(backend.to_numpy(first["sample"]), clipped.numpy(), rtol=1e-5)


# ---------------------------------------------------------------- refusals and unsafe files (no torch needed)


def write_folder(path, unet=None, scheduler=None, weights=b"\0" * 8, weights_name=pretrained.WEIGHTS):
    """A flat folder with the given configs; the weights file is only read after the configs pass."""
    os.makedirs(path, exist_ok=True)
    config = {"_class_name": "UNet2DModel", **{k: v for k, v in CIFAR10_NARROW.items()}, **(unet or {})}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDPMScheduler", "variance_type": "fixed_large", **(scheduler or {})}, f)
    if weights is not None:
        with open(os.path.join(path, weights_name), "wb") as f:
            f.write(weights)
    return str(path)


@pytest.mark.parametrize("unet, scheduler, field", [
    ({"time_embedding_type": "fourier"}, {}, 'time_embedding_type="fourier"'),
    ({"class_embed_type": "timestep"}, {}, 'class_embed_type="timestep"'),
    ({"num_class_embeds": 10}, {}, "num_class_embeds=10"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]}, {},
     "CrossAttnDownBlock2D"),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]}, {}, "up_block_types="),
    ({"block_out_channels": [32, 48, 64, 64]}, {}, "block_out_channels=[32, 48, 64, 64]"),
    ({"resnet_time_scale_shift": "scale_shift"}, {}, 'resnet_time_scale_shift="scale_shift"'),
    ({"center_input_sample": True}, {}, "center_input_sample=true"),
    ({"sample_size": [32, 64]}, {}, "sample_size=[32, 64]"),
    ({"norm_num_groups": 7}, {}, "num_groups=7"),
    ({"_class_name": "UNet2DConditionModel"}, {}, '_class_name="UNet2DConditionModel"'),
    # a learned variance needs the U-Net's second half of channels (and an unknown kind is named)
    ({}, {"variance_type": "learned_range"}, "out_channels=3, but the scheduler's variance_type learned_range needs"),
    ({}, {"variance_type": "learned_sigma"}, 'variance_type="learned_sigma"'),
    ({}, {"thresholding": True}, "thresholding=true"),
    ({}, {"beta_schedule": "exponential"}, 'beta_schedule="exponential"'),
    ({}, {"_class_name": "PNDMScheduler"}, '_class_name="PNDMScheduler"'),
    ({}, {"prediction_type": "flow"}, 'prediction_type="flow"'),
    ({"freq_shift": "one"}, {}, 'freq_shift="one"'),
    ({}, {"variance_type": ["fixed_small"]}, "malformed config"),
    ({"block_out_channels": 128}, {}, "block_out_channels=128"),
    ({}, {"num_train_timesteps": "1000"}, 'num_train_timesteps="1000"'),
    # numbers that would size an allocation: refused by field and limit before anything is built
    ({"layers_per_block": 10 ** 6}, {}, "layers_per_block=1000000 is not supported: expected a whole number from 1 "
                                        "to 64"),
    ({"block_out_channels": [10 ** 6], "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"]}, {},
     "block_out_channels=[1000000] is not supported: minidiff takes at most 11 levels of at most 65,536 channels"),
    ({"block_out_channels": [4096, 8192], "norm_num_groups": 32, "down_block_types": ["DownBlock2D"] * 2,
      "up_block_types": ["UpBlock2D"] * 2}, {},
     "block_out_channels=[4096, 8192] is not supported: with layers_per_block=2 the U-Net has 14,932,705,283 "
     "parameters (55.6 GiB of float32), more than minidiff loads (at most"),
    ({"block_out_channels": [32] * 12}, {}, "at most 11 levels"),
    ({"sample_size": 2 ** 30}, {}, "sample_size=1073741824 is not supported: minidiff samples images of at most 1024"),
    ({"sample_size": 36}, {}, "sample_size=36 is not supported: the 4 levels"),
    ({"in_channels": 10 ** 9}, {}, "in_channels=1000000000 is not supported"),
    ({"norm_eps": -1}, {}, "norm_eps=-1"),
    ({"dropout": 1.5}, {}, "dropout=1.5"),
    ({"flip_sin_to_cos": "yes"}, {}, 'flip_sin_to_cos="yes"'),
    ({"down_block_types": "DownBlock2D"}, {}, 'down_block_types="DownBlock2D"'),
    ({"layers_per_block": True}, {}, "layers_per_block=true"),
    ({}, {"num_train_timesteps": 10 ** 9}, "num_train_timesteps=1000000000 is not supported: needs an integer from "
                                           "2 to 100,000"),
    ({}, {"trained_betas": [0.1] * 999}, "trained_betas=\"<999 values>\""),
    ({}, {"trained_betas": ["0.1"] * 1000}, "trained_betas="),
    ({}, {"beta_start": "0.0001"}, 'beta_start="0.0001"'),
    ({}, {"clip_sample": "true"}, 'clip_sample="true"'),
])
def test_unrepresentable_configs_are_refused_by_field_and_value(tmp_path, unet, scheduler, field):
    folder = write_folder(tmp_path / "model", unet, scheduler)
    with pytest.raises(PretrainedError) as err:
        pretrained.load(folder)
    message = str(err.value)
    assert field in message and "\n" not in message, message


def test_a_pytorch_bin_folder_loads_through_the_safe_reader(diffusers, tmp_path):
    """Where a folder has no .safetensors, its diffusion_pytorch_model.bin is read by minidiff.torchfile."""
    model = perturbed_unet(diffusers, CIFAR10_NARROW)
    folder = str(tmp_path / "bin")
    model.save_pretrained(folder, safe_serialization=False)
    diffusers.DDPMScheduler(variance_type="fixed_large").save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.bin"))
    assert not os.path.isfile(os.path.join(folder, pretrained.WEIGHTS))
    assert_matches_diffusers(model, folder)


class _Trap:
    """Unpickling this would run os.system and create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_booby_trapped_bin_is_refused_and_never_runs(diffusers, tmp_path, zip_format):
    import torch
    marker = tmp_path / "ran"
    folder = write_folder(tmp_path / "model", weights=None)
    torch.save({"conv_in.weight": torch.zeros(3), "trap": _Trap(marker)},
               os.path.join(folder, "diffusion_pytorch_model.bin"), _use_new_zipfile_serialization=zip_format)
    with pytest.raises(PretrainedError, match=r"refused pickle global posix\.system.*safetensors"):
        pretrained.load(folder)
    assert run("sample", "--pretrained", folder, "--out", tmp_path / "s.png") == 2
    assert not marker.exists()


def test_bad_folders_exit_2_with_one_line(tmp_path, capsys):
    assert run("sample", "--pretrained", tmp_path / "none", "--out", tmp_path / "s.png") == 2
    assert "no such folder" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert run("sample", "--pretrained", tmp_path / "empty", "--out", tmp_path / "s.png") == 2
    assert "no config.json" in one_error_line(capsys)
    folder = write_folder(tmp_path / "fourier", {"time_embedding_type": "fourier"})
    assert run("convert", "--pretrained", folder, "--out", tmp_path / "c.safetensors") == 2
    assert "fourier" in one_error_line(capsys)
    folder = write_folder(tmp_path / "garbage", weights=b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    assert run("interpolate", "--pretrained", folder, "--data", "digits", "--out", tmp_path / "i.png") == 2
    assert "not a readable safetensors file" in one_error_line(capsys)
    no_scheduler = write_folder(tmp_path / "nosched")
    os.remove(os.path.join(no_scheduler, "scheduler_config.json"))
    assert run("sample", "--pretrained", no_scheduler, "--out", tmp_path / "s.png") == 2
    assert "scheduler_config.json" in one_error_line(capsys)
    assert not any((tmp_path / name).exists() for name in ("s.png", "c.safetensors", "i.png"))


def test_compat_skip_is_a_failure_in_ci(tmp_path):
    """conftest's rule, run for real: a compat skip passes as a skip locally and fails with CI=true."""
    test = tmp_path / "test_needs_extra.py"
    test.write_text(textwrap.dedent("""
        from conftest import compat_import
        def test_uses_the_extra():
            compat_import("minidiff_no_such_module")
    """))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.path.dirname(tests_dir)])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", "-rs",
               "--rootdir", str(tmp_path), "-c", os.devnull, str(test)]
    local = subprocess.run(command, env={**env, "CI": ""}, capture_output=True, text=True, cwd=tmp_path)
    assert local.returncode == 0 and "1 skipped" in local.stdout and "compat extra" in local.stdout, local.stdout
    ci = subprocess.run(command, env={**env, "CI": "true"}, capture_output=True, text=True, cwd=tmp_path)
    assert ci.returncode == 1 and "1 failed" in ci.stdout and "CI=true" in ci.stdout, ci.stdout


def test_the_readme_pretrained_example_runs(diffusers, tmp_path, monkeypatch):
    """The README's Python example for the paper's models, on a folder standing in for the download
    (CIFAR-10's layout at width 8, so that its 50 steps of 16 images take a moment)."""
    tiny = dict(CIFAR10, block_out_channels=[8, 8, 8, 8], norm_num_groups=2, layers_per_block=1)
    folder = save_folder(diffusers, perturbed_unet(diffusers, tiny), str(tmp_path / "download"), "flat")
    import pathlib
    import re
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = [block for block in re.findall(r"```python\n(.*?)\n```", readme, flags=re.S) if "pretrained" in block]
    assert len(code) == 1
    monkeypatch.chdir(tmp_path)
    os.symlink(folder, tmp_path / "ddpm-cifar10-32")
    exec(compile(code[0], "README.md", "exec"), {})
    assert (tmp_path / "cifar.png").stat().st_size > 0


# ---------------------------------------------------------------- hostile files, checked before anything is read

# the smallest U-Net with every kind of tensor: two levels, attention on the second, 1 channel in and out
TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], norm_num_groups=2,
            layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D"])


def tiny_tensors(config=TINY):
    """{diffusers name: shape} of the U-Net `config` describes (what its weights file must hold)."""
    kwargs = pretrained.unet_kwargs({**CIFAR10_NARROW, **config})
    levels = len(kwargs["ch_mult"])
    return {pretrained.diffusers_names(name, levels)[0]: shape
            for name, shape in checkpoint.model_shapes(kwargs).items()}


def weights_file(shapes, dtype="F32", extra=b"", overrides=None, length=None):
    """A safetensors file written by hand: `shapes` {name: shape} filled with 0.001 * (index + 1).

    A file declaring over 64 MiB gets its header only (the hostile cases cut or extend it anyway)."""
    size = {"F16": 2, "F32": 4, "F64": 8, "BF16": 2, "I64": 8}[dtype]
    header, chunks, offset = {}, [], 0
    np_dtype = {"F16": np.float16, "F32": np.float32, "F64": np.float64}.get(dtype, np.uint8)
    small = sum(int(np.prod(shape)) for shape in shapes.values()) * size <= 64 << 20
    for i, (name, shape) in enumerate(shapes.items()):
        n = int(np.prod(shape)) * size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        if small:
            chunks.append(np.full(int(np.prod(shape)), 0.001 * (i + 1), np_dtype).tobytes()
                          if np_dtype is not np.uint8 else bytes(n))
        offset += n
    data = b"".join(chunks)
    header.update(overrides or {})
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data + extra


def tiny_folder(path, weights=None, **kwargs):
    return write_folder(path, TINY, weights=weights if weights is not None else weights_file(tiny_tensors(), **kwargs))


@pytest.mark.parametrize("dtype", ["F32", "F16", "F64"])
def test_a_handwritten_weights_file_loads_every_tensor_in_place(tmp_path, dtype):
    model, _ = pretrained.load(tiny_folder(tmp_path / "tiny", dtype=dtype))
    names = list(tiny_tensors())
    state = model.state_dict()
    for i, key in enumerate(("conv_in.weight", "mid_block.attentions.0.to_q.weight", "conv_out.bias")):
        ours = {"conv_in.weight": "conv_in.weight", "conv_out.bias": "conv_out.bias",
                "mid_block.attentions.0.to_q.weight": "mid.attn_1.q.weight"}[key]
        expected = np.float32(np.dtype({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]).type(
            0.001 * (names.index(key) + 1)))
        np.testing.assert_array_equal(backend.to_numpy(state[ours]), np.full(state[ours].shape, expected))


def hostile_weights():
    shapes = tiny_tensors()
    big = dict(shapes, **{"conv_in.weight": (750_000_000,)})  # 3 GB of float32 declared for an 8x1x3x3 tensor
    return {
        # header only: the data stops where the header ends
        "3 GB tensor, file truncated": (weights_file(big), "truncated"),
        "100 GB tensor": (weights_file(dict(shapes, **{"conv_in.weight": (25 * 2 ** 30,)})),
                          "the header accounts for 107,374,"),
        "header of 2^40 bytes": (struct.pack("<Q", 1 << 40) + b"{}", "declares a header of 1,099,511,627,776 bytes"),
        "header nested 100k deep": (struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000,
                                    "the header is JSON nested too deeply"),
        "padded by a byte": (weights_file(shapes, extra=b"\0"), "padded"),
        "bfloat16": (weights_file(shapes, dtype="BF16"), 'dtype "BF16"'),
        "integers": (weights_file(shapes, dtype="I64"), "dtype int64; expected floating point"),
        "wrong shape": (weights_file(dict(shapes, **{"conv_in.weight": (8, 1, 5, 5)})),
                        r"tensor conv_in.weight has shape (8, 1, 5, 5) but the config needs (8, 1, 3, 3)"),
        "missing": (weights_file({k: v for k, v in shapes.items() if k != "conv_out.bias"}),
                    "tensor conv_out.bias is missing"),
        "extra": (weights_file(dict(shapes, **{"class_embedding.weight": (10, 32)})),
                  'tensors "class_embedding.weight" have no place'),
        "overlapping": (weights_file(shapes, overrides={"conv_out.bias": {"dtype": "F32", "shape": [1],
                                                                          "data_offsets": [0, 4]}}),
                        "not at"),
    }


HOSTILE_WEIGHTS = hostile_weights()


@pytest.mark.parametrize("case", sorted(HOSTILE_WEIGHTS))
def test_hostile_weight_headers_are_one_error_before_any_data_is_read(tmp_path, monkeypatch, case):
    weights, expected = HOSTILE_WEIGHTS[case]
    folder = tiny_folder(tmp_path / "model", weights=weights)
    reads = []
    monkeypatch.setattr(checkpoint, "read_tensor", lambda *a: reads.append(a) or pytest.fail("data was read"))
    with pytest.raises(PretrainedError) as err:
        pretrained.load(folder)
    message = str(err.value)
    assert expected in message and "\n" not in message and pretrained.WEIGHTS in message, message
    assert not reads


def test_nan_weights_are_refused(tmp_path):
    shapes = tiny_tensors()
    data = bytearray(weights_file(shapes))
    data[-4:] = np.float32(np.nan).tobytes()   # the last tensor's last value
    with pytest.raises(PretrainedError, match="holds NaN or infinite values"):
        pretrained.load(tiny_folder(tmp_path / "nan", weights=bytes(data)))


def test_configs_too_big_or_too_deep_are_one_error(tmp_path):
    folder = tiny_folder(tmp_path / "deep")
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PretrainedError, match="not readable JSON \\(nested too deeply\\)"):
        pretrained.load(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write('{"sample_size": 1' + "0" * 5000 + "}")   # an integer of 5001 digits
    with pytest.raises(PretrainedError, match="not readable JSON"):
        pretrained.load(folder)
    os.truncate(os.path.join(folder, "config.json"), pretrained.MAX_CONFIG_BYTES + 1)
    with pytest.raises(PretrainedError, match="16,777,217 bytes; a diffusers config is kilobytes"):
        pretrained.load(folder)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        f.write("{" * 10 + "[" * 100_000)
    with pytest.raises(PretrainedError, match="model_index.json: not readable JSON"):
        pretrained.load(folder)


LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from minidiff import pretrained
for folder in {folders!r}:
    try:
        pretrained.load(folder)
        print("loaded")
    except pretrained.PretrainedError as err:
        print("PretrainedError", err)
    except MemoryError:
        print("MemoryError")
"""


def test_configs_and_headers_asking_for_gigabytes_are_refused_under_an_address_space_limit(tmp_path):
    """Under RLIMIT_AS 1.5 GB, in one fresh Python: each hostile folder is one PretrainedError, never a
    MemoryError. [512, 1024] passes the fixed caps (254M parameters) but not this process's memory."""
    shapes = tiny_tensors()
    sparse = tiny_folder(tmp_path / "sparse", weights=weights_file(dict(shapes, **{"conv_in.weight": (750_000_000,)})))
    weights = os.path.join(sparse, pretrained.WEIGHTS)
    with open(weights, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
    os.truncate(weights, 8 + length + 4 * (sum(int(np.prod(s)) for s in shapes.values()) - 72 + 750_000_000))
    cases = {
        write_folder(tmp_path / "layers", {"layers_per_block": 10 ** 6}): "layers_per_block=1000000",
        write_folder(tmp_path / "wide", {"block_out_channels": [10 ** 6], "down_block_types": ["DownBlock2D"],
                                         "up_block_types": ["UpBlock2D"]}): "block_out_channels=[1000000]",
        write_folder(tmp_path / "widths", {"block_out_channels": [4096, 8192], "down_block_types": ["DownBlock2D"] * 2,
                                           "up_block_types": ["UpBlock2D"] * 2}): "block_out_channels=[4096, 8192]",
        write_folder(tmp_path / "memory", {"block_out_channels": [512, 1024], "down_block_types": ["DownBlock2D"] * 2,
                                           "up_block_types": ["UpBlock2D"] * 2}): "of memory this process can use",
        write_folder(tmp_path / "steps", scheduler={"num_train_timesteps": 10 ** 9}): "num_train_timesteps=1000000000",
        write_folder(tmp_path / "size", {"sample_size": 2 ** 30}): "sample_size=1073741824",
        sparse: "tensor conv_in.weight has shape (750000000,) but the config needs (8, 1, 3, 3)",
    }
    assert os.path.getsize(weights) > 3 * 10 ** 9   # a sparse file: the header accounts for every byte
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LIMITED.format(limit=1536 << 20, folders=list(cases))],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(cases), lines
    for line, expected in zip(lines, cases.values()):
        assert line.startswith("PretrainedError") and expected in line, line


def test_cli_refuses_hostile_pretrained_folders_with_one_line(tmp_path, capsys):
    folder = write_folder(tmp_path / "layers", {"layers_per_block": 10 ** 6})
    assert run("sample", "--pretrained", folder, "--out", tmp_path / "s.png") == 2
    assert "layers_per_block=1000000" in one_error_line(capsys)
    folder = tiny_folder(tmp_path / "huge", weights=HOSTILE_WEIGHTS["100 GB tensor"][0])
    assert run("sample", "--pretrained", folder, "--out", tmp_path / "s.png") == 2
    assert "truncated" in one_error_line(capsys)
    assert run("convert", "--pretrained", folder, "--out", tmp_path / "c.safetensors") == 2
    assert "truncated" in one_error_line(capsys)
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "c.safetensors").exists()


def test_converted_models_are_checked_like_training_checkpoints(tmp_path, capsys):
    model, diffusion, info = pretrained.load_with_info(tiny_folder(tmp_path / "tiny"))
    good = tmp_path / "tiny.safetensors"
    pretrained.save_converted(good, model, diffusion, info)
    assert pretrained.load_converted(good)[2]["image_size"] == 8
    for change, expected in [
            (lambda s: s["model_config"].update(ch=10 ** 6), "ch=1000000 must be a whole number from 1 to 65,536"),
            (lambda s: s["model_config"].update(ch=16), "its model_config implies temb.dense0.weight of shape"),
            (lambda s: s["model"]["conv_in.weight"].fill(np.nan), "model tensor conv_in.weight holds NaN"),
            (lambda s: s["info"].update(image_size=16), "info must give the model's image_size")]:
        state = checkpoint.load(good)
        change(state)
        tensors = {}
        tree = checkpoint._split(state, "", tensors)
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(save_safetensors(tensors, metadata={"format": checkpoint.FORMAT, "version": "1",
                                                            "state": json.dumps(tree)}))
        assert run("sample", "--checkpoint", bad, "--out", tmp_path / "s.png") == 2
        assert expected in one_error_line(capsys)
    assert not (tmp_path / "s.png").exists()


# ---------------------------------------------------------------- learned variances (Improved DDPM)

LEARNED_UNET = dict(DIFFUSERS_DEFAULTS, sample_size=8, in_channels=1, out_channels=2)


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_a_learned_variance_folder_loads_samples_and_converts(diffusers, tmp_path, variance_type):
    """out_channels = 2 * in_channels with a learned variance_type: the U-Net equals diffusers', every sampler
    runs on it (ancestral on the full and a respaced chain with the learned variance, DDIM on the mean half),
    and a converted copy keeps the variance type and samples the same bits."""
    model = perturbed_unet(diffusers, LEARNED_UNET)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=50, variance_type=variance_type)
    folder = save_folder(diffusers, model, str(tmp_path / "model"), "pipeline", scheduler)
    ours, d = assert_matches_diffusers(model, folder)
    assert d.model_var_type == variance_type and d.learn_sigma
    shape = (2, 1, 8, 8)
    for x in (d.p_sample_loop(ours, shape, seed=0), d.respaced(10).p_sample_loop(ours, shape, seed=0),
              d.ddim_sample_loop(ours, shape, num_steps=5, seed=0)):
        assert x.shape == shape and np.isfinite(backend.to_numpy(x)).all()
    converted = str(tmp_path / "converted.safetensors")
    model_, d_, info = pretrained.load_with_info(folder)
    pretrained.save_converted(converted, model_, d_, info)
    again, d2, _ = pretrained.load_converted(converted)
    assert d2.model_var_type == variance_type
    np.testing.assert_array_equal(backend.to_numpy(d2.respaced(10).p_sample_loop(again, shape, seed=1)),
                                  backend.to_numpy(d.respaced(10).p_sample_loop(ours, shape, seed=1)))


@pytest.mark.parametrize("clip", [False, True])
def test_the_learned_range_step_equals_diffusers_ddpm_scheduler(diffusers, clip):
    """One ancestral step with a learned_range output equals DDPMScheduler.step with the same noise: the mean and
    exp(0.5 log sigma^2) of Eq. 15, on the full chain and on diffusers' 10-step grid, where both use the respaced
    chain's beta and beta_tilde. t = 0 is left out: diffusers clamps beta_tilde_0 = 0 to 1e-20 for log sigma^2 there,
    minidiff takes code t = 1's value (improved-diffusion's clipped log); neither adds noise at t = 0."""
    import torch
    from minidiff.diffusion import GaussianDiffusion
    from minidiff.schedule import respace_betas
    T = 50
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, variance_type="learned_range", clip_sample=clip)
    betas = scheduler.betas.numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    shape = (2, 1, 4, 4)

    def compare(d, code_t, model_t):
        x = rng.standard_normal(shape)
        out = np.concatenate([rng.standard_normal(shape), rng.uniform(-1, 1, shape)], axis=1)
        got = d.p_mean_variance(None, x, np.full(2, code_t), clip, model_output=out)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(code_t), dtype=torch.float64)
        theirs = scheduler.step(torch.from_numpy(out), model_t, torch.from_numpy(x),
                                generator=torch.Generator().manual_seed(code_t)).prev_sample.numpy()
        ours = got["mean"] + np.exp(0.5 * got["log_variance"]) * noise.numpy()
        # diffusers keeps alpha_bar in float32 (1 - alpha_bar_1 ~ 1e-4 carries ~1e-4 of its error); a fixed
        # variance, or the original betas on the respaced grid, are off by far more
        np.testing.assert_allclose(ours, theirs, rtol=3e-4, atol=1e-5, err_msg=f"t={model_t}")

    full = GaussianDiffusion(betas, "eps", "learned_range", "hybrid")
    for t in (1, 10, 30, 49):
        compare(full, t, t)
    scheduler.set_timesteps(10)
    kept = np.sort(scheduler.timesteps.numpy())
    short = GaussianDiffusion(respace_betas(full.alphas_cumprod, kept), "eps", "learned_range", "hybrid")
    short.timestep_map = kept
    for i in (1, 4, 9):
        compare(short, i, int(kept[i]))
    assert (short.betas[1:] / betas[kept[1:]]).min() > 2   # the original betas would be 3-5x too small here


# three channels in, six out (eps | variance), diffusers' default T = 1000 linear schedule
LEARNED_RGB_UNET = dict(DIFFUSERS_DEFAULTS, sample_size=8, in_channels=3, out_channels=6)


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_a_learned_variance_rgb_folder_on_the_default_schedule_loads_samples_and_converts(diffusers, tmp_path,
                                                                                       variance_type):
    """The flat layout, three channels (out_channels 6) and diffusers' default T = 1000 linear schedule, as written
    to disk by save_pretrained: the U-Net (both halves) equals diffusers', the chain is the hybrid-loss learned one,
    the full ancestral loop, a respaced one and DDIM run to finite images, and save_converted / load_converted keep
    model_var_type and sample the same bits with a seed."""
    model = perturbed_unet(diffusers, LEARNED_RGB_UNET, seed=3)
    scheduler = diffusers.DDPMScheduler(variance_type=variance_type)
    folder = save_folder(diffusers, model, str(tmp_path / "model"), "flat", scheduler)
    with open(os.path.join(folder, "scheduler_config.json")) as f:
        on_disk = json.load(f)
    assert on_disk["variance_type"] == variance_type and on_disk["num_train_timesteps"] == 1000
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["out_channels"] == 6
    ours, d = assert_matches_diffusers(model, folder)
    assert d.model_var_type == variance_type and d.learn_sigma and d.loss_type == "hybrid"
    assert d.num_timesteps == 1000 and d.model_mean_type == "eps" and ours.config["out_channels"] == 6
    np.testing.assert_array_equal(d.betas, get_named_beta_schedule("linear", 1000))
    shape = (2, 3, 8, 8)
    samples = {"respaced": d.respaced(10).p_sample_loop(ours, shape, seed=0),
               "ddim": d.ddim_sample_loop(ours, shape, num_steps=5, seed=0)}
    if variance_type == "learned_range":   # all 1000 steps (~25 s here; "learned" runs them at T = 50 above)
        samples["ancestral"] = d.p_sample_loop(ours, shape, seed=0)
    for name, x in samples.items():
        x = backend.to_numpy(x)
        assert x.shape == shape and np.isfinite(x).all(), name

    model_, d_, info = pretrained.load_with_info(folder)
    converted = tmp_path / "converted.safetensors"
    pretrained.save_converted(converted, model_, d_, info)
    again, d2, info2 = pretrained.load_converted(converted)
    assert d2.model_var_type == variance_type and d2.learn_sigma and d2.loss_type == "hybrid"
    assert info2["channels"] == 3 and again.config == ours.config
    np.testing.assert_array_equal(d2.betas, d.betas)
    for name, (a, b) in {
            "respaced": (d.respaced(10).p_sample_loop(ours, shape, seed=1),
                         d2.respaced(10).p_sample_loop(again, shape, seed=1)),
            "ddim": (d.ddim_sample_loop(ours, shape, num_steps=5, seed=1),
                     d2.ddim_sample_loop(again, shape, num_steps=5, seed=1))}.items():
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b), err_msg=name)


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_cli_samples_a_learned_variance_folder_and_its_conversion_alike(diffusers, tmp_path, variance_type):
    """minidiff convert on a learned-variance diffusers folder: sample --checkpoint draws the bytes sample
    --pretrained draws, with the ancestral (respaced) and DDIM samplers, and the file keeps the variance type."""
    model = perturbed_unet(diffusers, LEARNED_UNET, seed=4)
    folder = save_folder(diffusers, model, str(tmp_path / "model"), "pipeline",
                         diffusers.DDPMScheduler(num_train_timesteps=100, variance_type=variance_type))
    converted = tmp_path / "learned.safetensors"
    assert run("convert", "--pretrained", folder, "--out", converted) == 0
    _, d, info = pretrained.load_converted(converted)
    assert d.model_var_type == variance_type and d.num_timesteps == 100 and info["channels"] == 1
    for sampler in (["--sampler", "ddpm", "--steps", "4"], ["--sampler", "ddim", "--steps", "3", "--eta", "1"]):
        a, b = tmp_path / "pretrained.npz", tmp_path / "converted.npz"
        assert run("sample", "--pretrained", folder, "--num", 2, *sampler, "--out", a) == 0
        assert run("sample", "--checkpoint", converted, "--num", 2, *sampler, "--out", b) == 0
        pictures = np.load(a)["arr_0"]
        assert pictures.shape[0] == 2 and pictures.size == 2 * 8 * 8
        np.testing.assert_array_equal(pictures, np.load(b)["arr_0"], err_msg=" ".join(sampler))


@pytest.mark.parametrize("clip", [True, False])
def test_a_loaded_learned_range_model_steps_like_diffusers_ddpm_pipeline(diffusers, tmp_path, clip, numpy_backend):
    """End to end, one step as DDPMPipeline takes it: diffusers' U-Net output into DDPMScheduler.step, against
    minidiff's p_sample on the loaded model with the same x_t and noise; on the full T = 1000 chain and on the
    10-step "linspace" grid, which is respaced(10)'s (asserted), where both use the respaced beta and beta_tilde."""
    import torch
    model = perturbed_unet(diffusers, LEARNED_UNET, seed=5)
    scheduler = diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=clip, timestep_spacing="linspace")
    ours, d = pretrained.load(save_folder(diffusers, model, str(tmp_path / "model"), "flat", scheduler))
    rng = np.random.default_rng(2)
    shape = (2, 1, 8, 8)

    def one_step(chain, code_t, t):
        x = rng.standard_normal(shape).astype(np.float32)
        z = rng.standard_normal(shape).astype(np.float32)
        out = diffusers_output(model, x, np.full(2, t, dtype=np.int64))
        prev = scheduler.step(torch.from_numpy(out), t, torch.from_numpy(x),
                              generator=torch.Generator().manual_seed(t)).prev_sample.numpy()
        drawn = torch.randn(shape, generator=torch.Generator().manual_seed(t), dtype=torch.float32).numpy()
        log_var = scheduler._get_variance(t, torch.from_numpy(out[:, 1:])).numpy()
        theirs = prev + np.exp(0.5 * log_var) * (z - drawn)          # the same step with minidiff's noise z
        got = backend.to_numpy(chain.p_sample(ours, x.astype(np.float64), np.full(2, code_t), noise=z.astype(np.float64),
                                              clip_denoised=clip)["sample"])
        scale = np.abs(theirs).max()
        assert np.abs(got - theirs).max() <= 1e-4 * scale, (code_t, t, np.abs(got - theirs).max(), scale)

    for t in (1, 10, 500, 999):
        one_step(d, t, t)
    scheduler.set_timesteps(10)
    short = d.respaced(10)
    np.testing.assert_array_equal(scheduler.timesteps.numpy()[::-1], short.timestep_map)
    for i in (1, 5, 9):
        one_step(short, i, int(short.timestep_map[i]))


def test_a_learned_variance_type_needs_twice_the_input_channels(tmp_path):
    """"learned" like "learned_range" (in the table above): out_channels must be 2 * in_channels, not C or 2C + 1."""
    for out_channels in (3, 7):
        folder = write_folder(tmp_path / str(out_channels), {"out_channels": out_channels},
                              {"variance_type": "learned"})
        with pytest.raises(PretrainedError, match=f"out_channels={out_channels}, but the scheduler's variance_type "
                                                  "learned needs the U-Net to output the variance too: "
                                                  r"out_channels = 2 \* in_channels = 6"):
            pretrained.load(folder)


# ---------------------------------------------------------------- export: minidiff -> diffusers


RUNS = {"unconditional": [], "conditional": ["--conditional"], "learned_range": ["--learn-sigma"]}


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """Short digits runs ({kind: run folder}) of each kind an export must carry: 20 steps, seconds each."""
    root = tmp_path_factory.mktemp("runs")
    for kind, extra in RUNS.items():
        assert main(["train", "--steps", "20", "--out", str(root / kind), "--no-progress", "--num-samples", "8",
                     *extra]) == 0
    return {kind: root / kind for kind in RUNS}


def _exported(runs, kind, tmp_path, *extra):
    out = tmp_path / f"export-{kind}-{len(list(tmp_path.iterdir()))}"
    assert run("export", "--checkpoint", runs[kind], "--out", out, *extra) == 0
    return out


def _diffusers_messages(diffusers, load):
    """What diffusers logs (info level) while `load()` runs, and load's result."""
    import io
    import logging
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = diffusers.utils.logging.get_logger("diffusers")
    before = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_info()
    logger.addHandler(handler)
    try:
        result = load()
    finally:
        logger.removeHandler(handler)
        diffusers.utils.logging.set_verbosity(before)
    return stream.getvalue(), result


@pytest.mark.parametrize("kind", list(RUNS))
def test_an_export_loads_in_diffusers_and_its_unet_and_scheduler_match(diffusers, digits_runs, tmp_path, kind):
    import torch

    from minidiff.sampling import load_model
    folder = _exported(digits_runs, kind, tmp_path)
    log, pipe = _diffusers_messages(diffusers, lambda: diffusers.DDPMPipeline.from_pretrained(folder))
    assert "All model checkpoint weights were used" in log and "were not used" not in log, log
    assert "newly initialized" not in log and "missing" not in log.lower(), log
    assert "not expected" not in log, log   # an unknown config field would be named here
    model, diffusion, _, _ = load_model(digits_runs[kind])
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    t = np.array([0, 1, 500, 999])
    ours_y, theirs = None, {}
    if kind == "conditional":   # labels 0 .. K-1 are the data's, diffusers' id K is minidiff's NO_LABEL
        K = model.num_classes
        ours_y = np.array([0, 7, -1, 9])
        theirs = {"class_labels": torch.from_numpy(np.where(ours_y < 0, K, ours_y))}
        assert pipe.unet.config.num_class_embeds == K + 1
    with torch.no_grad():
        expected = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), **theirs).sample.numpy()
    got = backend.to_numpy(model(Tensor(backend.to_active(x)), backend.to_active(t), ours_y).data)
    assert got.shape == expected.shape == (4, 2 if kind == "learned_range" else 1, 8, 8)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(pipe.scheduler.betas.numpy(), diffusion.betas, rtol=1e-6)   # diffusers: float32
    assert pipe.scheduler.config.variance_type == {"unconditional": "fixed_large", "conditional": "fixed_large",
                                                   "learned_range": "learned_range"}[kind]
    assert diffusion.model_var_type == pipe.scheduler.config.variance_type
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.scheduler.config.clip_sample


@pytest.mark.parametrize("kind", list(RUNS))
def test_export_then_load_round_trips_every_weight_bit_exactly(digits_runs, tmp_path, kind):
    from minidiff.sampling import load_model
    folder = _exported(digits_runs, kind, tmp_path)
    model, diffusion, _, _ = load_model(digits_runs[kind])
    loaded, loaded_diffusion = pretrained.load(folder)
    assert loaded.config == model.config and loaded.num_classes == model.num_classes
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    for name in ours:
        assert np.array_equal(backend.to_numpy(ours[name]), backend.to_numpy(theirs[name])), name
    assert np.array_equal(loaded_diffusion.betas, diffusion.betas)
    assert (loaded_diffusion.model_mean_type, loaded_diffusion.model_var_type) == \
           (diffusion.model_mean_type, diffusion.model_var_type)


def test_raw_exports_the_trained_weights_and_the_default_their_ema(digits_runs, tmp_path):
    from minidiff.sampling import load_model
    raw = _exported(digits_runs, "unconditional", tmp_path, "--raw")
    live, _, _, _ = load_model(digits_runs["unconditional"], use_ema=False)
    loaded, _ = pretrained.load(raw)
    for name, value in live.state_dict().items():
        assert np.array_equal(backend.to_numpy(value), backend.to_numpy(loaded.state_dict()[name])), name
    ema, _ = pretrained.load(_exported(digits_runs, "unconditional", tmp_path))
    assert not all(np.array_equal(backend.to_numpy(v), backend.to_numpy(ema.state_dict()[k]))
                   for k, v in live.state_dict().items())


@pytest.mark.parametrize("schedule,mean_type,zero_snr,named", [
    ("linear", "eps", False, "linear"), ("quad", "eps", False, "scaled_linear"),
    ("cosine", "x0", False, "squaredcos_cap_v2"), ("sigmoid", "eps", False, "sigmoid"),
    ("linear", "v", True, "linear"), ("custom", "eps", False, None)])
def test_the_schedule_is_named_only_where_diffusers_recomputes_it_exactly(schedule, mean_type, zero_snr, named):
    from minidiff.schedule import rescale_zero_terminal_snr
    T = 200
    betas = np.linspace(1e-3, 0.05, T) ** 1.5 if schedule == "custom" else get_named_beta_schedule(schedule, T)
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    diffusion = GaussianDiffusion(betas, model_mean_type=mean_type)
    config = pretrained.scheduler_config(diffusion)
    assert config["rescale_betas_zero_snr"] is zero_snr
    if named is None:
        assert config["trained_betas"] is not None and len(config["trained_betas"]) == T
    else:
        assert config["beta_schedule"] == named and config["trained_betas"] is None
    assert config["prediction_type"] == {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[mean_type]
    back, kwargs, _ = pretrained.scheduler_settings(json.loads(json.dumps(config)))
    assert np.array_equal(back, diffusion.betas) and kwargs["model_mean_type"] == mean_type


@pytest.mark.parametrize("schedule", ["linear", "quad", "cosine", "sigmoid", "custom"])
def test_diffusers_reads_each_exported_schedule_as_minidiffs_betas(diffusers, schedule):
    betas = np.linspace(1e-3, 0.05, 300) ** 1.5 if schedule == "custom" else get_named_beta_schedule(schedule, 300)
    config = pretrained.scheduler_config(GaussianDiffusion(betas, model_var_type="fixed_small"))
    scheduler = diffusers.DDPMScheduler.from_config(config)
    np.testing.assert_allclose(scheduler.betas.numpy(), betas, rtol=2e-6)
    assert scheduler.config.variance_type == "fixed_small"


def test_what_diffusers_cannot_represent_is_refused_with_one_line(tmp_path, capsys):
    assert main(["train", "--data", "swissroll", "--steps", "3", "--out", str(tmp_path / "points"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert run("export", "--checkpoint", tmp_path / "points", "--out", tmp_path / "e") == 2
    assert "2-D points" in one_error_line(capsys)
    from minidiff.unet import UNet
    unet = UNet(8, 1, 8, (1,), 1, (), out_channels=2)
    with pytest.raises(PretrainedError, match="'learned' output as sigma\\^2"):
        pretrained.save(unet, GaussianDiffusion(get_named_beta_schedule("linear", 10), model_var_type="learned",
                                                loss_type="hybrid"), tmp_path / "e")
    from minidiff.unet import MLPDenoiser
    with pytest.raises(PretrainedError, match="MLPDenoiser cannot be exported"):
        pretrained.save(MLPDenoiser(), GaussianDiffusion(get_named_beta_schedule("linear", 10)), tmp_path / "e")
    assert not (tmp_path / "e").exists() and os.listdir(tmp_path) == ["points"]


def test_another_class_conditional_model_is_refused_by_the_field_that_cannot_be_mapped(diffusers, tmp_path, capsys):
    config = dict(CIFAR10_NARROW, sample_size=8, in_channels=1, out_channels=1, block_out_channels=[16],
                  norm_num_groups=4, down_block_types=["DownBlock2D"], up_block_types=["UpBlock2D"],
                  num_class_embeds=10)
    folder = save_folder(diffusers, perturbed_unet(diffusers, config), tmp_path / "foreign", "pipeline")
    assert run("sample", "--pretrained", folder, "--out", tmp_path / "s.png") == 2
    line = one_error_line(capsys)
    assert "num_class_embeds=10" in line and pretrained.NO_LABEL_FIELD in line


def test_an_export_never_overwrites_and_never_leaves_a_partial_folder(digits_runs, tmp_path, capsys, monkeypatch):
    out = _exported(digits_runs, "unconditional", tmp_path)
    before = sorted(p.name for p in out.rglob("*"))
    stamp = (out / "unet" / pretrained.WEIGHTS).stat().st_mtime_ns
    capsys.readouterr()
    assert run("export", "--checkpoint", digits_runs["conditional"], "--out", out) == 2
    assert "--force" in one_error_line(capsys)
    assert (out / "unet" / pretrained.WEIGHTS).stat().st_mtime_ns == stamp
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    assert run("export", "--checkpoint", digits_runs["unconditional"], "--out", mine, "--force") == 2
    assert "not an earlier export" in one_error_line(capsys) and (mine / "keep.txt").read_text() == "precious"

    import safetensors.numpy

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    assert run("export", "--checkpoint", digits_runs["conditional"], "--out", out, "--force") == 2
    assert "No space left" in one_error_line(capsys)
    assert sorted(p.name for p in out.rglob("*")) == before       # the earlier export is untouched
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name or p.name.endswith(".old")]
    monkeypatch.undo()
    assert run("export", "--checkpoint", digits_runs["conditional"], "--out", out, "--force") == 0
    assert pretrained.load(out)[0].num_classes == 10
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name or p.name.endswith(".old")]


def test_the_model_card_is_in_the_hubs_format_and_describes_the_run(digits_runs, tmp_path):
    from PIL import Image
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"checkpoint": "x", "frechet_distance": 1.25, "precision_recall":
                                  {"precision": 0.75, "recall": 0.5}, "ema": True}))
    out = _exported(digits_runs, "conditional", tmp_path, "--report", report)
    card = (out / "README.md").read_text()
    header, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: diffusers" in header and "license: cc-by-4.0" in header and "- minidiff" in header
    assert "| data | `digits` |" in body and "| training steps | 20 |" in body and "| preset | `digits` |" in body
    last = pretrained.json.loads((digits_runs["conditional"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"| loss | {last['loss']:.4g} |" in body
    assert "| frechet_distance | 1.25 |" in body and "| precision_recall.recall | 0.5 |" in body
    assert "id 10 is \"no label\"" in body and "![samples drawn from this model](samples.png)" in body
    with Image.open(out / "samples.png") as picture:
        assert picture.format == "PNG" and min(picture.size) > 8
    assert run("export", "--checkpoint", digits_runs["unconditional"], "--out", tmp_path / "mit",
               "--license", "mit") == 0
    assert "license: mit" in (tmp_path / "mit" / "README.md").read_text()
