"""minidiff.inception held to pytorch-fid 0.3.0's own InceptionV3 (random perturbed weights in
both of torch's file formats), and the model's input handling and refusals."""
import subprocess
import sys

import numpy as np
import pytest
from conftest import compat_import, fid_reference_stack

from minidiff import functional as F, inception, torchfile
from minidiff.tensor import Tensor

CASES = {"s32_b1": (1, 32), "s32_b7": (7, 32), "s299_b1": (1, 299), "s299_b7": (7, 299), "s45x20_b2": (2, (45, 20))}


def _images(n, size, seed):
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).random((n, 3, h, w), dtype=np.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """pytorch-fid's features and logits of CASES, and the weights it used, saved by torch."""
    script = fid_reference_stack()
    root = tmp_path_factory.mktemp("fid")
    inputs = {name: _images(n, size, seed) for seed, (name, (n, size)) in enumerate(CASES.items())}
    np.savez(root / "inputs.npz", **inputs)
    subprocess.run([sys.executable, script, "inception", "7", str(root / "weights"), str(root / "inputs.npz"),
                    str(root / "out.npz")], check=True, timeout=600)
    return root, inputs, dict(np.load(root / "out.npz"))


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=["zip.pth", "legacy.pth"])
def model(request, reference):
    return inception.load(reference[0] / "weights" / request.param)


@pytest.mark.parametrize("case", list(CASES))
def test_features_and_logits_equal_pytorch_fid(model, reference, case):
    _, inputs, out = reference
    features = model.features(inputs[case], batch_size=4)
    assert features.shape == (len(inputs[case]), 2048) and features.dtype == np.float32
    assert _rel(features, out[case + "/features"]) < 1e-4
    assert np.abs(out[case + "/features"]).mean() > 0.05          # the random weights keep activations alive
    assert _rel(model.logits_of(features), out[case + "/logits"]) < 1e-4
    assert _rel(model.logits(inputs[case], bias=False), out[case + "/logits_unbiased"]) < 1e-4


def test_batching_grey_and_uint8_inputs_give_the_same_features(model, reference):
    x = reference[1]["s32_b7"]
    whole = model.features(x, batch_size=7)
    np.testing.assert_allclose(model.features(x, batch_size=2, progress=True), whole, rtol=1e-5, atol=1e-6)
    grey = x[:, :1]
    np.testing.assert_allclose(model.features(grey), model.features(np.repeat(grey, 3, axis=1)), rtol=1e-6, atol=1e-7)
    u8 = (x * 255).round().astype(np.uint8)
    np.testing.assert_allclose(model.features(u8), model.features(u8.astype(np.float32) / 255), rtol=1e-6, atol=1e-7)


def test_bad_images_are_one_clear_error(model):
    with pytest.raises(ValueError, match=r"in \[0, 1\].*\(x \+ 1\) / 2"):
        model.features(np.full((2, 3, 8, 8), -1.0, np.float32))
    with pytest.raises(ValueError, match="shape"):
        model.features(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="shape"):
        model.features(np.zeros((2, 4, 8, 8), np.float32))


def _state(path):
    return torchfile.load_state_dict(path)


def test_other_weights_are_refused_with_the_key_that_differs(reference, tmp_path):
    torch = compat_import("torch")
    state = {k: torch.from_numpy(v) for k, v in _state(reference[0] / "weights" / "zip.pth").items()}
    cases = {
        "imagenet": ({**state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, "ImageNet"),
        "missing": ({k: v for k, v in state.items() if k != "Mixed_6b.branch7x7_2.bn.running_var"},
                    "Mixed_6b.branch7x7_2.bn.running_var is missing"),
        "extra": ({**state, "AuxLogits.fc.weight": torch.zeros(3)}, "unexpected tensor AuxLogits.fc.weight"),
        "shape": ({**state, "Mixed_7c.branch3x3_2a.conv.weight": torch.zeros(384, 384, 3, 1)}, r"\(384, 384, 1, 3\) expected"),
    }
    for name, (sd, message) in cases.items():
        torch.save(sd, tmp_path / f"{name}.pth")
        with pytest.raises(ValueError, match=message):
            inception.load(tmp_path / f"{name}.pth")
    with pytest.raises(FileNotFoundError):
        inception.load(tmp_path / "absent.pth")


def test_fold_batch_norm_equals_convolution_then_batch_norm():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(2, 3, 6, 5)), rng.normal(size=(4, 3, 3, 1))
    gamma, beta, mean, var = rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4)
    conv = F.conv2d(Tensor(x), Tensor(w), padding=(1, 0)).data
    bn = (conv - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3) * gamma[:, None, None] + beta[:, None, None]
    wf, bf = inception.fold_batch_norm(w, gamma, beta, mean, var)
    np.testing.assert_allclose(F.conv2d(Tensor(x), Tensor(wf), Tensor(bf), padding=(1, 0)).data, bn, rtol=1e-10, atol=1e-12)


def test_preprocess_is_pytorch_fids_transform():
    x = np.random.default_rng(1).random((2, 1, 28, 28), dtype=np.float32)
    out = inception.preprocess(Tensor(x)).data
    assert out.shape == (2, 3, 299, 299)
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6
    # the corners read the corner pixels exactly (clamped source index), rescaled to [-1, 1]
    np.testing.assert_allclose(out[:, :, 0, 0], np.repeat(2 * x[:, :, 0, 0] - 1, 3, axis=1), rtol=1e-6)
