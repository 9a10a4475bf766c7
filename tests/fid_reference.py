"""The reference FID stack (pytorch-fid 0.3.0, torch-fidelity), run in its own process.

pytorch-fid builds its Inception from torchvision's Python model code, and torch-fidelity
imports torchvision everywhere. The torchvision wheel on the package index beside the CPU
torch is a CUDA build whose compiled ops fail to load, and once installed it breaks
diffusers' imports. So CI installs torchvision's files with `pip install --no-deps --target`
into a folder off sys.path (TORCHVISION_MODELS below), and this script alone makes them
importable, as a namespace that skips torchvision/__init__.py (the part that loads the
compiled ops). It runs as a subprocess of the tests, so the shim never reaches the pytest
process where diffusers lives.

    python tests/fid_reference.py inception SEED WEIGHTS_DIR INPUTS.npz OUT.npz
        builds pytorch-fid's own InceptionV3 (its FID blocks) with random perturbed weights
        from SEED, saves them with torch.save in both file formats (WEIGHTS_DIR/zip.pth and
        WEIGHTS_DIR/legacy.pth), and writes pool3 features and logits of every array in
        INPUTS.npz (N, 3, H, W) in [0, 1] through pytorch-fid's own resize and scaling.
    python tests/fid_reference.py metrics INPUTS.npz OUT.npz
        pytorch-fid's calculate_frechet_distance on (mu1, sigma1, mu2, sigma2) and
        torch-fidelity's KID and IS on (f1, f2) and (logits).
"""
import contextlib
import importlib.machinery
import io
import os
import sys
import types

import numpy as np

TORCHVISION_MODELS = os.environ.get("MINIDIFF_TORCHVISION_MODELS",
                                    os.path.join(sys.prefix, "torchvision-models"))
INSTALL_HINT = ("pip install --no-deps scipy pytorch-fid==0.3.0 torch-fidelity==0.4.0 && "
                "pip install --no-deps --target \"$VIRTUAL_ENV/torchvision-models\" torchvision==0.29.1")


def missing():
    """Why the reference stack cannot run here (None when it can)."""
    try:
        import importlib.util
        for name in ("torch", "scipy", "pytorch_fid", "torch_fidelity"):
            if importlib.util.find_spec(name) is None:
                return f"{name} is not installed"
    except ValueError as e:  # pragma: no cover - a broken install
        return str(e)
    if not os.path.isdir(os.path.join(TORCHVISION_MODELS, "torchvision", "models")):
        return f"torchvision's Python model files are not in {TORCHVISION_MODELS}"
    return None


def _shim_torchvision():
    """Make `import torchvision.models.inception` work without running torchvision/__init__.py."""
    root = os.path.join(TORCHVISION_MODELS, "torchvision")
    spec = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    spec.submodule_search_locations = [root]
    tv = types.ModuleType("torchvision")
    tv.__spec__, tv.__path__, tv.__version__ = spec, [root], "0.29.1"
    sys.modules["torchvision"] = tv
    import torchvision.models.inception  # noqa: F401  (models/__init__ and its imports, no ops)
    tv.models = sys.modules["torchvision.models"]
    return tv


def random_state_dict(model, seed):
    """Random weights that keep activations O(1) through all 94 layers: He-scaled convolutions,
    batch norm statistics and affine terms perturbed away from the identity."""
    import torch
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in model.state_dict().items():
        shape = tuple(value.shape)
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            arr = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif key.endswith("bn.weight"):
            arr = rng.uniform(0.6, 1.4, shape)
        elif key.endswith("bn.bias"):
            arr = rng.normal(0.0, 0.2, shape)
        elif key.endswith("running_mean"):
            arr = rng.normal(0.0, 0.3, shape)
        elif key.endswith("running_var"):
            arr = rng.uniform(0.5, 2.0, shape)
        elif key == "fc.weight":
            arr = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
        elif key == "fc.bias":
            arr = rng.normal(0.0, 0.5, shape)
        else:
            raise KeyError(f"unexpected key {key}")
        state[key] = torch.from_numpy(arr.astype(np.float32))
    return state


def run_inception(seed, weights_dir, inputs_path, out_path):
    import torch
    torch.set_num_threads(2)
    tv = _shim_torchvision()
    import pytorch_fid.inception as pfi
    # fid_inception_v3 downloads the weights and loads them strictly into the net it built;
    # here the "download" returns nothing and the load puts random weights, drawn for that
    # very net's keys, through the same strict load_state_dict.
    made = {}
    inception3 = tv.models.inception.Inception3

    def load_random(self, state_dict, strict=True, assign=False):
        made["state"] = random_state_dict(self, seed)
        return torch.nn.Module.load_state_dict(self, made["state"], strict=True)

    pfi.load_state_dict_from_url = lambda url, progress=True: None
    inception3.load_state_dict = load_random
    with contextlib.redirect_stdout(io.StringIO()):
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                normalize_input=True, use_fid_inception=True).eval()
    state = made["state"]
    os.makedirs(weights_dir, exist_ok=True)
    torch.save(state, os.path.join(weights_dir, "zip.pth"))
    torch.save(state, os.path.join(weights_dir, "legacy.pth"), _use_new_zipfile_serialization=False)
    weight, bias = state["fc.weight"].double(), state["fc.bias"].double()
    out = {}
    with torch.no_grad():
        for name, arr in np.load(inputs_path).items():
            pool3 = model(torch.from_numpy(arr))[0].reshape(len(arr), -1)
            out[name + "/features"] = pool3.numpy()
            out[name + "/logits"] = (pool3.double() @ weight.T + bias).numpy()
            out[name + "/logits_unbiased"] = (pool3.double() @ weight.T).numpy()
    np.savez(out_path, **out)


def pytorch_fid_model(weights_path):
    """pytorch-fid's InceptionV3 (pool3 block), its weights read by torch.load from weights_path."""
    import torch
    _shim_torchvision()
    import pytorch_fid.inception as pfi
    pfi.load_state_dict_from_url = lambda url, progress=True: torch.load(weights_path, weights_only=True)
    with contextlib.redirect_stdout(io.StringIO()):
        return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                               normalize_input=True, use_fid_inception=True).eval()


def run_metrics(inputs_path, out_path):
    _shim_torchvision()
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    import torch
    data = dict(np.load(inputs_path))
    out = {}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for key in sorted(k[:-4] for k in data if k.endswith("/mu1")):
            out[key + "/fid"] = np.float64(calculate_frechet_distance(
                data[key + "/mu1"], data[key + "/sigma1"], data[key + "/mu2"], data[key + "/sigma2"]))
        for key in sorted(k[:-3] for k in data if k.endswith("/f1")):
            size = int(data[key + "/subset_size"])
            kid = kid_features_to_metric(torch.from_numpy(data[key + "/f1"]), torch.from_numpy(data[key + "/f2"]),
                                         kid_subsets=int(data[key + "/num_subsets"]), kid_subset_size=size,
                                         kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                         kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False)
            out[key + "/kid_mean"] = np.float64(kid["kernel_inception_distance_mean"])
            out[key + "/kid_std"] = np.float64(kid["kernel_inception_distance_std"])
        for key in sorted(k[:-7] for k in data if k.endswith("/logits")):
            isc = isc_features_to_metric(torch.from_numpy(data[key + "/logits"]), int(data[key + "/splits"]))
            out[key + "/is_mean"] = np.float64(isc["inception_score_mean"])
            out[key + "/is_std"] = np.float64(isc["inception_score_std"])
    np.savez(out_path, **out)


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "inception":
        run_inception(int(args[0]), args[1], args[2], args[3])
    elif command == "metrics":
        run_metrics(args[0], args[1])
    else:
        sys.exit(f"unknown command {command}")
