"""The paper's own trained models: diffusers-format DDPM folders loaded into minidiff.UNet.

Ho et al.'s CIFAR-10, CelebA-HQ and LSUN weights are published in the diffusers format
(google/ddpm-cifar10-32, google/ddpm-celebahq-256, google/ddpm-church-256, ..., and the
ddpm-ema-* variants): a UNet2DModel (config.json + diffusion_pytorch_model.safetensors) and
a DDPMScheduler (scheduler_config.json). `load(path)` reads such a folder, flat or in the
pipeline layout (model_index.json, unet/, scheduler/), and returns (minidiff.UNet, GaussianDiffusion).

Everything is derived from the configs, never guessed: the U-Net's widths, levels and
attention placement from block_out_channels / layers_per_block / *_block_types, and the
details a training can vary (norm_eps, downsample_padding, flip_sin_to_cos, freq_shift,
attention_head_dim) through UNet's keyword options. A field minidiff cannot represent is
refused with one error naming the field and its value. A missing field takes diffusers'
own default (UNET_DEFAULTS, SCHEDULER_DEFAULTS: diffusers 0.42's, as diffusers itself does);
a field diffusers does not know is ignored, again as diffusers does.

Safety: weights are read from diffusion_pytorch_model.safetensors (a table of raw tensors)
or, where a folder has none, from its PyTorch pickle (diffusion_pytorch_model.bin) through
minidiff.torchfile, which rebuilds tensors and dicts only and refuses any other pickle global
or opcode before anything is unpickled: no code from a weight file ever runs.
Nothing in a folder is trusted or allocated before it is checked: the JSON files are bounded
(MAX_CONFIG_BYTES); every config number is checked for its type and range, and the parameter
count the config implies (computed arithmetically, checkpoint.model_shapes) against
checkpoint.parameter_limit() (a cap, or less where memory is short); T against
checkpoint.MAX_TIMESTEPS and the image size against checkpoint.MAX_IMAGE_SIZE. The weights
file's header (checkpoint.read_header) must then list exactly the tensors, shapes and float
dtypes the config implies and account for the file's every byte, before the U-Net is built and
any tensor is read. Each refusal is one PretrainedError naming the file and the field.
May import: backend, schedule, diffusion, unet, checkpoint, torchfile (besides json, os, safetensors).
"""
import json
import math
import os

from . import backend, checkpoint, torchfile
from .checkpoint import CheckpointError
from .diffusion import LEARNED_VAR_TYPES, GaussianDiffusion
from .schedule import SPACINGS, betas_for_alpha_bar, check_betas, cosine_alpha_bar, rescale_zero_terminal_snr
from .unet import UNet

host = backend.host

MAX_CONFIG_BYTES = 16 << 20  # config.json is a kilobyte; trained_betas of T = 100,000 are ~2 MB
WEIGHT_DTYPES = ("F16", "F32", "F64")  # the floating-point dtypes read (and cast to float32)

WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.pt", "pytorch_model.bin")
FORMAT = checkpoint.MODEL_FORMAT  # the "format" of a converted checkpoint (see save_converted)

# UNet2DModel.__init__'s defaults (diffusers 0.42): what diffusers assumes for a field a config.json omits.
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
# DDPMScheduler.__init__'s defaults (DDIMScheduler shares those minidiff reads).
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "clip_sample_range": 1.0, "timestep_spacing": "leading", "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
DDIM_DEFAULTS = {"set_alpha_to_one": True}   # DDIMScheduler's own field (a DDPMScheduler config never has it)
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# diffusers' *_log variants compute the same sigma_t through a log. The learned ones (Improved DDPM) need a
# U-Net with out_channels = 2 * in_channels: "learned_range" is Eq. 15's v in [-1, 1], as diffusers and
# improved-diffusion read it; "learned" is log sigma^2, as improved-diffusion (where such models come from)
# defines it. (diffusers' DDPMScheduler.step takes a "learned" output's square root, as if it were sigma^2.)
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                  "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
                  "learned": "learned", "learned_range": "learned_range"}


class PretrainedError(CheckpointError):
    """A diffusers folder that is missing, unreadable or unrepresentable; the message names file and field."""


# ---------------------------------------------------------------- finding the files


def find_files(path):
    """{"unet_config", "weights", "scheduler_config"} paths of a flat or pipeline-layout folder.

    Pipeline layout: model_index.json with unet/ and scheduler/ subfolders; flat: config.json,
    the weights and scheduler_config.json side by side. Subfolders win where both exist.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        what = "a file" if os.path.exists(path) else "no such folder"
        raise PretrainedError(f"{path}: {what}; --pretrained takes a diffusers model folder (config.json, "
                              f"{WEIGHTS}, scheduler_config.json, or model_index.json with unet/ and scheduler/)")
    index = os.path.join(path, "model_index.json")
    if os.path.isfile(index):
        _check_model_index(index, _read_json(index))
    unet_dir = os.path.join(path, "unet") if os.path.isfile(os.path.join(path, "unet", "config.json")) else path
    sched_dir = os.path.join(path, "scheduler") if os.path.isdir(os.path.join(path, "scheduler")) else path
    unet_config = os.path.join(unet_dir, "config.json")
    if not os.path.isfile(unet_config):
        raise PretrainedError(f"{path}: no config.json (nor unet/config.json): not a diffusers UNet2DModel folder")
    scheduler_config = os.path.join(sched_dir, "scheduler_config.json")
    if not os.path.isfile(scheduler_config):
        raise PretrainedError(f"{path}: no scheduler_config.json (nor scheduler/scheduler_config.json): the "
                              f"noise schedule the model was trained with is unknown")
    return {"unet_config": unet_config, "weights": _weights_file(unet_dir), "scheduler_config": scheduler_config}


def _weights_file(folder):
    weights = os.path.join(folder, WEIGHTS)
    if os.path.isfile(weights):
        return weights
    if os.path.isfile(weights + ".index.json"):
        raise PretrainedError(f"{weights}.index.json: sharded weights are not supported; the DDPM models fit "
                              f"one {WEIGHTS}")
    pickles = [name for name in PICKLES if os.path.isfile(os.path.join(folder, name))]
    if pickles:   # read by minidiff.torchfile, which rebuilds tensors only and never runs code from the file
        return os.path.join(folder, pickles[0])
    raise PretrainedError(f"{folder}: no {WEIGHTS} (nor {', '.join(PICKLES)})")


def _pickle_entries(path):
    """{name: (dtype, shape, None, array)} of a PyTorch weight file, read safely (torchfile)."""
    try:
        tensors = torchfile.load_state_dict(path)
    except ValueError as err:   # UnsafeFileError: refused global or opcode, or a damaged file
        raise PretrainedError(f"{err}; download {WEIGHTS} from the model repository instead") from None
    return {k: (v.dtype, tuple(v.shape), None, v) for k, v in tensors.items()}


def _read_json(path):
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise PretrainedError(f"{path}: {size:,} bytes; a diffusers config is kilobytes (minidiff reads at most "
                                  f"{MAX_CONFIG_BYTES:,})")
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as err:
        raise PretrainedError(f"{path}: not readable ({err.strerror or err})") from None
    except RecursionError:
        raise PretrainedError(f"{path}: not readable JSON (nested too deeply)") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, a number of over 4300 digits
        raise PretrainedError(f"{path}: not readable JSON ({str(err).splitlines()[0][:200]})") from None
    if not isinstance(value, dict):
        raise PretrainedError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _check_model_index(path, index):
    unet, scheduler = index.get("unet"), index.get("scheduler")
    if not isinstance(unet, list) or unet[-1:] != ["UNet2DModel"]:
        raise PretrainedError(f"{path}: unet is {_show(unet)}; minidiff loads a UNet2DModel (DDPM pipelines)")
    if isinstance(scheduler, list) and scheduler[-1:] != [] and scheduler[-1] not in SCHEDULERS:
        raise PretrainedError(f"{path}: scheduler is {_show(scheduler)}; minidiff reads {' or '.join(SCHEDULERS)}")


# ---------------------------------------------------------------- configs


def _show(value, limit=80):
    """The JSON of a config value, cut to `limit` characters (a hostile one can be megabytes)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(type(value))
    return text if len(text) <= limit else text[:limit] + "..."


def _refuse(where, field, value, why):
    raise PretrainedError(f"{where}: {field}={_show(value)} is not supported: {why}")


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(where, c, field, low, high, why=""):
    """c[field] must be an integer in [low, high]: the check of every size before anything is allocated."""
    if not isinstance(c[field], int) or isinstance(c[field], bool) or not low <= c[field] <= high:
        _refuse(where, field, c[field], f"expected a whole number from {low} to {high:,}{why}")


def unet_kwargs(config, where="config.json"):
    """minidiff.UNet's constructor arguments for a UNet2DModel config (dict), or PretrainedError."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        _refuse(where, "_class_name", config["_class_name"], "minidiff loads UNet2DModel, the DDPM U-Net")
    c = {**UNET_DEFAULTS, **{k: v for k, v in config.items() if k in UNET_DEFAULTS}}
    fixed = {"center_input_sample": (False, "minidiff's U-Net takes x_t as it is"),
             "time_embedding_type": ("positional", "minidiff embeds t with the paper's sinusoids"),
             "mid_block_type": ("UNetMidBlock2D", "minidiff's middle is (res, attention, res)"),
             "downsample_type": ("conv", "minidiff downsamples with a stride-2 conv"),
             "upsample_type": ("conv", "minidiff upsamples with nearest neighbours and a conv"),
             "resnet_time_scale_shift": ("default", "minidiff's res blocks add the timestep projection"),
             "add_attention": (True, "minidiff's middle always has attention"),
             "class_embed_type": (None, "minidiff's labels index a class embedding table (num_class_embeds)")}
    for field, (allowed, why) in fixed.items():
        if c[field] != allowed:
            _refuse(where, field, c[field], why)
    if c["act_fn"] not in ("silu", "swish"):
        _refuse(where, "act_fn", c["act_fn"], "minidiff's U-Net uses swish (silu)")
    if c["mid_block_scale_factor"] != 1:
        _refuse(where, "mid_block_scale_factor", c["mid_block_scale_factor"], "minidiff's residuals are unscaled")
    # Every number, by type and range, before any of them sizes anything
    widths = c["block_out_channels"]
    if not isinstance(widths, (list, tuple)) or not widths or not all(_pos_int(w) for w in widths):
        _refuse(where, "block_out_channels", widths, "expected a list of positive integers")
    if len(widths) > checkpoint.MAX_LEVELS or max(widths) > checkpoint.MAX_WIDTH:
        _refuse(where, "block_out_channels", widths, f"minidiff takes at most {checkpoint.MAX_LEVELS} levels of at "
                                                     f"most {checkpoint.MAX_WIDTH:,} channels")
    if widths[0] < 4:
        _refuse(where, "block_out_channels", widths, "the timestep embedding needs a first width of at least 4")
    _whole(where, c, "layers_per_block", 1, checkpoint.MAX_RES_BLOCKS)
    _whole(where, c, "in_channels", 1, checkpoint.MAX_WIDTH)
    _whole(where, c, "out_channels", 1, checkpoint.MAX_WIDTH)
    _whole(where, c, "norm_num_groups", 1, widths[0], f" (a divisor of the first width, {widths[0]})")
    if widths[0] % c["norm_num_groups"]:
        _refuse(where, "norm_num_groups", c["norm_num_groups"], f"GroupNorm needs a divisor of every width {widths}")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        _refuse(where, "attn_norm_num_groups", c["attn_norm_num_groups"],
                f"minidiff's attention normalises with norm_num_groups={c['norm_num_groups']} groups")
    if not _number(c["norm_eps"]) or not c["norm_eps"] > 0:
        _refuse(where, "norm_eps", c["norm_eps"], "expected a positive number")
    if not _number(c["dropout"]) or not 0 <= c["dropout"] < 1:
        _refuse(where, "dropout", c["dropout"], "expected a number in [0, 1)")
    if not _number(c["freq_shift"]):
        _refuse(where, "freq_shift", c["freq_shift"], "expected a number")
    if not isinstance(c["flip_sin_to_cos"], bool):
        _refuse(where, "flip_sin_to_cos", c["flip_sin_to_cos"], "expected true or false")
    if c["num_train_timesteps"] is not None:   # unused by a positional embedding; still a number
        _whole(where, c, "num_train_timesteps", 1, checkpoint.MAX_TIMESTEPS)
    for field in ("down_block_types", "up_block_types"):
        if not isinstance(c[field], (list, tuple)) or not all(isinstance(b, str) for b in c[field]):
            _refuse(where, field, c[field], "expected a list of block type names")
    ch = widths[0]
    if any(w % ch for w in widths):
        _refuse(where, "block_out_channels", widths, f"minidiff's widths are multiples of the first one ({ch})")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        _refuse(where, "time_embedding_dim", c["time_embedding_dim"], f"minidiff's timestep embedding has 4 x {ch}")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    for field, blocks, plain, attn in (("down_block_types", down, "DownBlock2D", "AttnDownBlock2D"),
                                       ("up_block_types", up, "UpBlock2D", "AttnUpBlock2D")):
        if len(blocks) != len(widths):
            _refuse(where, field, blocks, f"needs one block per entry of block_out_channels ({len(widths)})")
        for block in blocks:
            if block not in (plain, attn):
                _refuse(where, field, blocks, f"block type {block!r} is not one of {plain}, {attn}")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not _pos_int(size):
        _refuse(where, "sample_size", c["sample_size"], "minidiff needs the (square) image size")
    if size > checkpoint.MAX_IMAGE_SIZE:
        _refuse(where, "sample_size", c["sample_size"], f"minidiff samples images of at most "
                                                        f"{checkpoint.MAX_IMAGE_SIZE} pixels a side")
    if size % 2 ** (len(widths) - 1):
        _refuse(where, "sample_size", c["sample_size"], f"the {len(widths)} levels of block_out_channels halve it "
                                                        f"{len(widths) - 1} times")
    resolutions = [size // 2 ** i for i in range(len(widths))]
    attn_down = [r for r, block in zip(resolutions, down) if block == "AttnDownBlock2D"]
    attn_up = [r for r, block in zip(reversed(resolutions), up) if block == "AttnUpBlock2D"]
    if sorted(attn_down) != sorted(attn_up):
        _refuse(where, "up_block_types", up, f"minidiff puts attention on both paths at the same resolutions; "
                                             f"down_block_types has it at {attn_down}")
    padding = {0: "same", 1: "symmetric"}.get(c["downsample_padding"])
    if padding is None:
        _refuse(where, "downsample_padding", c["downsample_padding"], "minidiff pads by 0 (TF SAME) or 1")
    if c["freq_shift"] >= ch // 2:
        _refuse(where, "freq_shift", c["freq_shift"], f"the embedding divides by {ch // 2} - freq_shift")
    head_dim = c["attention_head_dim"]
    if head_dim is not None and (not _pos_int(head_dim) or any(w % head_dim for w in widths)):
        _refuse(where, "attention_head_dim", head_dim, f"must divide every width {widths} into whole heads")
    num_classes = _num_classes(where, c["num_class_embeds"], config.get(NO_LABEL_FIELD))
    kwargs = dict(image_size=size, in_channels=c["in_channels"], ch=ch, ch_mult=tuple(w // ch for w in widths),
                  num_res_blocks=c["layers_per_block"], attn_resolutions=tuple(sorted(attn_down, reverse=True)),
                  dropout=float(c["dropout"]), out_channels=c["out_channels"], num_groups=c["norm_num_groups"],
                  norm_eps=float(c["norm_eps"]), downsample_padding=padding,
                  flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=c["freq_shift"], attn_head_dim=head_dim)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    count = sum(math.prod(shape) for shape in checkpoint.model_shapes(kwargs).values())
    limit, why = checkpoint.parameter_limit()
    if count > limit:
        _refuse(where, "block_out_channels", widths,
                f"with layers_per_block={c['layers_per_block']} the U-Net has {count:,} parameters "
                f"({count * 4 / 2 ** 30:.1f} GiB of float32), more than minidiff loads (at most {limit:,}: {why})")
    return kwargs


def _num_classes(where, num_class_embeds, no_label_class):
    """minidiff's num_classes K of a class-conditional UNet2DModel, None for an unconditional one.

    minidiff's conditional U-Net has K + 1 label rows, row K meaning "no label" (classifier-free guidance);
    its exports say so in NO_LABEL_FIELD. Another model's class table has no such row: it is refused."""
    if num_class_embeds is None:
        return None
    if not _pos_int(num_class_embeds) or num_class_embeds < 2 or num_class_embeds > checkpoint.MAX_CLASSES + 1:
        _refuse(where, "num_class_embeds", num_class_embeds, f"expected a whole number from 2 to "
                                                             f"{checkpoint.MAX_CLASSES + 1:,}")
    if no_label_class != num_class_embeds - 1 or isinstance(no_label_class, bool):
        _refuse(where, "num_class_embeds", num_class_embeds,
                f"minidiff's class-conditional U-Net keeps its last class id for 'no label' (classifier-free "
                f"guidance), which its exports record as {NO_LABEL_FIELD} = {num_class_embeds - 1}; this model "
                f"has {NO_LABEL_FIELD} = {_show(no_label_class)}, so its classes cannot be mapped")
    return num_class_embeds - 1


def scheduler_settings(config, where="scheduler_config.json"):
    """(betas float64 (T,), GaussianDiffusion keyword arguments, sampling settings) from a scheduler config.

    The sampling settings are {"clip_denoised": clip_sample, "ddim": {"spacing", "set_alpha_to_one",
    "steps_offset"}}: how diffusers' DDIMScheduler places its steps (timestep_spacing, steps_offset, which
    shifts the "leading" grid only) and ends (set_alpha_to_one: alpha_bar = 1 after the last step, or
    alpha_bar at t = 0), the defaults of minidiff's DDIM for this model. rescale_betas_zero_snr rescales
    the betas (schedule.rescale_zero_terminal_snr), for v and x_0 models.
    """
    name = config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        _refuse(where, "_class_name", name, f"minidiff reads {' and '.join(SCHEDULERS)} configs")
    known = {**SCHEDULER_DEFAULTS, **DDIM_DEFAULTS}
    c = {**known, **{k: v for k, v in config.items() if k in known}}
    if c["thresholding"]:
        _refuse(where, "thresholding", c["thresholding"], "minidiff clips x_0 to [-1, 1] (clip_sample) only")
    for field in ("rescale_betas_zero_snr", "set_alpha_to_one"):
        if not isinstance(c[field], bool):
            _refuse(where, field, c[field], "expected true or false")
    if c["rescale_betas_zero_snr"] and c["prediction_type"] == "epsilon":
        _refuse(where, "rescale_betas_zero_snr", True, "zero terminal SNR needs prediction_type v_prediction or "
                "sample: an epsilon model cannot give x_0 from pure noise (alpha_bar_T = 0)")
    if c["timestep_spacing"] not in SPACINGS:
        _refuse(where, "timestep_spacing", c["timestep_spacing"], f"use one of {', '.join(SPACINGS)}")
    if not isinstance(c["clip_sample"], bool):
        _refuse(where, "clip_sample", c["clip_sample"], "expected true or false")
    if c["clip_sample"] and c["clip_sample_range"] != 1.0:
        _refuse(where, "clip_sample_range", c["clip_sample_range"], "minidiff clips x_0 to the data range [-1, 1]")
    if c["variance_type"] not in VARIANCE_TYPES:
        _refuse(where, "variance_type", c["variance_type"], f"use one of {', '.join(VARIANCE_TYPES)}")
    if c["prediction_type"] not in PREDICTION_TYPES:
        _refuse(where, "prediction_type", c["prediction_type"], f"use one of {', '.join(PREDICTION_TYPES)}")
    T = c["num_train_timesteps"]
    if not _pos_int(T) or not 2 <= T <= checkpoint.MAX_TIMESTEPS:
        _refuse(where, "num_train_timesteps", T, f"needs an integer from 2 to {checkpoint.MAX_TIMESTEPS:,}")
    if c["trained_betas"] is not None:
        trained = c["trained_betas"]
        if not isinstance(trained, list) or len(trained) != T or not all(_number(b) for b in trained):
            what = f"<{len(trained)} values>" if isinstance(trained, list) else trained
            _refuse(where, "trained_betas", what, f"needs num_train_timesteps={T} numbers")
        betas = host.asarray(trained, dtype=host.float64)
    else:
        for field in ("beta_start", "beta_end"):
            if not _number(c[field]):
                _refuse(where, field, c[field], "expected a number")
        start, end = float(c["beta_start"]), float(c["beta_end"])
        schedule = c["beta_schedule"]
        if schedule == "linear":  # Ho et al. 2020, Sec. 4
            betas = host.linspace(start, end, T, dtype=host.float64)
        elif schedule == "scaled_linear":  # linear in sqrt(beta)
            betas = host.linspace(start ** 0.5, end ** 0.5, T, dtype=host.float64) ** 2
        elif schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, Eq. 17
            betas = betas_for_alpha_bar(T, cosine_alpha_bar)
        elif schedule == "sigmoid":
            betas = 1.0 / (1.0 + host.exp(-host.linspace(-6.0, 6.0, T, dtype=host.float64))) * (end - start) + start
        else:
            _refuse(where, "beta_schedule", schedule, "use linear, scaled_linear, squaredcos_cap_v2 or sigmoid")
    offset = c["steps_offset"]
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < T:
        _refuse(where, "steps_offset", offset, f"needs an integer from 0 to {T - 1}")
    try:
        betas = check_betas(betas)
        if c["rescale_betas_zero_snr"]:
            betas = rescale_zero_terminal_snr(betas)   # Lin et al. 2023, Algorithm 1
    except ValueError as err:
        raise PretrainedError(f"{where}: {err}") from None
    var_type = VARIANCE_TYPES[c["variance_type"]]
    kwargs = dict(model_mean_type=PREDICTION_TYPES[c["prediction_type"]], model_var_type=var_type,
                  loss_type=_loss_for(var_type))
    ddim = {"spacing": c["timestep_spacing"], "set_alpha_to_one": c["set_alpha_to_one"], "steps_offset": offset}
    return betas, kwargs, {"clip_denoised": bool(c["clip_sample"]), "ddim": ddim}


def _loss_for(var_type):
    """The loss a GaussianDiffusion of this variance type is built with: a loaded model is sampled, not trained,
    but a learned variance is only consistent with the hybrid loss (diffusion.check_variance_and_loss)."""
    return "hybrid" if var_type in LEARNED_VAR_TYPES else "mse"


def _pos_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# ---------------------------------------------------------------- weights


_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
           "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
# minidiff attention names -> (diffusers' current name, its older name); the group_norm never changed
_ATTN = {"norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"), "v": ("to_v", "value"),
         "proj_out": ("to_out.0", "proj_attn")}


def diffusers_names(name, num_levels):
    """The UNet2DModel parameter name(s) of minidiff parameter `name`, the current one first.

    diffusers lists its up blocks from the lowest resolution (up_blocks.0) up; minidiff's
    up.{i} is level i, as the original code's up_{i}, so up.{i} is up_blocks.{L - 1 - i}.
    """
    fixed = {"temb.dense0": "time_embedding.linear_1", "temb.dense1": "time_embedding.linear_2",
             "norm_out": "conv_norm_out", "conv_in": "conv_in", "conv_out": "conv_out",
             "label_emb": "class_embedding"}   # K + 1 rows, the last one NO_LABEL (unet_config)
    module, leaf = name.rsplit(".", 1)
    if module in fixed:
        return [f"{fixed[module]}.{leaf}"]
    parts = module.split(".")
    if parts[0] == "mid":
        block = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}[parts[1]]
        prefix, kind, rest = f"mid_block.{block}", parts[1][:-2], parts[2:]
    else:
        level = int(parts[1]) if parts[0] == "down" else num_levels - 1 - int(parts[1])
        path = "down_blocks" if parts[0] == "down" else "up_blocks"
        if parts[2] in ("downsample", "upsample"):
            return [f"{path}.{level}.{parts[2]}rs.0.conv.{leaf}"]
        kind = parts[2]
        prefix, rest = f"{path}.{level}.{'resnets' if kind == 'block' else 'attentions'}.{parts[3]}", parts[4:]
    if kind == "block":
        return [f"{prefix}.{_RESNET[rest[0]]}.{leaf}"]
    return [f"{prefix}.{alias}.{leaf}" for alias in _ATTN[rest[0]]]


def read_weights(path, model):
    """minidiff state dict for `model` from a UNet2DModel .safetensors file, float32 host arrays.

    `model` is a minidiff.UNet, or its parameter shapes {name: shape} (checkpoint.model_shapes).
    Every tensor is matched by name (current or older attention names), shape and dtype from
    the file's header before any tensor data is read (plan_weights); a missing tensor, a shape
    mismatch, a left-over tensor or a damaged file is one PretrainedError naming it.
    """
    shapes = _shapes_of(model)
    plan = plan_weights(path, shapes)
    return read_planned(path, plan)


def _shapes_of(model):
    if isinstance(model, dict):
        return model
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def plan_weights(path, shapes):
    """[(minidiff name, diffusers name, header entry, shape)] for the parameters `shapes` ({name: shape}), from
    the file's header alone: no tensor data is read, so a header declaring gigabytes costs nothing."""
    num_levels = len({name.split(".")[1] for name in shapes if name.startswith("down.")})
    if not path.endswith(".safetensors"):
        entries = _pickle_entries(path)
    else:
        try:
            with open(path, "rb") as f:
                _, entries, _ = checkpoint.read_header(path, f, error=PretrainedError, advice="; download it again")
        except OSError as err:
            raise PretrainedError(f"{path}: cannot read the weights ({err.strerror or err})") from None
    plan, used = [], set()
    for name, shape in shapes.items():
        candidates = diffusers_names(name, num_levels)
        key = next((k for k in candidates if k in entries), None)
        if key is None:
            raise PretrainedError(f"{path}: tensor {candidates[0]} is missing (it holds minidiff's {name}); "
                                  f"the file does not match its config.json")
        dtype, stored, _, _ = entries[key]
        # attention projections saved as 1x1 convolutions: (C, C, 1, 1) for (C, C)
        if stored != tuple(shape) and stored != (*shape, 1, 1):
            raise PretrainedError(f"{path}: tensor {key} has shape {stored} but the config "
                                  f"needs {tuple(shape)} (minidiff's {name})")
        if dtype.kind != "f":
            raise PretrainedError(f"{path}: tensor {key} has dtype {dtype}; expected floating point "
                                  f"({', '.join(WEIGHT_DTYPES)})")
        plan.append((name, key, entries[key], tuple(shape)))
        used.add(key)
    left = sorted(set(entries) - used)
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise PretrainedError(f"{path}: tensors {', '.join(_show(k) for k in left[:3])}{more} have no place in the "
                              f"U-Net its config.json describes")
    return plan


def read_planned(path, plan):
    """The float32 state dict of a plan_weights plan: each tensor read from its offsets, checked finite."""
    state = {}
    if not path.endswith(".safetensors"):   # a PyTorch file: plan_weights already holds its arrays
        for name, key, entry, shape in plan:
            value = entry[3]
            if not host.isfinite(value).all():
                raise PretrainedError(f"{path}: tensor {key} holds NaN or infinite values")
            state[name] = value.reshape(shape).astype(backend.DTYPE, copy=False)
        return state
    try:
        with open(path, "rb") as f:
            _, entries, data_start = checkpoint.read_header(path, f, error=PretrainedError,
                                                            advice="; download it again")
            for name, key, entry, shape in plan:
                if entries.get(key) != entry:
                    raise PretrainedError(f"{path}: the file changed while it was read")
                value = checkpoint.read_tensor(f, entry, data_start)
                if not host.isfinite(value).all():
                    raise PretrainedError(f"{path}: tensor {key} holds NaN or infinite values")
                state[name] = value.reshape(shape).astype(backend.DTYPE, copy=False)
    except OSError as err:
        raise PretrainedError(f"{path}: cannot read the weights ({err.strerror or err})") from None
    return state


# ---------------------------------------------------------------- the public loaders


def load(path):
    """(model, diffusion) from a diffusers DDPM folder: a minidiff.UNet in eval mode and its GaussianDiffusion."""
    model, diffusion, _ = load_with_info(path)
    return model, diffusion


def load_with_info(path):
    """(model, diffusion, info); info has "source", "image_size", "channels", "clip_denoised" and "ddim".

    clip_denoised is the scheduler's clip_sample: whether the x_0 prediction is clipped to [-1, 1]
    while sampling (True for the DDPM models); "ddim" are its DDIM settings (scheduler_settings).
    """
    files = find_files(path)
    kwargs = _parse(unet_kwargs, files["unet_config"])  # every number checked, the size affordable
    betas, diffusion_kwargs, settings = _parse(scheduler_settings, files["scheduler_config"])
    var_type = diffusion_kwargs["model_var_type"]
    if var_type in LEARNED_VAR_TYPES and kwargs.get("out_channels") != 2 * kwargs["in_channels"]:
        raise PretrainedError(f"{files['unet_config']}: out_channels={kwargs.get('out_channels')}, but the scheduler's "
                              f"variance_type {var_type} needs the U-Net to output the variance too: out_channels = "
                              f"2 * in_channels = {2 * kwargs['in_channels']}")
    plan = plan_weights(files["weights"], checkpoint.model_shapes(kwargs))  # the header matches, data unread
    try:
        model = UNet(**kwargs)  # the U-Net's own checks: group counts, sizes, levels
    except ValueError as err:
        raise PretrainedError(f"{files['unet_config']}: {err}") from None
    model.load_state_dict(read_planned(files["weights"], plan))
    model.eval()
    info = {"source": os.path.abspath(os.fspath(path)), "image_size": kwargs["image_size"],
            "channels": kwargs["in_channels"], **settings}
    return model, GaussianDiffusion(betas, **diffusion_kwargs), info


def _parse(reader, path):
    """reader(config, path), with a field of the wrong type (a string for a number, ...) as one PretrainedError."""
    try:
        return reader(_read_json(path), path)
    except PretrainedError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as err:
        raise PretrainedError(f"{path}: malformed config ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None


def save_converted(path, model, diffusion, info):
    """Write model, schedule and info as one minidiff checkpoint (atomic; loads with load_converted)."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()}
    checkpoint.save(path, {"format": FORMAT, "model_config": config, "model": model.state_dict(),
                           "diffusion": {"betas": diffusion.betas, "model_mean_type": diffusion.model_mean_type,
                                         "model_var_type": diffusion.model_var_type},
                           "info": dict(info)})


def is_converted(path):
    """Whether `path` is a checkpoint written by save_converted (reads the header only)."""
    return checkpoint.peek(path).get("format") == FORMAT


def load_converted(path):
    """(model, diffusion, info) from a checkpoint written by save_converted: no diffusers files needed."""
    state = checkpoint.load(path)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{checkpoint.resolve(path)}: not a converted minidiff model")
    try:
        model = UNet(**state["model_config"])
        model.load_state_dict(state["model"])
        d = state["diffusion"]
        diffusion = GaussianDiffusion(d["betas"], model_mean_type=d["model_mean_type"],
                                      model_var_type=d["model_var_type"], loss_type=_loss_for(d["model_var_type"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{checkpoint.resolve(path)}: cannot rebuild the model ({err})") from None
    model.eval()
    return model, diffusion, state["info"]



# ---------------------------------------------------------------- export: minidiff -> diffusers


DIFFUSERS_VERSION = "0.42.1"  # the diffusers whose UNet2DModel and DDPMScheduler fields an export writes
NO_LABEL_FIELD = "_minidiff_no_label_class"  # diffusers drops config keys that start with "_", silently
EXPORT_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
MEAN_TYPE_NAMES = {ours: theirs for theirs, ours in PREDICTION_TYPES.items()}
# minidiff's variance types in diffusers' words; "learned" (log sigma^2, improved-diffusion's reading) has none:
# diffusers' DDPMScheduler reads a "learned" output as sigma^2 itself
EXPORT_VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_large": "fixed_large", "learned_range": "learned_range"}


def unet_config(model):
    """The UNet2DModel config.json of a minidiff.UNet: the inverse of unet_kwargs, every field written out.

    A class-conditional U-Net (num_classes = K) keeps its K + 1 label rows as diffusers' class embedding
    (num_class_embeds = K + 1, added to the timestep embedding after its MLP, as minidiff adds label_emb):
    class ids 0 .. K-1 are the data's labels and id K is minidiff's NO_LABEL ("no label", the unconditional
    model of classifier-free guidance), which NO_LABEL_FIELD records so that minidiff reads it back.
    """
    if not isinstance(model, UNet):
        raise PretrainedError(f"a {type(model).__name__} cannot be exported: diffusers' UNet2DModel holds image "
                              f"models, not the 2-D point denoiser of the toy data sets")
    c = {**UNet.OPTION_DEFAULTS, **model.config}
    ch, size = c["ch"], c["image_size"]
    widths = [ch * m for m in c["ch_mult"]]
    sides = [size >> i for i in range(len(widths))]
    attn = set(c["attn_resolutions"])
    config = {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": size, "in_channels": c["in_channels"], "out_channels": c["out_channels"],
        "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
        "freq_shift": c["freq_shift"], "flip_sin_to_cos": c["flip_sin_to_cos"],
        "down_block_types": ["AttnDownBlock2D" if s in attn else "DownBlock2D" for s in sides],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if s in attn else "UpBlock2D" for s in reversed(sides)],
        "block_out_channels": widths, "layers_per_block": c["num_res_blocks"], "mid_block_scale_factor": 1,
        "downsample_padding": {"same": 0, "symmetric": 1}[c["downsample_padding"]],
        "downsample_type": "conv", "upsample_type": "conv", "dropout": c["dropout"], "act_fn": "silu",
        "attention_head_dim": c["attn_head_dim"],   # null: one head as wide as the block, as minidiff's default
        "norm_num_groups": c["num_groups"], "attn_norm_num_groups": None, "norm_eps": c["norm_eps"],
        "resnet_time_scale_shift": "default", "add_attention": True,
        "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
    }
    if model.num_classes is not None:
        config["num_class_embeds"] = model.num_classes + 1
        config[NO_LABEL_FIELD] = model.num_classes
    return config


def scheduler_config(diffusion, clip_sample=True):
    """The DDPMScheduler scheduler_config.json of a GaussianDiffusion: the inverse of scheduler_settings.

    The betas are named (beta_schedule, with rescale_betas_zero_snr where it applies) only if diffusers' recipe,
    as scheduler_settings recomputes it, gives exactly minidiff's betas; any other schedule is written out as
    trained_betas (every float64 beta, exactly, in JSON).
    """
    if diffusion.model_var_type not in EXPORT_VARIANCE_TYPES:
        raise PretrainedError(f"model_var_type {diffusion.model_var_type!r} cannot be exported: diffusers' "
                              f"DDPMScheduler reads a 'learned' output as sigma^2 where minidiff (and "
                              f"improved-diffusion) read log sigma^2; train with --var-type learned_range instead")
    betas = backend.to_numpy(diffusion.betas).astype(host.float64)
    base = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": int(len(betas)), "beta_start": 0.0001, "beta_end": 0.02,
            "beta_schedule": "linear", "trained_betas": None,
            "variance_type": EXPORT_VARIANCE_TYPES[diffusion.model_var_type],
            "clip_sample": bool(clip_sample), "clip_sample_range": 1.0,
            "prediction_type": MEAN_TYPE_NAMES[diffusion.model_mean_type], "thresholding": False,
            "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
            "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False}
    for schedule in EXPORT_SCHEDULES:
        for rescale in (False, True):
            named = {**base, "beta_schedule": schedule, "rescale_betas_zero_snr": rescale}
            try:
                recomputed = scheduler_settings(named)[0]
            except PretrainedError:   # e.g. zero terminal SNR for an epsilon model
                continue
            if recomputed.shape == betas.shape and (recomputed == betas).all():
                return named
    return {**base, "trained_betas": [float(b) for b in betas]}


def model_index():
    """model_index.json of a DDPMPipeline folder: which class each subfolder holds."""
    return {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}


def diffusers_state_dict(model):
    """{UNet2DModel parameter name: float32 host array} of a minidiff.UNet (diffusers_names, current names)."""
    num_levels = len(model.config["ch_mult"])
    return {diffusers_names(name, num_levels)[0]: host.ascontiguousarray(backend.to_numpy(value), dtype=host.float32)
            for name, value in model.state_dict().items()}


def save(model, diffusion, path, card=None, force=False, clip_sample=True, picture=None):
    """Write a diffusers DDPMPipeline folder: model_index.json, unet/ (config.json and
    diffusion_pytorch_model.safetensors), scheduler/scheduler_config.json, and README.md (`card`, a model
    card's text, see model_card) beside the sample grid `picture` (a PNG file, copied as samples.png).

    The folder appears whole or not at all: it is written under a temporary name beside `path` and renamed.
    An existing `path` is replaced only with force=True, and only if it is an earlier export (it holds
    model_index.json) or empty; nothing else is ever deleted. Returns the folder's path.
    """
    import shutil
    import tempfile
    from safetensors.numpy import save_file

    path = os.path.abspath(os.fspath(path))
    unet, scheduler = unet_config(model), scheduler_config(diffusion, clip_sample)   # refusals before any file
    if os.path.lexists(path):
        if not force:
            raise PretrainedError(f"{path} exists; pass --force (force=True) to replace it, or choose another --out")
        if not os.path.isdir(path) or os.path.islink(path) or \
                (os.listdir(path) and not os.path.isfile(os.path.join(path, "model_index.json"))):
            raise PretrainedError(f"{path} is not an earlier export (no model_index.json): not replacing it even "
                                  f"with --force; choose another --out")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent)
    try:
        for sub in ("unet", "scheduler"):
            os.mkdir(os.path.join(staging, sub))
        _write_json(os.path.join(staging, "model_index.json"), model_index())
        _write_json(os.path.join(staging, "unet", "config.json"), unet)
        save_file(diffusers_state_dict(model), os.path.join(staging, "unet", WEIGHTS), metadata={"format": "pt"})
        _write_json(os.path.join(staging, "scheduler", "scheduler_config.json"), scheduler)
        if picture is not None:
            shutil.copyfile(picture, os.path.join(staging, "samples.png"))
        if card is not None:
            with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
                f.write(card)
        os.chmod(staging, 0o755)   # mkdtemp makes it private; an export is meant to be shared
        if os.path.lexists(path):   # force: the old export moves aside, the new one in, then the old one goes
            old = staging[:-len(".partial")] + ".old"
            os.rename(path, old)
            os.rename(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def model_card(model, diffusion, details):
    """A Hugging Face Hub model card (README.md text) for an export.

    `details` may give: title, data, license (the Hub's id, e.g. "cc-by-4.0"), data_license (words),
    steps, preset, weights ("EMA" or "trained"), source, metrics ({name: number}: the run's last log row),
    evaluation ({name: number}: a 'minidiff eval' report), picture (True if samples.png is beside it).
    """
    d = dict(details)
    conditional = getattr(model, "num_classes", None) is not None
    tags = ["diffusers", "ddpm", "minidiff", "pytorch",
            "class-conditional-image-generation" if conditional else "unconditional-image-generation"]
    size, channels = model.config["image_size"], model.config["in_channels"]
    schedule = scheduler_config(diffusion)
    betas = (f"`trained_betas` ({schedule['num_train_timesteps']} values)" if schedule["trained_betas"] else
             f"`{schedule['beta_schedule']}`" + (" rescaled to zero terminal SNR"
                                                 if schedule["rescale_betas_zero_snr"] else ""))
    lines = ["---", "library_name: diffusers", f"license: {d.get('license') or 'other'}", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    lines += ["pipeline_tag: unconditional-image-generation", "---", "",
              f"# {d.get('title') or 'A DDPM trained with minidiff'}", "",
              f"A denoising diffusion probabilistic model (Ho et al. 2020) trained from scratch with "
              f"[minidiff](https://github.com/minidiff/minidiff) and exported to the diffusers format "
              f"(`minidiff export`).", ""]
    if d.get("picture"):
        lines += ["![samples drawn from this model](samples.png)", ""]
    rows = [("images", f"{channels} x {size} x {size} ({'grey' if channels == 1 else 'colour'})"),
            ("data", d.get("data")), ("data licence", d.get("data_license")), ("preset", d.get("preset")),
            ("training steps", d.get("steps")), ("weights", d.get("weights")), ("source", d.get("source")),
            ("parameters", f"{model.num_parameters():,}"),
            ("U-Net", f"ch {model.config['ch']}, ch_mult {tuple(model.config['ch_mult'])}, "
                      f"res blocks per level {model.config['num_res_blocks']}, attention at "
                      f"{tuple(model.config['attn_resolutions']) or 'none'}"),
            ("schedule", f"{betas}, T = {schedule['num_train_timesteps']}"),
            ("prediction / variance", f"`{schedule['prediction_type']}` / `{schedule['variance_type']}`")]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v not in (None, "")] + [""]
    for heading, values in (("Training log (last step)", d.get("metrics")),
                            ("Evaluation (`minidiff eval`)", d.get("evaluation"))):
        if values:
            lines += [f"## {heading}", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_card_number(v)} |" for k, v in values.items()] + [""]
    lines += ["## Use", "", "With diffusers:", "", "```python", "from diffusers import DDPMPipeline", "",
              'pipe = DDPMPipeline.from_pretrained("path/to/this/folder")']
    if conditional:
        k = model.num_classes
        lines += ["# class-conditional: DDPMPipeline passes no labels, so call the U-Net yourself:",
                  "# noise = pipe.unet(x_t, t, class_labels=y).sample", "```", "",
                  f"Class ids 0 .. {k - 1} are the data's labels; id {k} is \"no label\" (minidiff's `NO_LABEL`, "
                  f"trained with probability p_uncond), so classifier-free guidance (Ho & Salimans 2022, Eq. 6) is "
                  f"`(1 + w) * unet(x, t, class_labels=y) - w * unet(x, t, class_labels={k})`.", ""]
    else:
        lines += ["images = pipe(batch_size=16, num_inference_steps=1000).images", "```", ""]
    lines += ["With minidiff:", "", "```", "minidiff sample --pretrained path/to/this/folder --num 64 --out samples.png",
              "```", ""]
    return "\n".join(lines)


def _card_number(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
