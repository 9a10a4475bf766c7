"""The paper's U-Net eps_theta(x_t, t) (Ho et al. 2020, arXiv:2006.11239, Appendix B).

A PixelCNN++-style U-Net, as diffusion_tf/models/unet.py: a sinusoidal timestep
embedding through two dense layers; per resolution `num_res_blocks` residual blocks
(self-attention after each one at `attn_resolutions`), stride-2 conv downsampling;
a middle (res, attn, res); an up path with `num_res_blocks + 1` blocks per level
fed with the skip connections, nearest upsampling + conv; GroupNorm -> swish -> conv_out.
Parameter names follow the original (down.0.block.1.conv1.weight, mid.attn_1.q.weight, ...).
With `num_classes=K` the U-Net is class-conditional, eps_theta(x_t, t, y), for classifier-free
guidance (Ho & Salimans 2022): a learned embedding of the label, K + 1 rows with the last for
"no label", is added to the timestep embedding, as guided-diffusion's `label_emb` does.
MLPDenoiser, the same eps_theta for 2-D points, sits beside it.
May import: backend, tensor, ops, functional, nn, diffusion (for its NO_LABEL convention).
"""
from . import backend
from . import functional as F
from . import nn
from .diffusion import NO_LABEL
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

    def __init__(self, in_ch, out_ch, temb_ch, dropout, num_groups, eps=GROUPNORM_EPS):
        self.norm1 = nn.GroupNorm(num_groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, init_scale=0.0)  # near zero: the block starts as identity
        # The original's "nin_shortcut": a 1x1 conv (network-in-network) only where widths change.
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb_act):  # x (N, in_ch, H, W), temb_act = swish(temb) (N, temb_ch)
        h = self.conv1(self.norm1(x, silu=True))  # swish(GroupNorm(x)) (N, out_ch, H, W), fused: saves an activation
        h = h + self.temb_proj(temb_act).reshape(h.shape[0], h.shape[1], 1, 1)  # the timestep, per channel
        h = self.conv2(self.dropout(self.norm2(h, silu=True)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """x + proj_out(attention(q, k, v)) over the H*W positions; q, k, v are 1x1 projections.

    One head as the paper; `head_dim` splits the channels into ch // head_dim heads of
    head_dim channels each (diffusers' attention_head_dim), attended separately and concatenated.
    """

    def __init__(self, ch, num_groups, eps=GROUPNORM_EPS, head_dim=None):
        if head_dim is not None and ch % head_dim:
            raise ValueError(f"AttnBlock: head_dim={head_dim} does not divide the {ch} channels into equal heads")
        self.heads = 1 if head_dim is None else ch // head_dim
        self.norm = nn.GroupNorm(num_groups, ch, eps=eps)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch, init_scale=0.0)  # near zero: the block starts as identity

    def forward(self, x, temb_act=None):  # x (N, C, H, W)
        n, c, height, width = x.shape
        # (N, C, H, W) -> (N, HW, C); a free view when x has conv2d's channels-last strides
        h = self.norm(x).transpose(0, 2, 3, 1).reshape(n, height * width, c)
        if self.heads == 1:
            h = F.attention(self.q(h), self.k(h), self.v(h))  # (N, HW, C)
        else:  # (N, HW, C) -> (N heads, HW, C / heads): each head attends over its own channels
            split = lambda a: a.reshape(n, height * width, self.heads, c // self.heads).transpose(  # noqa: E731
                0, 2, 1, 3).reshape(n * self.heads, height * width, c // self.heads)
            h = F.attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
            h = h.reshape(n, self.heads, height * width, c // self.heads).transpose(0, 2, 1, 3).reshape(
                n, height * width, c)
        h = self.proj_out(h).reshape(n, height, width, c).transpose(0, 3, 1, 2)  # back to (N, C, H, W)
        return x + h


DOWNSAMPLE_PADDINGS = {"same": (0, 1, 0, 1), "symmetric": 1}  # the original's TF "SAME"; diffusers' default


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (H, W) -> (H/2, W/2).

    padding "same" is TensorFlow's "SAME" (0 top/left, 1 bottom/right), as the original code and
    diffusers' downsample_padding=0; "symmetric" pads 1 on every side (diffusers' downsample_padding=1).
    """

    def __init__(self, ch, padding="same"):
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=DOWNSAMPLE_PADDINGS[padding])

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

    The keyword-only options exist to hold other trainings of the same architecture exactly
    (diffusers' UNet2DModel, see minidiff.pretrained); their defaults are the original's, and
    `config` lists them only when they differ from those defaults:
    norm_eps (GroupNorm epsilon), downsample_padding ("same" or "symmetric", see Downsample),
    flip_sin_to_cos and freq_shift (see F.timestep_embedding), attn_head_dim (None: one head),
    num_classes (None: unconditional; K: called as model(x, t, y) with labels y in 0..K-1, or
    NO_LABEL = -1 for "no label"; y=None means no label for the whole batch).
    """

    OPTION_DEFAULTS = dict(norm_eps=GROUPNORM_EPS, downsample_padding="same", flip_sin_to_cos=False,
                           freq_shift=1, attn_head_dim=None)

    def __init__(self, image_size, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions,
                 dropout=0.0, out_channels=None, num_groups=None, *, norm_eps=GROUPNORM_EPS,
                 downsample_padding="same", flip_sin_to_cos=False, freq_shift=1, attn_head_dim=None,
                 num_classes=None):
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        out_channels = in_channels if out_channels is None else out_channels
        num_groups = default_num_groups(ch) if num_groups is None and _is_pos_int(ch) else num_groups
        _validate(image_size, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
                  out_channels, num_groups)
        options = dict(norm_eps=norm_eps, downsample_padding=downsample_padding, flip_sin_to_cos=flip_sin_to_cos,
                       freq_shift=freq_shift, attn_head_dim=attn_head_dim)
        _validate_options(ch, ch_mult, **options)
        if num_classes is not None and not _is_pos_int(num_classes):
            raise ValueError(f"UNet: num_classes must be a positive integer (or None: unconditional); "
                             f"got {num_classes!r}")
        self.config = dict(image_size=image_size, in_channels=in_channels, ch=ch, ch_mult=ch_mult,
                           num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                           dropout=dropout, out_channels=out_channels, num_groups=num_groups)
        self.config.update({k: v for k, v in options.items() if v != self.OPTION_DEFAULTS[k]})
        if num_classes is not None:   # an unconditional model's config (and checkpoint) is unchanged
            self.config["num_classes"] = num_classes
        self.ch, self.image_size, self.in_channels = ch, image_size, in_channels
        self.flip_sin_to_cos, self.freq_shift = flip_sin_to_cos, freq_shift
        temb_ch, g = 4 * ch, num_groups
        block = lambda i, o: ResnetBlock(i, o, temb_ch, dropout, g, eps=norm_eps)  # noqa: E731
        attn = lambda c: AttnBlock(c, g, eps=norm_eps, head_dim=attn_head_dim)  # noqa: E731

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
                level.block.append(block(cur, ch * mult))
                cur = ch * mult
                if res in attn_resolutions:
                    level.attn.append(attn(cur))
                skip_ch.append(cur)
            level.downsample = Downsample(cur, downsample_padding) if i != len(ch_mult) - 1 else None
            if level.downsample is not None:
                res //= 2
                skip_ch.append(cur)
            self.down.append(level)

        # Middle, always with attention
        self.mid = nn.Module()
        self.mid.block_1 = block(cur, cur)
        self.mid.attn_1 = attn(cur)
        self.mid.block_2 = block(cur, cur)

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip; self.up[i] is level i, as up_{i}
        up = [None] * len(ch_mult)
        for i in reversed(range(len(ch_mult))):
            level = Level()
            for _ in range(num_res_blocks + 1):
                level.block.append(block(cur + skip_ch.pop(), ch * ch_mult[i]))
                cur = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(attn(cur))
            level.upsample = Upsample(cur) if i != 0 else None
            if level.upsample is not None:
                res *= 2
            up[i] = level
        self.up = nn.ModuleList(up)

        self.norm_out = nn.GroupNorm(g, cur, eps=norm_eps)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1, init_scale=0.0)  # near zero: eps_theta starts at 0

        # Created last, so the other weights are those of the unconditional model of the same seed.
        self.num_classes = num_classes
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + 1, temb_ch)  # row K: the "no label" token

    def forward(self, x, t, y=None):
        """x (N, in_channels, S, S) float, t (N,) integer timesteps (0-based), labels y (N,) or None
        -> eps (N, out_channels, S, S)."""
        x = x if isinstance(x, Tensor) else Tensor(x)
        s = self.image_size
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, s, s):
            raise ValueError(f"UNet expects x of shape (N, {self.in_channels}, {s}, {s}); got {x.shape}")
        temb = F.timestep_embedding(t, self.ch, self.flip_sin_to_cos, self.freq_shift)  # (N, ch)
        if temb.shape[0] != x.shape[0]:
            raise ValueError(f"UNet: {x.shape[0]} images but {temb.shape[0]} timesteps")
        temb = self.temb.dense1(F.silu(self.temb.dense0(temb)))  # (N, 4 ch)
        if self.num_classes is not None:  # the label shifts the timestep embedding (guided-diffusion)
            temb = temb + self.label_emb(label_rows(y, x.shape[0], self.num_classes, x.data))
        elif y is not None:
            raise ValueError("UNet: this model is unconditional (num_classes=None) and takes no labels y")
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
        return self.conv_out(self.norm_out(h, silu=True))  # swish(GroupNorm(h)), fused


class MLPDenoiser(nn.Module):
    """eps_theta(x_t, t) for 2-D points: a residual MLP told t at every layer.

    h = Linear(x_t); for each layer h = h + Linear(SiLU(h + Linear_l(e))), where e is the
    U-Net's sinusoidal embedding of t through a dense layer and SiLU; out = Linear(SiLU(h)).
    Small enough to learn a swiss roll in about a minute on a CPU.
    """

    def __init__(self, dim=2, hidden=128, layers=3, time_dim=32, out_dim=None):
        self.time_dim = time_dim
        self.config = {"kind": "mlp", "dim": dim, "hidden": hidden, "layers": layers, "time_dim": time_dim}
        if out_dim is not None and out_dim != dim:   # 2 dim with a learned variance; absent otherwise, as before
            self.config["out_dim"] = out_dim
        out_dim = dim if out_dim is None else out_dim
        self.temb = nn.Linear(time_dim, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.temb_proj = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(layers)])
        self.hidden = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(layers)])
        self.out = nn.Linear(hidden, out_dim, init_scale=0.0)   # starts at eps = 0, as the U-Net's last conv

    def forward(self, x, t):
        x = x if isinstance(x, Tensor) else Tensor(x)
        emb = F.silu(self.temb(F.timestep_embedding(t, self.time_dim)))      # (N, hidden)
        h = self.inp(x)                                                       # (N, hidden)
        for proj, layer in zip(self.temb_proj, self.hidden):
            h = h + layer(F.silu(h + proj(emb)))                              # residual, conditioned on t
        return self.out(F.silu(h))                                            # (N, out_dim)


def label_rows(y, n, num_classes, like):
    """Rows of a (K + 1)-row label embedding for labels y (N,): y itself, and row K for NO_LABEL or y=None.

    Raises ValueError for labels of the wrong shape, type or range. `like` is an array on the
    model's backend (the labels are moved there).
    """
    xp = backend.xp_of(like)
    if y is None:
        return xp.full((n,), num_classes, dtype=backend.host.int64)
    y = xp.asarray(y.data if isinstance(y, Tensor) else y)
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise ValueError(f"labels y must be {n} integers, shape ({n},), for {n} images; got {y.dtype} of shape "
                         f"{tuple(y.shape)}")
    if n and not (int(y.min()) >= NO_LABEL and int(y.max()) < num_classes):  # a sync on GPU: labels are tiny
        raise ValueError(f"labels y must lie in 0 .. {num_classes - 1} (or {NO_LABEL}: no label); got "
                         f"{int(y.min())} .. {int(y.max())}")
    return xp.where(y == NO_LABEL, num_classes, y).astype(backend.host.int64)


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


def _validate_options(ch, ch_mult, norm_eps, downsample_padding, flip_sin_to_cos, freq_shift, attn_head_dim):
    """Raise one ValueError naming the keyword option that cannot be built."""
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
        raise ValueError(f"UNet: norm_eps must be a positive number; got {norm_eps!r}")
    if downsample_padding not in DOWNSAMPLE_PADDINGS:
        raise ValueError(f"UNet: downsample_padding must be one of {', '.join(map(repr, DOWNSAMPLE_PADDINGS))}; "
                         f"got {downsample_padding!r}")
    if not isinstance(flip_sin_to_cos, bool):
        raise ValueError(f"UNet: flip_sin_to_cos must be True or False; got {flip_sin_to_cos!r}")
    if isinstance(freq_shift, bool) or not isinstance(freq_shift, (int, float)) or not freq_shift < ch // 2:
        raise ValueError(f"UNet: freq_shift must be a number below ch // 2 = {ch // 2}; got {freq_shift!r}")
    if attn_head_dim is not None:
        widths = sorted({ch * m for m in ch_mult})
        if not _is_pos_int(attn_head_dim) or any(w % attn_head_dim for w in widths):
            raise ValueError(f"UNet: attn_head_dim={attn_head_dim!r} must be a positive integer dividing every "
                             f"channel width {widths} (None: one head)")
