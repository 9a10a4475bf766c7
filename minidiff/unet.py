"""The paper's U-Net eps_theta(x_t, t) (Ho et al. 2020, arXiv:2006.11239, Appendix B).

A PixelCNN++-style U-Net, as diffusion_tf/models/unet.py: a sinusoidal timestep
embedding through two dense layers; per resolution `num_res_blocks` residual blocks
(self-attention after each one at `attn_resolutions`), stride-2 conv downsampling;
a middle (res, attn, res); an up path with `num_res_blocks + 1` blocks per level
fed with the skip connections, nearest upsampling + conv; GroupNorm -> swish -> conv_out.
Parameter names follow the original (down.0.block.1.conv1.weight, mid.attn_1.q.weight, ...).
May import: tensor, ops, functional, nn.
"""
from . import functional as F
from . import nn
from .ops import concatenate
from .tensor import Tensor

GROUPNORM_EPS = 1e-6  # tf.contrib.layers.group_norm's default, which the original code uses


def default_num_groups(ch):
    """The GroupNorm group count for base width `ch`: the largest divisor of ch <= min(32, ch // 4).

    32 groups as the paper for its widths (ch = 128 and any multiple of 32 from 128 up);
    for narrow models at least 4 channels per group (ch=32 -> 8, ch=64 -> 16, ch=16 -> 4),
    so no group degenerates to one channel. Every width in the network is a sum of
    multiples of ch, so a divisor of ch divides them all.
    """
    limit = max(1, min(32, ch // 4))
    return max(g for g in range(1, limit + 1) if ch % g == 0)


class ResnetBlock(nn.Module):
    """x + conv2(dropout(swish(norm2(conv1(swish(norm1(x))) + dense(swish(temb)))))); 1x1 shortcut if widths differ."""

    def __init__(self, in_ch, out_ch, temb_ch, dropout, num_groups):
        self.norm1 = nn.GroupNorm(num_groups, in_ch, eps=GROUPNORM_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch, eps=GROUPNORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, init_scale=0.0)  # near zero: the block starts as identity
        # The original's "nin_shortcut": a 1x1 conv (network-in-network) only where widths change.
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb_act):  # x (N, in_ch, H, W), temb_act = swish(temb) (N, temb_ch)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # (N, out_ch, H, W); in place on a temporary
        h = h + self.temb_proj(temb_act).reshape(h.shape[0], h.shape[1], 1, 1)  # the timestep, per channel
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """x + proj_out(attention(q, k, v)) over the H*W positions, single head; q, k, v are 1x1 projections."""

    def __init__(self, ch, num_groups):
        self.norm = nn.GroupNorm(num_groups, ch, eps=GROUPNORM_EPS)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch, init_scale=0.0)  # near zero: the block starts as identity

    def forward(self, x, temb_act=None):  # x (N, C, H, W)
        n, c, height, width = x.shape
        # (N, C, H, W) -> (N, HW, C); a free view when x has conv2d's channels-last strides
        h = self.norm(x).transpose(0, 2, 3, 1).reshape(n, height * width, c)
        h = F.attention(self.q(h), self.k(h), self.v(h))  # (N, HW, C)
        h = self.proj_out(h).reshape(n, height, width, c).transpose(0, 3, 1, 2)  # back to (N, C, H, W)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TensorFlow "SAME" padding (0 top/left, 1 bottom/right): (H, W) -> (H/2, W/2)."""

    def __init__(self, ch):
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=(0, 1, 0, 1))

    def forward(self, x, temb_act=None):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv: (H, W) -> (2H, 2W)."""

    def __init__(self, ch):
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, temb_act=None):
        return self.conv(F.upsample_nearest2d(x, 2))


class Level(nn.Module):
    """One resolution of the down or up path: res blocks and their attention blocks (maybe none).

    The path sets `downsample` or `upsample` (None at the path's end), the original's names.
    """

    def __init__(self):
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()  # empty unless this resolution is in attn_resolutions


class UNet(nn.Module):
    """eps_theta(x_t, t): (N, in_channels, S, S) and integer t (N,) -> (N, out_channels, S, S).

    The paper's CIFAR-10 model is UNet(32, 3, 128, (1, 2, 2, 2), 2, (16,), 0.1), 35,746,307
    parameters. `num_groups` overrides the GroupNorm group count (default: default_num_groups(ch)).
    `config` holds the constructor arguments, so UNet(**model.config) rebuilds the model.
    """

    def __init__(self, image_size, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions,
                 dropout=0.0, out_channels=None, num_groups=None):
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        out_channels = in_channels if out_channels is None else out_channels
        num_groups = default_num_groups(ch) if num_groups is None and _is_pos_int(ch) else num_groups
        _validate(image_size, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
                  out_channels, num_groups)
        self.config = dict(image_size=image_size, in_channels=in_channels, ch=ch, ch_mult=ch_mult,
                           num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                           dropout=dropout, out_channels=out_channels, num_groups=num_groups)
        self.ch, self.image_size, self.in_channels = ch, image_size, in_channels
        temb_ch, g = 4 * ch, num_groups

        # Timestep embedding: sinusoids (ch) -> dense -> swish -> dense (4 ch)
        self.temb = nn.Module()
        self.temb.dense0 = nn.Linear(ch, temb_ch)
        self.temb.dense1 = nn.Linear(temb_ch, temb_ch)

        # Down path; skip_ch records the width of every activation pushed on the skip stack
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_ch, cur, res = [ch], ch, image_size
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = Level()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(cur, ch * mult, temb_ch, dropout, g))
                cur = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cur, g))
                skip_ch.append(cur)
            level.downsample = Downsample(cur) if i != len(ch_mult) - 1 else None
            if level.downsample is not None:
                res //= 2
                skip_ch.append(cur)
            self.down.append(level)

        # Middle, always with attention
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cur, cur, temb_ch, dropout, g)
        self.mid.attn_1 = AttnBlock(cur, g)
        self.mid.block_2 = ResnetBlock(cur, cur, temb_ch, dropout, g)

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip; self.up[i] is level i, as up_{i}
        up = [None] * len(ch_mult)
        for i in reversed(range(len(ch_mult))):
            level = Level()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(cur + skip_ch.pop(), ch * ch_mult[i], temb_ch, dropout, g))
                cur = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cur, g))
            level.upsample = Upsample(cur) if i != 0 else None
            if level.upsample is not None:
                res *= 2
            up[i] = level
        self.up = nn.ModuleList(up)

        self.norm_out = nn.GroupNorm(g, cur, eps=GROUPNORM_EPS)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1, init_scale=0.0)  # near zero: eps_theta starts at 0

    def forward(self, x, t):
        """x (N, in_channels, S, S) float, t (N,) integer timesteps (0-based) -> eps (N, out_channels, S, S)."""
        x = x if isinstance(x, Tensor) else Tensor(x)
        s = self.image_size
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, s, s):
            raise ValueError(f"UNet expects x of shape (N, {self.in_channels}, {s}, {s}); got {x.shape}")
        temb = F.timestep_embedding(t, self.ch)  # (N, ch)
        if temb.shape[0] != x.shape[0]:
            raise ValueError(f"UNet: {x.shape[0]} images but {temb.shape[0]} timesteps")
        temb = self.temb.dense1(F.silu(self.temb.dense0(temb)))  # (N, 4 ch)
        temb_act = F.silu(temb)  # every res block projects swish(temb); compute it once

        hs = [self.conv_in(x)]  # the skip stack
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(hs[-1], temb_act)
                if len(level.attn):
                    h = level.attn[i](h)
                hs.append(h)
            if level.downsample is not None:
                hs.append(level.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb_act)), temb_act)

        for level in reversed(self.up._list):
            for i, block in enumerate(level.block):
                h = block(concatenate([h, hs.pop()], axis=1), temb_act)  # (N, C + C_skip, H, W)
                if len(level.attn):
                    h = level.attn[i](h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


def _is_pos_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _validate(image_size, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
              out_channels, num_groups):
    """Raise one ValueError naming what makes the configuration impossible."""
    sizes = dict(image_size=image_size, in_channels=in_channels, ch=ch, num_res_blocks=num_res_blocks,
                 out_channels=out_channels, num_groups=num_groups)
    bad = [f"{k}={v!r}" for k, v in sizes.items() if not _is_pos_int(v)]
    if bad:
        raise ValueError(f"UNet: sizes must be positive integers; got {', '.join(bad)}")
    if not ch_mult or not all(_is_pos_int(m) for m in ch_mult):
        raise ValueError(f"UNet: ch_mult must be a non-empty sequence of positive integers; got {ch_mult}")
    if ch < 4:
        raise ValueError(f"UNet: ch={ch} is too small for the sinusoidal timestep embedding (needs ch >= 4)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"UNet: dropout must lie in [0, 1); got {dropout}")
    factor = 2 ** (len(ch_mult) - 1)  # one stride-2 downsampling between consecutive levels
    if image_size % factor:
        raise ValueError(f"UNet: image_size={image_size} is not divisible by 2^{len(ch_mult) - 1} = {factor}, "
                         f"which the {len(ch_mult)} levels of ch_mult={ch_mult} need")
    resolutions = [image_size // 2 ** i for i in range(len(ch_mult))]
    never = [r for r in attn_resolutions if r not in resolutions]
    if never:
        raise ValueError(f"UNet: attention resolution(s) {never} never occur; the resolutions are {resolutions}")
    if ch % num_groups:  # every GroupNorm width is a sum of multiples of ch
        widths = sorted({ch * m for m in ch_mult})
        raise ValueError(f"UNet: num_groups={num_groups} does not divide ch={ch}, so GroupNorm cannot split "
                         f"the channel widths (e.g. {widths}) into equal groups")
