"""minidiff: Denoising Diffusion Probabilistic Models (Ho et al. 2020) from scratch on NumPy/CuPy."""
__version__ = "0.1.0"
from . import backend
from .backend import use_backend, manual_seed, Generator, to_numpy, gpu_available
from .tensor import Tensor, no_grad, is_grad_enabled, Function
from . import ops
