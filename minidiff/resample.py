"""How Algorithm 1 draws its timestep t: uniformly (Ho et al. 2020) or by importance (Improved DDPM).

Nichol & Dhariwal 2021 (arXiv:2102.09672, Sec. 3.3) note that the terms L_t of the bound differ by orders
of magnitude, so the uniform estimate T L_t of L_vlb is noisy. They draw t with

    L_vlb = E_{t ~ p_t}[L_t / p_t],   p_t ∝ sqrt(E[L_t^2]),   sum_t p_t = 1              (Eq. 18)

with E[L_t^2] estimated from the last 10 values of each term, and t uniform until every term has
them. As improved-diffusion's LossSecondMomentResampler does, a small uniform part is mixed in,
p = (1 - u) p_Eq18 + u / T with u = 0.001, so that no p_t is zero. A sample drawn with p_t has its loss
weighted by 1 / (T p_t): the weighted mean is then an unbiased estimate of the uniform mean, i.e. of
L_vlb / T (tests/test_resample.py checks it exactly and by Monte Carlo).

A sampler's `sample(rng, n)` returns (t, weights) (weights None: all ones); `update(t, losses)` takes the
whole global batch's t and per-sample losses (under MPI every rank passes the same gathered arrays, so
every rank holds the same history); `state_dict` is part of a training checkpoint.
May import: backend.
"""
import math

from . import backend

host = backend.host

TIMESTEP_SAMPLERS = ("uniform", "importance")


class UniformSampler:
    """t ~ Uniform({0, .., T - 1}): Algorithm 1, line 3 (code t = 0 is the paper's step 1)."""

    def __init__(self, num_timesteps):
        self.num_timesteps = int(num_timesteps)

    def sample(self, rng, n):
        return rng.integers(0, self.num_timesteps, (n,)), None

    def update(self, t, losses):
        """Nothing to learn."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        if state not in ({}, None):
            raise ValueError("a uniform timestep sampler has no state, but the checkpoint holds an importance "
                             "sampler's loss history")


class LossSecondMomentSampler:
    """Importance-sampled timesteps, p_t ∝ sqrt(E[L_t^2]) (Improved DDPM, Eq. 18).

    The history is a (T, K) table: row t holds the last K = history_per_term losses of term t, oldest
    first once full; counts[t] says how many it holds (at most K). Before every row is full, t is uniform.
    """

    def __init__(self, num_timesteps, history_per_term=10, uniform_prob=0.001):
        self.num_timesteps, self.history_per_term = int(num_timesteps), int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self.history = host.zeros((self.num_timesteps, self.history_per_term), dtype=host.float64)
        self.counts = host.zeros(self.num_timesteps, dtype=host.int64)

    def warmed_up(self):
        return bool((self.counts == self.history_per_term).all())

    def probabilities(self):
        """p_t (float64, (T,), summing to 1): uniform until warmed up, then Eq. 18 with the uniform mix."""
        T = self.num_timesteps
        if not self.warmed_up():
            return host.full(T, 1.0 / T)
        w = host.sqrt((self.history ** 2).mean(axis=1))                                  # sqrt(E[L_t^2])
        total = w.sum()
        if not total > 0 or not math.isfinite(total):   # all zero losses: nothing to prefer
            return host.full(T, 1.0 / T)
        return (1.0 - self.uniform_prob) * (w / total) + self.uniform_prob / T

    def sample(self, rng, n):
        """t ~ p_t by the inverse CDF of one uniform draw (a sharded generator gives each MPI rank its rows
        of the one global draw), and the weights 1 / (T p_t) that keep the loss unbiased."""
        u = rng.uniform((n,), dtype=host.float64)
        xp = backend.xp_of(u)
        p = self.probabilities()
        cdf = host.cumsum(p)
        t = host.minimum(host.searchsorted(cdf, backend.to_numpy(u), side="right"), self.num_timesteps - 1)
        weights = 1.0 / (self.num_timesteps * p[t])
        return xp.asarray(t.astype(host.int64)), xp.asarray(weights.astype(backend.DTYPE))

    def update(self, t, losses):
        """Append each loss to its term's history, in batch order (a term seen k times keeps its last K)."""
        t = host.asarray(backend.to_numpy(t), dtype=host.int64).reshape(-1)
        losses = host.asarray(backend.to_numpy(losses), dtype=host.float64).reshape(-1)
        if t.shape != losses.shape:
            raise ValueError(f"update needs one loss per timestep, got {t.shape[0]} timesteps and "
                             f"{losses.shape[0]} losses")
        if t.size and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in 0 .. {self.num_timesteps - 1}, got {t.min()} .. {t.max()}")
        if not host.isfinite(losses).all():   # a NaN would make the saved history unloadable
            raise ValueError("the losses must be finite to learn p_t from them")
        K = self.history_per_term
        for step, loss in zip(t.tolist(), losses.tolist()):   # a batch's worth: T-independent and cheap
            if self.counts[step] == K:
                self.history[step, :-1] = self.history[step, 1:]
                self.history[step, -1] = loss
            else:
                self.history[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self):
        return {"history": self.history.copy(), "counts": self.counts.copy()}

    def load_state_dict(self, state):
        if not isinstance(state, dict) or set(state) != {"history", "counts"}:
            raise ValueError("an importance sampler's state must hold 'history' and 'counts' (this checkpoint was "
                             "trained with another --timestep-sampler, or is corrupt)")
        history, counts = state["history"], state["counts"]
        shape = (self.num_timesteps, self.history_per_term)
        if not backend.is_array(history) or history.shape != shape or history.dtype.kind != "f":
            raise ValueError(f"the loss history must be a float array of shape {list(shape)}")
        if not backend.is_array(counts) or counts.shape != (self.num_timesteps,) or counts.dtype.kind not in "iu":
            raise ValueError(f"the history counts must be {self.num_timesteps} whole numbers")
        history, counts = host.asarray(history, dtype=host.float64), host.asarray(counts, dtype=host.int64)
        if not host.isfinite(history).all():
            raise ValueError("the loss history holds NaN or infinite losses")
        if (counts < 0).any() or (counts > self.history_per_term).any():
            raise ValueError(f"the history counts must lie in 0 .. {self.history_per_term}")
        self.history, self.counts = history.copy(), counts.copy()


def make_timestep_sampler(name, num_timesteps):
    """The timestep sampler called `name` ("uniform" or "importance") for a chain of num_timesteps steps."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "importance":
        return LossSecondMomentSampler(num_timesteps)
    raise ValueError(f"unknown timestep sampler {name!r}: use one of {', '.join(TIMESTEP_SAMPLERS)}")
