"""The paper's U-Net (Ho et al. 2020, Appendix B): shapes, parameter count, init, gradients, overfitting."""
import math
import time

import numpy as np
import pytest

import minidiff
from minidiff import backend
from minidiff.optim import Adam
from minidiff.tensor import Tensor
from minidiff.unet import UNet, default_num_groups


def images(n, c, s, seed=0, dtype=np.float32):
    return backend.to_active(np.random.default_rng(seed).standard_normal((n, c, s, s)).astype(dtype))


@pytest.mark.parametrize("args, kwargs", [
    ((8, 3, 32, (1, 2), 1, (4,)), {}),
    ((16, 3, 16, (1, 2, 2), 1, (8,)), {}),
    ((16, 1, 8, (1, 2, 2), 2, ()), dict(out_channels=2, dropout=0.1)),
    ((12, 2, 12, (1, 1), 1, (12, 6)), dict(num_groups=3)),
])
def test_output_shapes(args, kwargs, backend_name):
    minidiff.manual_seed(0)
    model = UNet(*args, **kwargs)
    size, in_ch = args[0], args[1]
    out = model(Tensor(images(2, in_ch, size)), backend.to_active(np.array([0, 999])))
    assert out.shape == (2, kwargs.get("out_channels", in_ch), size, size) and out.dtype == np.float32


def test_cifar10_model_has_35746307_parameters_and_builds_quickly():
    start = time.perf_counter()
    model = UNet(32, 3, 128, (1, 2, 2, 2), 2, (16,), 0.1)
    assert model.num_parameters() == 35_746_307  # the paper's 35.7M
    assert time.perf_counter() - start < 10
    names = dict(model.named_parameters())
    assert names["mid.attn_1.q.weight"].shape == (256, 256)
    assert names["down.0.downsample.conv.weight"].shape == (128, 128, 3, 3)
    assert names["up.3.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)  # 256 + 256 skip -> 256
    assert names["up.0.block.2.norm1.weight"].shape == (256,)  # 128 + 128 from conv_in
    assert names["temb.dense1.weight"].shape == (512, 512)
    assert {m.num_groups for m in model.modules() if type(m).__name__ == "GroupNorm"} == {32}
    assert sum(k.endswith("q.weight") for k in names) == 1 + 2 + 3  # mid, 16x16 down and up
    rebuilt = UNet(**model.config)
    assert list(rebuilt.state_dict()) == list(names) and rebuilt.num_parameters() == 35_746_307


def test_group_count_rule():
    assert [default_num_groups(c) for c in (128, 256, 160, 96, 64, 32, 16, 12, 8, 4)] == \
        [32, 32, 32, 24, 16, 8, 4, 3, 2, 1]
    groups = {m.num_groups for m in UNet(8, 1, 32, (1, 2), 1, ()).modules() if hasattr(m, "num_groups")}
    assert groups == {8}


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=30), "not divisible by 2\\^3"),
    (dict(attn_resolutions=(16, 5)), "\\[5\\] never occur"),
    (dict(ch=16, num_groups=3), "num_groups=3 does not divide ch=16"),
    (dict(ch=0), "ch=0"),
    (dict(num_res_blocks=-1), "num_res_blocks=-1"),
    (dict(ch_mult=()), "ch_mult"),
    (dict(ch_mult=(1, 0)), "ch_mult"),
    (dict(dropout=1.0), "dropout"),
    (dict(image_size=0), "image_size=0"),
])
def test_impossible_configurations_raise(kwargs, message):
    config = dict(image_size=32, in_channels=3, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1,
                  attn_resolutions=(16,))
    with pytest.raises(ValueError, match=message):
        UNet(**{**config, **kwargs})


def test_last_layers_start_near_zero():
    """conv2 of every res block, every proj_out and conv_out use init scale 1e-10 (original code's scale 0)."""
    minidiff.manual_seed(0)
    model = UNet(16, 3, 32, (1, 2), 1, (8,))
    zeroed = [n for n in dict(model.named_parameters()) if n.endswith(("conv2.weight", "proj_out.weight"))]
    assert len(zeroed) == (2 + 2 + 4) + (1 + 1 + 2)  # res blocks down, mid, up; attention down, mid, up
    for name, p in model.named_parameters():
        biggest = float(np.abs(backend.to_numpy(p.data)).max())
        if name in zeroed or name == "conv_out.weight":
            assert 0 < biggest < 1e-4, name
        elif name.endswith("weight") and "norm" not in name:
            assert biggest > 1e-2, name
    out = model(Tensor(images(2, 3, 16)), np.array([3, 500]))
    assert float(np.abs(backend.to_numpy(out.data)).max()) < 1e-3  # eps_theta starts at about zero


def test_directional_gradient_check_in_float64():
    """Autograd against a central difference along one random direction (Chainer's check_backward).

    The near-zero layers are re-drawn at unit scale so that every path carries gradient.
    """
    minidiff.manual_seed(0)
    model = UNet(8, 2, 8, (1, 2), 1, (4,), num_groups=2)
    rng = np.random.default_rng(1)
    for p in model.parameters():
        p.data = backend.to_active(backend.to_numpy(p.data).astype(np.float64)
                                   + 0.2 * rng.standard_normal(p.shape))
    params = dict(model.named_parameters())
    checked = ["conv_in.weight", "temb.dense0.weight", "down.0.block.0.norm1.weight",
               "down.1.block.0.nin_shortcut.weight", "down.1.attn.0.k.weight", "mid.attn_1.proj_out.bias",
               "up.1.block.1.conv2.weight", "up.1.upsample.conv.weight", "conv_out.weight"]
    x0 = images(2, 2, 8, seed=2, dtype=np.float64)
    t = np.array([1, 700])
    w = backend.to_active(rng.standard_normal((2, 2, 8, 8)))

    def loss(x):
        return (model(x, t) * Tensor(w)).sum()

    x = Tensor(x0, requires_grad=True)
    loss(x).backward()
    directions = {name: backend.to_active(rng.standard_normal(params[name].shape)) for name in checked}
    dx = backend.to_active(rng.standard_normal(x0.shape))
    analytic = float((x.grad * dx).sum()) + sum(float((params[n].grad * d).sum()) for n, d in directions.items())

    def moved(step):
        saved = {n: params[n].data for n in checked}
        for n, d in directions.items():
            params[n].data = saved[n] + step * d
        value = float(backend.to_numpy(loss(Tensor(x0 + step * dx)).data))
        for n in checked:
            params[n].data = saved[n]
        return value

    eps = 1e-5
    numeric = (moved(eps) - moved(-eps)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-6)
    for n in checked:  # each checked parameter does get a gradient
        assert float(np.abs(backend.to_numpy(params[n].grad)).max()) > 0, n


def test_tiny_unet_overfits_one_batch_of_the_ddpm_loss():
    """Algorithm 1 on one fixed batch: || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2 falls 10x."""
    minidiff.manual_seed(0)
    model = UNet(8, 1, 16, (1, 2), 1, (4,))
    rng = np.random.default_rng(0)
    x_start = np.where(rng.random((8, 1, 8, 8)) > 0.5, 1.0, -1.0)  # binary "images" in [-1, 1]
    t = rng.integers(0, 1000, 8)
    alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # Ho et al. Sec. 4 linear schedule, Eq. 4
    noise = rng.standard_normal(x_start.shape)
    a = np.sqrt(alphas_cumprod[t])[:, None, None, None]
    x_t = a * x_start + np.sqrt(1 - a ** 2) * noise  # q_sample
    x_t, noise = Tensor(backend.to_active(x_t.astype(np.float32))), Tensor(backend.to_active(noise.astype(np.float32)))
    opt = Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):  # 10x is reached near step 17
        opt.zero_grad()
        d = model(x_t, t) - noise
        loss = (d * d).mean()
        loss.backward()
        opt.step()
        losses.append(float(backend.to_numpy(loss.data)))
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-5:]) < losses[0] / 10, losses


# ---------------------------------------------------------------- the blocks against plain numpy


def np_conv(x, w, b, stride=1, pads=(1, 1, 1, 1)):
    """Direct cross-correlation; pads = (top, bottom, left, right)."""
    x = np.pad(x, ((0, 0), (0, 0), pads[:2], pads[2:]))
    k = w.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]


def np_group_norm(x, g, weight, bias, eps=1e-6):
    n, c, h, w = x.shape
    v = x.reshape(n, g, -1)
    v = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + eps)
    return v.reshape(n, c, h, w) * weight[None, :, None, None] + bias[None, :, None, None]


def np_silu(x):
    return x / (1 + np.exp(-x))


def randomized(module, seed=0):
    """Give every parameter random values (float64) so that near-zero layers and norms matter."""
    rng = np.random.default_rng(seed)
    for p in module.parameters():
        p.data = backend.to_active(0.5 * rng.standard_normal(p.shape))
    return {n: backend.to_numpy(p.data) for n, p in module.named_parameters()}


def test_resnet_and_attention_blocks_match_numpy_references():
    from minidiff.unet import AttnBlock, ResnetBlock
    minidiff.manual_seed(0)
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 6))
    temb = np.random.default_rng(2).standard_normal((2, 8))

    block = ResnetBlock(4, 6, 8, dropout=0.0, num_groups=2)
    w = randomized(block)
    h = np_conv(np_silu(np_group_norm(x, 2, w["norm1.weight"], w["norm1.bias"])), w["conv1.weight"], w["conv1.bias"])
    h = h + (temb @ w["temb_proj.weight"].T + w["temb_proj.bias"])[:, :, None, None]
    h = np_conv(np_silu(np_group_norm(h, 2, w["norm2.weight"], w["norm2.bias"])), w["conv2.weight"], w["conv2.bias"])
    want = np_conv(x, w["nin_shortcut.weight"], w["nin_shortcut.bias"], pads=(0, 0, 0, 0)) + h
    got = block(Tensor(backend.to_active(x)), Tensor(backend.to_active(temb)))
    np.testing.assert_allclose(backend.to_numpy(got.data), want, rtol=1e-10, atol=1e-10)

    attn = AttnBlock(4, num_groups=2)
    w = randomized(attn)
    h = np_group_norm(x, 2, w["norm.weight"], w["norm.bias"]).reshape(2, 4, 36).transpose(0, 2, 1)  # (N, HW, C)
    q, k, v = (h @ w[f"{n}.weight"].T + w[f"{n}.bias"] for n in "qkv")
    s = q @ k.transpose(0, 2, 1) / 2.0  # / sqrt(C)
    p = np.exp(s - s.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ v @ w["proj_out.weight"].T + w["proj_out.bias"]
    want = x + out.transpose(0, 2, 1).reshape(x.shape)
    got = attn(Tensor(backend.to_active(x)))
    np.testing.assert_allclose(backend.to_numpy(got.data), want, rtol=1e-10, atol=1e-10)


def test_downsample_pads_like_tensorflow_same_and_upsample_is_nearest_then_conv():
    from minidiff.unet import Downsample, Upsample
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    down = Downsample(3)
    w = randomized(down)
    got = backend.to_numpy(down(Tensor(backend.to_active(x))).data)
    # TF "SAME" with stride 2 on an even size pads 0 before and 1 after (not PyTorch's symmetric 1)
    np.testing.assert_allclose(got, np_conv(x, w["conv.weight"], w["conv.bias"], 2, (0, 1, 0, 1)), rtol=1e-10)
    assert got.shape == (2, 3, 4, 4)
    up = Upsample(3)
    w = randomized(up)
    wide = x.repeat(2, axis=2).repeat(2, axis=3)
    got = backend.to_numpy(up(Tensor(backend.to_active(x))).data)
    np.testing.assert_allclose(got, np_conv(wide, w["conv.weight"], w["conv.bias"]), rtol=1e-10, atol=1e-12)


def test_forward_wiring_follows_the_original_model_function():
    """UNet.forward against diffusion_tf/models/unet.py's model() transcribed literally with the same blocks."""
    from minidiff import functional as F
    from minidiff.ops import concatenate
    minidiff.manual_seed(0)
    model = UNet(8, 2, 8, (1, 2), 2, (4,), num_groups=2)
    randomized(model)
    x, t = Tensor(images(2, 2, 8, seed=3, dtype=np.float64)), np.array([4, 321])

    temb = F.timestep_embedding(t, 8)
    temb = model.temb.dense1(F.silu(model.temb.dense0(temb)))
    hs = [model.conv_in(x)]
    for i_level in range(2):
        for i_block in range(2):
            h = model.down[i_level].block[i_block](hs[-1], F.silu(temb))
            if h.shape[2] in (4,):
                h = model.down[i_level].attn[i_block](h)
            hs.append(h)
        if i_level != 1:
            hs.append(model.down[i_level].downsample(hs[-1]))
    h = hs[-1]
    h = model.mid.block_1(h, F.silu(temb))
    h = model.mid.attn_1(h)
    h = model.mid.block_2(h, F.silu(temb))
    for i_level in reversed(range(2)):
        for i_block in range(3):
            h = model.up[i_level].block[i_block](concatenate([h, hs.pop()], axis=1), F.silu(temb))
            if h.shape[2] in (4,):
                h = model.up[i_level].attn[i_block](h)
        if i_level != 0:
            h = model.up[i_level].upsample(h)
    assert not hs
    want = model.conv_out(F.silu(model.norm_out(h)))
    np.testing.assert_array_equal(backend.to_numpy(model(x, t).data), backend.to_numpy(want.data))


def test_multi_head_attention_and_options_match_numpy_references():
    """attn_head_dim splits channels into heads (each its own softmax); norm_eps and symmetric padding
    reach the layers."""
    from minidiff.unet import AttnBlock, Downsample
    minidiff.manual_seed(0)
    x = np.random.default_rng(1).standard_normal((2, 8, 3, 3))
    attn = AttnBlock(8, num_groups=2, eps=1e-5, head_dim=2)  # 4 heads of 2 channels
    w = randomized(attn)
    assert attn.norm.eps == 1e-5 and attn.heads == 4
    h = np_group_norm(x, 2, w["norm.weight"], w["norm.bias"], eps=1e-5).reshape(2, 8, 9).transpose(0, 2, 1)
    q, k, v = (h @ w[f"{n}.weight"].T + w[f"{n}.bias"] for n in "qkv")
    heads = []
    for i in range(4):  # head i attends with its own channels 2i, 2i + 1
        c = slice(2 * i, 2 * i + 2)
        s = q[..., c] @ k[..., c].transpose(0, 2, 1) / np.sqrt(2.0)
        p = np.exp(s - s.max(-1, keepdims=True))
        heads.append((p / p.sum(-1, keepdims=True)) @ v[..., c])
    out = np.concatenate(heads, axis=-1) @ w["proj_out.weight"].T + w["proj_out.bias"]
    want = x + out.transpose(0, 2, 1).reshape(x.shape)
    got = attn(Tensor(backend.to_active(x)))
    np.testing.assert_allclose(backend.to_numpy(got.data), want, rtol=1e-10, atol=1e-10)

    down = Downsample(8, padding="symmetric")
    w = randomized(down)
    x = np.random.default_rng(2).standard_normal((2, 8, 6, 6))
    got = backend.to_numpy(down(Tensor(backend.to_active(x))).data)
    np.testing.assert_allclose(got, np_conv(x, w["conv.weight"], w["conv.bias"], 2, (1, 1, 1, 1)), rtol=1e-10)


def test_options_appear_in_config_only_when_changed_and_rebuild():
    plain = UNet(8, 1, 16, (1, 2), 1, (4,))
    assert set(plain.config) == {"image_size", "in_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                                 "dropout", "out_channels", "num_groups"}
    model = UNet(8, 1, 16, (1, 2), 1, (4,), norm_eps=1e-5, downsample_padding="symmetric", flip_sin_to_cos=True,
                 freq_shift=0, attn_head_dim=8)
    assert {k: model.config[k] for k in UNet.OPTION_DEFAULTS} == dict(
        norm_eps=1e-5, downsample_padding="symmetric", flip_sin_to_cos=True, freq_shift=0, attn_head_dim=8)
    rebuilt = UNet(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    x, t = Tensor(images(2, 1, 8)), backend.to_active(np.array([3, 700]))
    np.testing.assert_array_equal(backend.to_numpy(rebuilt(x, t).data), backend.to_numpy(model(x, t).data))
    assert {m.eps for m in model.modules() if type(m).__name__ == "GroupNorm"} == {1e-5}
    assert model.mid.attn_1.heads == 4 and model.down[0].downsample.conv.padding == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm_eps=0), "norm_eps"),
    (dict(downsample_padding=1), "downsample_padding"),
    (dict(attn_head_dim=12), "attn_head_dim=12"),
    (dict(freq_shift=8), "freq_shift"),
    (dict(flip_sin_to_cos="yes"), "flip_sin_to_cos"),
])
def test_impossible_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(8, 1, 16, (1, 2), 1, (4,), **kwargs)


# ---------------------------------------------------------------- class-conditional U-Net (classifier-free guidance)


def test_conditional_unet_adds_only_the_label_embedding_and_keeps_the_unconditional_weights():
    minidiff.manual_seed(3)
    plain = UNet(8, 1, 8, (1, 2), 1, (4,))
    minidiff.manual_seed(3)
    cond = UNet(8, 1, 8, (1, 2), 1, (4,), num_classes=10)
    plain_params, cond_params = dict(plain.named_parameters()), dict(cond.named_parameters())
    assert set(cond_params) - set(plain_params) == {"label_emb.weight"}
    assert cond_params["label_emb.weight"].shape == (11, 32)   # K + 1 rows ("no label" last), 4 ch wide
    for name, p in plain_params.items():   # created last, so the other weights are the same draws
        np.testing.assert_array_equal(backend.to_numpy(p.data), backend.to_numpy(cond_params[name].data))
    assert "num_classes" not in plain.config and cond.config["num_classes"] == 10
    rebuilt = UNet(**cond.config)
    rebuilt.load_state_dict(cond.state_dict())
    x, t, y = Tensor(images(3, 1, 8)), np.array([5, 500, 999]), np.array([7, 0, 9])
    np.testing.assert_array_equal(backend.to_numpy(rebuilt(x, t, y).data), backend.to_numpy(cond(x, t, y).data))


def test_labels_change_the_output_and_none_means_the_no_label_row():
    minidiff.manual_seed(0)
    model = UNet(8, 1, 8, (1, 2), 1, (4,), num_classes=3)
    for p in model.parameters():   # unit-scale weights, so that the label reaches the output visibly
        p.data = p.data + backend.to_active(np.random.default_rng(1).standard_normal(p.shape).astype(np.float32) * 0.1)
    x, t = Tensor(images(3, 1, 8)), np.array([10, 10, 10])
    out = lambda y: backend.to_numpy(model(x, t, y).data)  # noqa: E731
    none, no_label = out(None), out(np.array([-1, -1, -1]))
    np.testing.assert_array_equal(none, no_label)
    by_label = out(np.array([0, 1, 2]))
    assert all(np.abs(by_label[i] - none[i]).max() > 1e-4 for i in range(3))
    # each image's output depends on its own label only
    mixed = out(np.array([0, -1, 2]))
    np.testing.assert_allclose(mixed[[0, 2]], by_label[[0, 2]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mixed[1], none[1], rtol=1e-6, atol=1e-6)
    # the embedding row is the input: with row K replaced by row 1, "no label" behaves as label 1
    w = model.label_emb.weight
    w.data[3] = w.data[1]
    np.testing.assert_allclose(out(None)[1], by_label[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, y, message", [
    (dict(), np.array([1, 2]), "unconditional"),
    (dict(num_classes=3), np.array([1, 3]), "0 .. 2"),
    (dict(num_classes=3), np.array([-2, 0]), "0 .. 2"),
    (dict(num_classes=3), np.array([1, 2, 0]), "shape"),
    (dict(num_classes=3), np.array([1.0, 2.0]), "integers"),
])
def test_bad_labels_raise(kwargs, y, message):
    model = UNet(8, 1, 8, (1, 2), 1, (4,), **kwargs)
    with pytest.raises(ValueError, match=message):
        model(Tensor(images(2, 1, 8)), np.array([1, 2]), y)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_impossible_num_classes_raise(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        UNet(8, 1, 8, (1, 2), 1, (4,), num_classes=num_classes)


def test_gradient_check_through_the_label_embedding_in_float64():
    """Finite differences along a random direction of the embedding table and the layers it feeds;
    the rows of labels absent from the batch get exactly zero gradient."""
    minidiff.manual_seed(0)
    model = UNet(8, 1, 8, (1, 2), 1, (4,), num_groups=2, num_classes=4)
    rng = np.random.default_rng(1)
    for p in model.parameters():
        p.data = backend.to_active(backend.to_numpy(p.data).astype(np.float64) + 0.2 * rng.standard_normal(p.shape))
    params = dict(model.named_parameters())
    checked = ["label_emb.weight", "temb.dense1.weight", "down.0.block.0.temb_proj.weight"]
    x = Tensor(images(3, 1, 8, seed=2, dtype=np.float64))
    t, y = np.array([1, 400, 900]), np.array([2, -1, 2])   # label 2 twice (the scatter must add), no label once
    w = backend.to_active(rng.standard_normal((3, 1, 8, 8)))

    def loss():
        return (model(x, t, y) * Tensor(w)).sum()

    loss().backward()
    grad = backend.to_numpy(params["label_emb.weight"].grad)
    assert np.all(grad[[0, 1]] == 0) and np.abs(grad[[2, 4]]).min(axis=1).max() > 0   # rows 2 and 4 (no label)
    directions = {n: backend.to_active(rng.standard_normal(params[n].shape)) for n in checked}
    analytic = sum(float((params[n].grad * d).sum()) for n, d in directions.items())

    def moved(step):
        saved = {n: params[n].data for n in checked}
        for n, d in directions.items():
            params[n].data = saved[n] + step * d
        value = float(backend.to_numpy(loss().data))
        for n in checked:
            params[n].data = saved[n]
        return value

    eps = 1e-5
    assert analytic == pytest.approx((moved(eps) - moved(-eps)) / (2 * eps), rel=1e-6)
