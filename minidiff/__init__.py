"""minidiff: Denoising Diffusion Probabilistic Models (Ho et al. 2020) from scratch on NumPy/CuPy.

The public names, lowest layer first: the backend switch and seeds, Tensor and
autograd, the functional ops (`F`), layers (`nn`), the paper's `UNet`, the
optimiser and EMA (`optim`), and the diffusion math (`GaussianDiffusion`).
"""
__version__ = "0.1.0"

from . import backend, kernels
from .backend import Generator, gpu_available, manual_seed, to_numpy, use_backend
from .kernels import use_kernels
from .tensor import Function, Tensor, is_grad_enabled, no_grad
from . import ops  # binds the Tensor operators (+, @, ...)
from . import functional
from . import functional as F
from . import nn, optim
from .unet import MLPDenoiser, UNet
from .schedule import get_named_beta_schedule
from .diffusion import GaussianDiffusion

__all__ = [
    "backend", "use_backend", "kernels", "use_kernels", "gpu_available", "manual_seed", "Generator", "to_numpy",
    "Tensor", "Function", "no_grad", "is_grad_enabled", "ops", "functional", "F", "nn", "optim",
    "UNet", "MLPDenoiser", "get_named_beta_schedule", "GaussianDiffusion",
]
