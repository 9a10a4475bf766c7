"""The two log-densities of the variational bound (Ho et al. 2020, Eq. 5 and Eq. 13), in nats.

Each function takes arrays or Tensors. Arrays in give an array out; if any input is a
Tensor the result is a Tensor built from differentiable ops, so `training_losses`
with loss_type="kl" can backpropagate into the model. Written as in the original
code (hojonathanho/diffusion, improved-diffusion) so bits/dim are comparable with the paper's.
May import: backend, tensor (the Tensor methods .exp(), .log(), .tanh(), .clip() are bound by ops).
"""
import math

from . import backend
from .tensor import Tensor


def _as_tensors(*values):
    """Wrap every array (and Python number) as a Tensor, so that one formula serves both kinds.

    Returns the Tensors and whether the caller gave any Tensor (then it gets a Tensor back).
    Numbers become 0-d arrays of the first array's dtype and backend, never float64 by accident.
    """
    arrays = [v.data if isinstance(v, Tensor) else v for v in values]
    ref = next(a for a in arrays if backend.is_array(a))
    xp = backend.xp_of(ref)
    tensors = [v if isinstance(v, Tensor) else Tensor(v if backend.is_array(v) else xp.asarray(v, dtype=ref.dtype))
               for v in values]
    return tensors, any(isinstance(v, Tensor) for v in values)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    The closed form between two Gaussians, used for L_{t-1} (Eq. 5) and the prior term L_T.
    Any argument may be a Python number (the prior N(0, 1) is normal_kl(m, lv, 0.0, 0.0)).
    """
    (mean1, logvar1, mean2, logvar2), tensor_out = _as_tensors(mean1, logvar1, mean2, logvar2)
    kl = 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp()
                + (mean1 - mean2) ** 2 * (-logvar2).exp())
    return kl if tensor_out else kl.data


def approx_standard_normal_cdf(x):
    """Phi(x) ~ 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), the original code's approximation.

    Kept (rather than erf) so that bits/dim match the paper's numbers; takes and returns a Tensor.
    """
    return 0.5 * (1.0 + (math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)).tanh())


def discretized_gaussian_log_likelihood(x, means, log_scales, num_bins=256):
    """log p(x) for x on a grid of num_bins levels in [-1, 1] under N(means, exp(log_scales)^2): Eq. 13.

    Each level owns the bin [x - 1/(num_bins-1), x + 1/(num_bins-1)] (width 2/255 for 8-bit
    images); the two edge bins extend to -inf and +inf, detected as x < -0.999 and x > 0.999 as
    in the original code, which assumes x lies exactly on the grid. For data with fewer grey
    levels (e.g. binary digits: num_bins=2, or 16 levels: num_bins=16) pass num_bins, so that
    the bins tile [-1, 1] and the probabilities of all levels still sum to 1.
    Elementwise, in nats; x (the data) is never differentiated.
    """
    (means, log_scales), tensor_out = _as_tensors(means, log_scales)
    tensor_out = tensor_out or isinstance(x, Tensor)
    x = x.data if isinstance(x, Tensor) else x
    half_bin = 1.0 / (num_bins - 1)
    centered = Tensor(x) - means
    inv_stdv = (-log_scales).exp()
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + half_bin))    # Phi at the bin's upper edge
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - half_bin))     # Phi at the bin's lower edge
    # Floors at 1e-12 keep log() finite where a bin has (numerically) no mass, as the original does.
    log_cdf_plus = cdf_plus.clip(1e-12, None).log()                          # lowest bin: (-inf, upper]
    log_one_minus_cdf_min = (1.0 - cdf_min).clip(1e-12, None).log()          # highest bin: [lower, +inf)
    log_cdf_delta = (cdf_plus - cdf_min).clip(1e-12, None).log()             # every other bin
    # Constant 0/1 masks choose the case per element; every term is finite, so 0 * term is 0.
    lowest = (x < -0.999).astype(x.dtype)
    highest = (x > 0.999).astype(x.dtype)
    log_probs = (log_cdf_plus * lowest + log_one_minus_cdf_min * highest
                 + log_cdf_delta * (1.0 - lowest - highest))
    return log_probs if tensor_out else log_probs.data
