"""Hypothesis strategies shared by several test files (minitorch's habit).

Arrays are float64 host (numpy) arrays; tests move them to a backend themselves.
"""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minidiff.schedule import NAMES, get_named_beta_schedule

# Every named schedule at any length from 2 (the shortest GaussianDiffusion) to 2000.
named_betas = st.builds(get_named_beta_schedule, st.sampled_from(NAMES), st.integers(2, 2000))

# Any valid user schedule: 0 < beta < 1 (capped at 0.5 so alpha_bar stays above ~1e-90 at T = 300).
random_betas = arrays(np.float64, st.integers(2, 300), elements=st.floats(1e-6, 0.5))

betas_arrays = st.one_of(named_betas, random_betas)

# Small batch shapes (N, C, H, W) with size-1 axes allowed.
image_shapes = st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3))


def finite_arrays(shape, low=-3.0, high=3.0):
    """float64 arrays of `shape` with moderate values."""
    return arrays(np.float64, shape, elements=st.floats(low, high))


@st.composite
def timesteps(draw, num_timesteps, n, low=0):
    """A 0-based timestep array of shape (n,) in [low, num_timesteps)."""
    return np.array(draw(st.lists(st.integers(low, num_timesteps - 1), min_size=n, max_size=n)), dtype=np.int64)
