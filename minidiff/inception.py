"""The Inception-v3 of FID, KID and IS (Heusel et al. 2017), built from minidiff's own layers.

This is the network pytorch-fid uses, with the 2015-12-05 TensorFlow weights
(pt_inception-2015-12-05-6726825d.pth): torchvision's Inception-v3 layout with the FID
variants of three blocks, which reproduce TensorFlow's graph rather than torchvision's:
- InceptionA, InceptionC and the first InceptionE average-pool without counting the padding;
- the last InceptionE (Mixed_7c) max-pools in its pool branch;
- 1008 output classes (TensorFlow's 1001, padded), and no auxiliary classifier.
Batch norm (eps 0.001) is folded into each convolution at load time: for a convolution W
followed by BN(gamma, beta, mean, var), W' = W gamma / sqrt(var + eps) per output channel and
b' = beta - mean gamma / sqrt(var + eps), so one convolution with a bias does both.

Input as pytorch-fid takes it: (N, 3, H, W) floats in [0, 1] (grey (N, 1, H, W) is repeated to
three channels), resized to 299 x 299 bilinearly with align_corners=False and no antialiasing,
then scaled to [-1, 1]. `features` are the 2048 pool3 activations (FID, KID, precision and
recall), `logits` the 1008 class scores (IS uses them without the fc bias, `bias=False`).
Forward only, under no_grad, in batches with a progress bar, on numpy or cupy.
May import: backend, tensor, ops, functional, nn, torchfile.
"""
import sys

from . import backend, ops, torchfile
from . import functional as F
from .nn import Module, Parameter
from .tensor import Tensor, no_grad

host = backend.host

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM, NUM_CLASSES, SIZE, BN_EPS = 2048, 1008, 299, 0.001


class BasicConv2d(Module):
    """Convolution (batch norm folded in) + ReLU; named as torchvision's, so Mixed_5b.branch1x1
    loads from the file's Mixed_5b.branch1x1.conv.weight and Mixed_5b.branch1x1.bn.*."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.weight = Parameter(host.zeros((out_channels, in_channels, kh, kw), dtype=backend.DTYPE))
        self.bias = Parameter(host.zeros((out_channels,), dtype=backend.DTYPE))
        self.stride, self.padding = stride, padding

    def forward(self, x):
        return F.relu(F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding))


def _cat(branches):
    return ops.concatenate(branches, axis=1)


class InceptionA(Module):
    """35 x 35 block: 1x1, 5x5, double 3x3 and pool branches (Mixed_5b-d)."""

    def __init__(self, c, pool_features):
        self.branch1x1 = BasicConv2d(c, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(c, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c, pool_features, 1)

    def forward(self, x):
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)   # the FID variant
        return _cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                     self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(pooled)])


class InceptionB(Module):
    """35 -> 17 reduction (Mixed_6a)."""

    def __init__(self, c):
        self.branch3x3 = BasicConv2d(c, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return _cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                     F.max_pool2d(x, 3, stride=2)])


class InceptionC(Module):
    """17 x 17 block with factorised 7x7 convolutions, 1x7 then 7x1 (Mixed_6b-e)."""

    def __init__(self, c, c7):
        self.branch1x1 = BasicConv2d(c, 192, 1)
        self.branch7x7_1 = BasicConv2d(c, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)   # the FID variant
        return _cat([self.branch1x1(x), b7, d7, self.branch_pool(pooled)])


class InceptionD(Module):
    """17 -> 8 reduction (Mixed_7a)."""

    def __init__(self, c):
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(c, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return _cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)])


class InceptionE(Module):
    """8 x 8 block with split 1x3 / 3x1 branches (Mixed_7b, Mixed_7c). `max_pool`: the last
    block's FID variant pools by max; the first averages without counting the padding."""

    def __init__(self, c, max_pool):
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c, 320, 1)
        self.branch3x3_1 = BasicConv2d(c, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.max_pool:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return _cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                     self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pooled)])


class InceptionV3(Module):
    """The FID Inception-v3; `load(path)` builds one with weights from pytorch-fid's file."""

    def __init__(self):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc_weight = Parameter(host.zeros((NUM_CLASSES, FEATURE_DIM), dtype=backend.DTYPE))
        self.fc_bias = Parameter(host.zeros((NUM_CLASSES,), dtype=backend.DTYPE))

    def pool3(self, x):
        """(N, 3, 299, 299) in [-1, 1] -> (N, 2048) pool3 activations."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return ops.mean(x, axis=(2, 3))            # global average pooling

    def forward(self, x):
        return self.pool3(preprocess(x))

    def features(self, images, batch_size=50, progress=False):
        """(N, 2048) float32 host array of pool3 features of images (N, C, H, W) in [0, 1]."""
        return self._run(images, batch_size, progress)[0]

    def logits(self, images, batch_size=50, progress=False, bias=True):
        """(N, 1008) float64 host array of class logits (bias=False: without the fc bias, for IS)."""
        return self.logits_of(self.features(images, batch_size, progress), bias)

    def logits_of(self, features, bias=True):
        """Logits from pool3 features: the fc layer, in float64 on the host."""
        w = backend.to_numpy(self.fc_weight.data).astype(host.float64)
        out = host.asarray(features, dtype=host.float64) @ w.T
        return out + backend.to_numpy(self.fc_bias.data) if bias else out

    def _run(self, images, batch_size, progress):
        images = check_images(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        out = host.empty((len(images), FEATURE_DIM), dtype=host.float32)
        starts = range(0, len(images), batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="Inception features", unit="batch", file=sys.stderr, dynamic_ncols=True)
        with no_grad():
            for a in starts:
                x = Tensor(backend.to_active(host.asarray(images[a:a + batch_size], dtype=host.float32)))
                out[a:a + batch_size] = backend.to_numpy(self(x).data)
        return (out,)


def check_images(images):
    """(N, 3 or 1, H, W) floats in [0, 1], or uint8 0..255 -> the same as a host or device array."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[1] not in (1, 3) or shape[0] < 1:
        raise ValueError(f"Inception takes images (N, 3, H, W) or (N, 1, H, W); got shape {shape}")
    if images.dtype == host.uint8:
        return images.astype(host.float32) / 255.0
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"Inception takes images in [0, 1]; these range over [{lo:.3g}, {hi:.3g}] "
                         f"(convert samples in [-1, 1] with (x + 1) / 2)")
    return images


def preprocess(x):
    """pytorch-fid's input transform: grey to RGB, bilinear resize to 299 x 299, [0, 1] -> [-1, 1]."""
    if x.shape[1] == 1:
        x = ops.concatenate([x, x, x], axis=1)
    return F.resize_bilinear(x, (SIZE, SIZE)) * 2.0 - 1.0


def fold_batch_norm(weight, gamma, beta, mean, var, eps=BN_EPS):
    """(W', b') of a convolution W followed by batch norm, in float64: W gamma / sqrt(var + eps), beta - mean gamma / sqrt(var + eps)."""
    scale = gamma.astype(host.float64) / host.sqrt(var.astype(host.float64) + eps)
    return weight.astype(host.float64) * scale[:, None, None, None], beta - mean.astype(host.float64) * scale


def state_from_torch(state, path="weights"):
    """minidiff's folded state dict from pytorch-fid's (torchvision's Inception3 names), checked."""
    model = InceptionV3()
    expected = set()
    folded = {}
    for name, module in model.named_modules():
        if isinstance(module, BasicConv2d):
            keys = [f"{name}.conv.weight"] + [f"{name}.bn.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
            expected.update(keys)
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(_not_fid_weights(path, f"{missing[0]} is missing"))
            if tuple(state[keys[0]].shape) != tuple(module.weight.shape):
                raise ValueError(_not_fid_weights(path, f"{keys[0]} has shape {tuple(state[keys[0]].shape)}, "
                                                        f"{tuple(module.weight.shape)} expected"))
            w, b = fold_batch_norm(*(state[k] for k in keys))
            folded[f"{name}.weight"], folded[f"{name}.bias"] = w, b
    for key, shape in (("fc.weight", (NUM_CLASSES, FEATURE_DIM)), ("fc.bias", (NUM_CLASSES,))):
        expected.add(key)
        if key not in state or tuple(state[key].shape) != shape:
            got = "missing" if key not in state else f"of shape {tuple(state[key].shape)}"
            hint = " (1000 classes: torchvision's ImageNet Inception, not the FID one)" if key in state and state[key].shape[0] == 1000 else ""
            raise ValueError(_not_fid_weights(path, f"{key} is {got}, {shape} expected{hint}"))
        folded[key.replace(".", "_")] = state[key]
    extra = sorted(k for k in state if k not in expected and not k.endswith("num_batches_tracked"))
    if extra:
        raise ValueError(_not_fid_weights(path, f"unexpected tensor {extra[0]} ({len(extra)} in all)"))
    return model, folded


def _not_fid_weights(path, what):
    return (f"{path}: not the FID Inception weights ({what}); use pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
            f"(see the README, 'Inception FID')")


def load(path):
    """The FID Inception-v3 with the weights of a PyTorch file (pytorch-fid's release file), read by
    the safe reader (minidiff.torchfile: no code from the file runs) and batch norm folded in.
    A missing file, a damaged or unsafe one, or other weights: one ValueError / FileNotFoundError."""
    model, folded = state_from_torch(torchfile.load_state_dict(path), path)
    model.load_state_dict({k: v.astype(host.float32) for k, v in folded.items()})
    for p in model.parameters():
        p.data = backend.to_active(p.data)
    return model.eval()
