"""Layers: Module, Parameter, Linear, Conv2d, GroupNorm, Dropout, Embedding, Sequential, ModuleList.

Initialisation follows the original DDPM code (diffusion_tf/nn.py, used for Ho et al.
2020, Appendix B): weights ~ variance-scaling "fan_avg" uniform (Glorot) times a
`init_scale`, where scale 0 means 1e-10 (the near-zero last layers), and zero biases.
Weights are drawn on the host from the default generator (`minidiff.manual_seed`),
so a seed gives the same model on numpy and cupy, then moved to the active backend.
May import: backend, tensor, ops, functional.
"""
import math

from . import backend
from . import functional as F
from .ops import getitem
from .tensor import Tensor, check_state_keys


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates (requires_grad=True)."""

    def __init__(self, data):
        super().__init__(data, requires_grad=True)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


def fan_avg_uniform(shape, fan_in, fan_out, scale=1.0):
    """A float32 Parameter ~ U(-a, a), a = sqrt(3 scale / ((fan_in + fan_out) / 2)).

    tf.initializers.variance_scaling(scale, "fan_avg", "uniform") as the original
    code's default_init; scale 0 becomes 1e-10 there too, so the layer starts near
    zero but still gets non-zero gradients through its weights.
    """
    scale = 1e-10 if scale == 0 else scale
    limit = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    w = backend.default_generator().host_rng().uniform(-limit, limit, size=shape)  # float64 on the host
    return Parameter(backend.to_active(w.astype(backend.DTYPE)))


def zeros(shape):
    return Parameter(backend.xp().zeros(shape, dtype=backend.DTYPE))


def ones(shape):
    return Parameter(backend.xp().ones(shape, dtype=backend.DTYPE))


class Module:
    """Base class: parameters and submodules are found by walking the attributes.

    Attributes that are Parameters or Modules are found in `vars(self)` order, so names
    read like "down.0.block.1.conv1.weight". Hold several modules in a ModuleList: a
    plain Python list is not searched. No __init__ to call, no __setattr__ magic.
    """

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def named_children(self):
        """(name, module) for the direct submodules, in definition order."""
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def children(self):
        return [m for _, m in self.named_children()]

    def named_modules(self, prefix=""):
        """(dotted name, module) for this module ("") and every submodule, depth first."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def named_parameters(self):
        """(dotted name, Parameter) for every parameter, each once, in definition order."""
        seen = set()
        for prefix, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{prefix}.{name}" if prefix else name), value

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    def train(self, mode=True):
        """Set `.training` on this module and all submodules (Dropout reads it); returns self."""
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def state_dict(self):
        """Flat {dotted name: array copy} of every parameter, on the parameters' backend."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state, strict=True):
        """Copy `state` into the parameters in place (cast to their dtype and backend).

        Checks everything before copying anything and raises one ValueError naming the
        missing keys, unexpected keys and shape mismatches. strict=False tolerates
        missing and unexpected keys, never a wrong shape.
        """
        params = dict(self.named_parameters())
        check_state_keys(type(self).__name__, state, {k: p.shape for k, p in params.items()}, strict=strict)
        for name, p in params.items():
            if name in state:
                xp = backend.xp_of(p.data)  # a cupy array cannot go straight into numpy, nor back
                value = backend.to_numpy(state[name]) if xp is backend.host else xp.asarray(state[name])
                p.data[...] = value  # in place: optimizers and EMAs keep pointing at the same arrays
        return self

    def __repr__(self):
        lines = [f"  ({name}): " + repr(child).replace("\n", "\n  ") for name, child in self.named_children()]
        return f"{type(self).__name__}(" + ("\n" + "\n".join(lines) + "\n" if lines else "") + ")"


class Linear(Module):
    """y = x W^T + b over the last axis: (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features, out_features, bias=True, init_scale=1.0):
        _check_positive(type(self).__name__, in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = fan_avg_uniform((out_features, in_features), in_features, out_features, init_scale)
        self.bias = zeros((out_features,)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias is not None})"


class Conv2d(Module):
    """2-D convolution, NCHW input and OIHW weight; padding as F.conv2d (int, pair or 4-tuple)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, init_scale=1.0):
        _check_positive(type(self).__name__, in_channels=in_channels, out_channels=out_channels,
                        kernel_size=kernel_size, stride=stride)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding = stride, padding
        k2 = kernel_size * kernel_size  # a receptive field: fan_in = in k^2, fan_out = out k^2 (TF's convention)
        self.weight = fan_avg_uniform((out_channels, in_channels, kernel_size, kernel_size),
                                      in_channels * k2, out_channels * k2, init_scale)
        self.bias = zeros((out_channels,)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding})")


class GroupNorm(Module):
    """Group normalisation (Wu & He 2018) with a per-channel affine; (N, C, ...) -> same shape."""

    def __init__(self, num_groups, num_channels, eps=1e-5):
        _check_positive(type(self).__name__, num_groups=num_groups, num_channels=num_channels)
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels cannot be split into {num_groups} equal groups")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = ones((num_channels,))  # gamma = 1, beta = 0, as tf.contrib's group_norm
        self.bias = zeros((num_channels,))

    def forward(self, x, silu=False):
        """GroupNorm(x), or silu(GroupNorm(x)) as one fused op with silu=True (one saved activation less)."""
        return F.group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps, silu=silu)

    def __repr__(self):
        return f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps})"


class Dropout(Module):
    """Zero entries with probability p and scale the rest by 1/(1-p) while training; identity in eval()."""

    def __init__(self, p=0.5):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must lie in [0, 1); got {p}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return F.dropout(x, self.p, self.training)

    def __repr__(self):
        return f"Dropout(p={self.p})"


class Embedding(Module):
    """A lookup table: integer indices (N,) -> rows of weight (N, dim), e.g. a class label's vector.

    weight ~ N(0, 1) as torch.nn.Embedding (guided-diffusion's label_emb), drawn on the host from
    the default generator like every other initialisation.
    """

    def __init__(self, num_embeddings, dim):
        _check_positive(type(self).__name__, num_embeddings=num_embeddings, dim=dim)
        self.num_embeddings, self.dim = num_embeddings, dim
        w = backend.default_generator().host_rng().standard_normal((num_embeddings, dim))
        self.weight = Parameter(backend.to_active(w.astype(backend.DTYPE)))

    def forward(self, index):
        return getitem(self.weight, index)  # a gather; its backward scatters into the picked rows

    def __repr__(self):
        return f"Embedding({self.num_embeddings}, {self.dim})"


class ModuleList(Module):
    """A list of modules whose parameters are registered as "<index>.<name>"."""

    def __init__(self, modules=()):
        self._list = []
        for m in modules:
            self.append(m)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules; got {type(module).__name__}")
        self._list.append(module)
        return self

    def named_children(self):
        return ((str(i), m) for i, m in enumerate(self._list))

    def __getitem__(self, i):
        return self._list[i]

    def __len__(self):
        return len(self._list)

    def __iter__(self):
        return iter(self._list)


class Sequential(ModuleList):
    """Modules applied one after another."""

    def __init__(self, *modules):
        super().__init__(modules)

    def forward(self, x):
        for m in self._list:
            x = m(x)
        return x


def _check_positive(layer, **sizes):
    bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or v <= 0]
    if bad:
        raise ValueError(f"{layer}: sizes must be positive integers; got {', '.join(bad)}")
