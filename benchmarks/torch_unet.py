"""The DDPM U-Net of minidiff.unet, written in PyTorch: the benchmark's reference.

Same architecture as minidiff.UNet (Ho et al. 2020, App. B; the original TF code's
`model`): timestep embedding -> dense -> swish -> dense; conv_in; per level
`num_res_blocks` residual blocks (+ attention at `attn_resolutions`) and a stride-2
"SAME" conv downsample; middle (res, attn, res); up path with num_res_blocks + 1
blocks per level on skip concatenations, nearest upsample + conv; GroupNorm, swish,
conv_out. Module names mirror minidiff's, so `load_minidiff_state` copies a minidiff
model's weights over and both produce the same output (the conformance check).

PyTorch is only ever an optional reference: minidiff never imports this file.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim):
    """Sinusoidal embedding as the original DDPM code: freqs exp(-i ln(10000) / (half - 1)), [sin, cos]."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000.0) / (half - 1)))
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # (N, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class ResnetBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_ch, dropout, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb_act):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q, k, v, proj_out are dense layers over C."""

    def __init__(self, ch, groups, eps):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x):
        n, c, hh, ww = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        q, k, v = self.q(h), self.k(h), self.v(h)
        w = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * (c ** -0.5), dim=-1)  # (N, HW, HW)
        h = self.proj_out(torch.bmm(w, v))  # (N, HW, C)
        return x + h.transpose(1, 2).reshape(n, c, hh, ww)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TF "SAME" padding: 0 top/left, 1 bottom/right."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.attn = nn.ModuleList(), nn.ModuleList()
        self.downsample = self.upsample = None


class TorchUNet(nn.Module):
    """UNet(image_size, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, ...) as minidiff.UNet."""

    def __init__(self, image_size, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions,
                 dropout=0.0, out_channels=None, num_groups=32, eps=1e-6):
        super().__init__()
        out_channels = out_channels or in_channels
        self.ch, g, temb_ch = ch, num_groups, 4 * ch
        self.temb = nn.Module()
        self.temb.dense0 = nn.Linear(ch, temb_ch)
        self.temb.dense1 = nn.Linear(temb_ch, temb_ch)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skips, cur, res = [ch], ch, image_size
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = Level()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(cur, ch * mult, temb_ch, dropout, g, eps))
                cur = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cur, g, eps))
                skips.append(cur)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(cur)
                res //= 2
                skips.append(cur)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cur, cur, temb_ch, dropout, g, eps)
        self.mid.attn_1 = AttnBlock(cur, g, eps)
        self.mid.block_2 = ResnetBlock(cur, cur, temb_ch, dropout, g, eps)
        up = [None] * len(ch_mult)
        for i in reversed(range(len(ch_mult))):
            level = Level()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(cur + skips.pop(), ch * ch_mult[i], temb_ch, dropout, g, eps))
                cur = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cur, g, eps))
            if i != 0:
                level.upsample = Upsample(cur)
                res *= 2
            up[i] = level
        self.up = nn.ModuleList(up)  # up[i] is level i, as minidiff and the original's up_{i}
        self.norm_out = nn.GroupNorm(g, cur, eps=eps)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)

    def forward(self, x, t):
        temb = self.temb.dense1(F.silu(self.temb.dense0(timestep_embedding(t, self.ch))))
        temb_act = F.silu(temb)
        hs = [self.conv_in(x)]
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(hs[-1], temb_act)
                hs.append(level.attn[i](h) if len(level.attn) else h)
            if level.downsample is not None:
                hs.append(level.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb_act)), temb_act)
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb_act)
                if len(level.attn):
                    h = level.attn[i](h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def load_minidiff_state(tmodel, model):
    """Copy a minidiff.UNet's parameters into `tmodel` (same names and shapes); returns tmodel."""
    state = {k: torch.from_numpy(_host(v).copy()) for k, v in model.state_dict().items()}
    missing = set(dict(tmodel.named_parameters())) ^ set(state)
    if missing:
        raise KeyError(f"parameter names differ between minidiff and torch: {sorted(missing)[:8]}")
    tmodel.load_state_dict(state, strict=True)
    return tmodel


def minidiff_grads_as_torch(tmodel, model):
    """minidiff's parameter gradients as {torch parameter name: torch tensor}."""
    return {name: torch.from_numpy(_host(p.grad).copy()) for name, p in model.named_parameters()}


def _host(a):
    return a.get() if hasattr(a, "get") else a  # a cupy array -> numpy


def randomize_(model, seed=0):
    """Give every parameter of a minidiff model random O(1)-output values, in place.

    The DDPM initialisation zeroes the last conv of each block and the output conv,
    which would make an output comparison trivially pass; conformance checks call this first.
    """
    import numpy as np
    from minidiff import backend
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        shape = p.data.shape
        if len(shape) >= 2:  # weights: unit-variance outputs for unit-variance inputs
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        p.data[...] = backend.xp_of(p.data).asarray(value.astype(np.float32))  # in place, on p's backend
    return model
