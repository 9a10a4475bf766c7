"""Optional cross-check: minidiff's U-Net against the same architecture in PyTorch.

benchmarks/torch_unet.py rebuilds minidiff.UNet in PyTorch with the same parameter
names; with the same weights, the forward output and every parameter gradient of the
DDPM loss must agree to float32 rounding. torch comes with the optional `compat` extra,
never as a dependency of minidiff (DESIGN.md, section 8.4): without it these tests skip,
except in CI (CI=true), which installs the extra and counts a skip as a failure (conftest).
"""
import os
import sys

import numpy as np
import pytest

from conftest import compat_import

torch = compat_import("torch")

import minidiff  # noqa: E402
from minidiff import backend  # noqa: E402
from minidiff.tensor import Tensor  # noqa: E402
from minidiff.unet import UNet  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from torch_unet import TorchUNet, load_minidiff_state, minidiff_grads_as_torch, randomize_  # noqa: E402

CONFIGS = [
    dict(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)),  # "tiny"
    dict(image_size=8, in_channels=3, ch=16, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8, 2),
         out_channels=2, num_groups=4),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["tiny", "three-levels"])
def test_unet_output_and_gradients_match_torch(config, backend_name):
    minidiff.manual_seed(0)
    model = randomize_(UNet(**config))  # the DDPM init zeroes conv_out: random weights make the check bite
    groups = model.config["num_groups"]
    tmodel = TorchUNet(**{k: v for k, v in config.items() if k != "num_groups"}, num_groups=groups)
    load_minidiff_state(tmodel, model)

    rng = np.random.default_rng(1)
    n, c, s = 3, config["in_channels"], config["image_size"]
    x = rng.standard_normal((n, c, s, s)).astype(np.float32)
    t = np.array([0, 499, 999], dtype=np.int64)
    target = rng.standard_normal((n, model.config["out_channels"], s, s)).astype(np.float32)

    out = model(Tensor(backend.to_active(x)), backend.to_active(t))
    ((out - Tensor(backend.to_active(target))) ** 2).mean().backward()
    tout = tmodel(torch.from_numpy(x), torch.from_numpy(t))
    ((tout - torch.from_numpy(target)) ** 2).mean().backward()

    expected = tout.detach().numpy()
    assert np.abs(expected).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(backend.to_numpy(out.data), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    grads = minidiff_grads_as_torch(tmodel, model)
    # Each parameter's gradient to 1e-4 of its own scale, floored at 1e-3 of the largest gradient:
    # attention's k bias has an exactly-zero gradient (softmax ignores a per-row shift), so it holds only rounding.
    floor = 1e-3 * max(float(p.grad.abs().max()) for p in tmodel.parameters())
    for name, p in tmodel.named_parameters():
        scale = max(float(p.grad.abs().max()), floor)
        err = float((grads[name] - p.grad).abs().max())
        assert err <= 1e-4 * scale, f"{name}: max |minidiff - torch| = {err:.3g}, gradient scale {scale:.3g}"


@pytest.mark.parametrize("name", ["tiny", "small", "cifar"])
def test_benchmark_flop_count_matches_torch_flop_counter(name):
    """benchmarks/bench_speed.py counts conv/matmul FLOPs by hand; torch's FlopCounterMode agrees exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    import bench_speed
    cfg = bench_speed.CONFIGS[name]
    tmodel = TorchUNet(**bench_speed.model_kwargs(cfg), num_groups=bench_speed.minidiff_groups(cfg))
    s = cfg["image_size"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tmodel(torch.zeros(cfg["batch"], cfg["in_channels"], s, s), torch.zeros(cfg["batch"], dtype=torch.int64))
    assert counter.get_total_flops() == bench_speed.unet_flops(cfg)["total"]
