"""Timestep samplers: uniform t (Algorithm 1) and Improved DDPM's importance sampling (Eq. 18).

Against independent slow references: a deque of the last K losses per t for the history, the
exact expectation and a Monte-Carlo estimate for unbiasedness, frequencies for the draws, and the
1-rank draw for the MPI ranks' shares.
"""
import collections
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff import backend, distributed
from minidiff.resample import (TIMESTEP_SAMPLERS, LossSecondMomentSampler, UniformSampler,
                               make_timestep_sampler)


def slow_probabilities(T, K, updates, uniform_prob=0.001):
    """p_t from the updates (lists of (t, loss)), with a deque of the last K losses per t."""
    rings = [collections.deque(maxlen=K) for _ in range(T)]
    for t, loss in updates:
        rings[t].append(loss)
    if any(len(r) < K for r in rings):
        return [1.0 / T] * T
    w = [math.sqrt(sum(v * v for v in r) / K) for r in rings]
    total = sum(w)
    return [(1 - uniform_prob) * wt / total + uniform_prob / T for wt in w]


def warmed_up(T, losses, K=10):
    """A warmed-up sampler whose history holds K copies of each L_t (so sqrt(E[L_t^2]) = L_t)."""
    sampler = LossSecondMomentSampler(T, K)
    t = np.repeat(np.arange(T), K)
    sampler.update(t, np.repeat(np.asarray(losses, dtype=np.float64), K))
    return sampler


def test_the_uniform_sampler_is_algorithm_1s_line_3():
    t, weights = UniformSampler(50).sample(backend.Generator(3), 64)
    np.testing.assert_array_equal(backend.to_numpy(t), backend.to_numpy(backend.Generator(3).integers(0, 50, (64,))))
    assert weights is None
    assert UniformSampler(50).state_dict() == {}


def test_importance_sampling_is_uniform_until_every_term_has_its_history():
    T, K = 6, 3
    sampler = LossSecondMomentSampler(T, K)
    sampler.update(np.repeat(np.arange(T - 1), K), np.arange((T - 1) * K, dtype=float) + 1)   # all but the last t
    sampler.update(np.array([T - 1, T - 1]), np.array([5.0, 7.0]))                            # K - 1 values
    assert not sampler.warmed_up()
    np.testing.assert_array_equal(sampler.probabilities(), np.full(T, 1 / T))
    _, weights = sampler.sample(backend.Generator(0), 100)
    np.testing.assert_array_equal(backend.to_numpy(weights), np.ones(100, np.float32))
    sampler.update(np.array([T - 1]), np.array([9.0]))
    assert sampler.warmed_up() and not np.allclose(sampler.probabilities(), 1 / T)


@settings(deadline=None, max_examples=40)
@given(st.integers(2, 8), st.integers(1, 4),
       st.lists(st.lists(st.tuples(st.integers(0, 7), st.floats(0.0, 1e3)), min_size=1, max_size=30), min_size=1,
                max_size=6))
def test_p_t_is_the_root_mean_square_of_the_last_k_losses(T, K, batches):
    """Eq. 18 with the 0.001 uniform mix, the history in batch order: a t seen more than K times keeps its last K."""
    sampler = LossSecondMomentSampler(T, K)
    seen = []
    for batch in batches:
        batch = [(t % T, loss) for t, loss in batch]
        seen += batch
        sampler.update(np.array([t for t, _ in batch]), np.array([loss for _, loss in batch]))
        expected = slow_probabilities(T, K, seen)
        np.testing.assert_allclose(sampler.probabilities(), expected, rtol=1e-12, atol=1e-15)
    assert sampler.probabilities().sum() == pytest.approx(1.0, abs=1e-12)


def test_a_term_seen_many_times_in_one_batch_keeps_only_its_last_k_values():
    sampler = LossSecondMomentSampler(2, 3)
    sampler.update(np.array([0] * 7 + [1] * 3), np.array([100.0, 100, 100, 100, 1, 2, 3, 4, 4, 4]))
    np.testing.assert_array_equal(sampler.state_dict()["history"][0], [1, 2, 3])
    w0, w1 = math.sqrt((1 + 4 + 9) / 3), 4.0
    assert sampler.probabilities()[0] == pytest.approx(0.999 * w0 / (w0 + w1) + 0.0005, rel=1e-12)


@settings(deadline=None, max_examples=60)
@given(st.integers(2, 12), st.data())
def test_the_reweighted_loss_is_an_unbiased_estimate_of_the_uniform_bound(T, data):
    """sum_t p_t * L_t / (T p_t) = mean_t L_t exactly, for any warmed-up history, with the weights sample() returns."""
    losses = np.array(data.draw(st.lists(st.floats(1e-6, 1e6), min_size=T, max_size=T)))
    sampler = warmed_up(T, data.draw(st.lists(st.floats(1e-6, 1e6), min_size=T, max_size=T)))
    p = sampler.probabilities()
    t, weights = sampler.sample(backend.Generator(data.draw(st.integers(0, 2 ** 32))), 4000)
    t, weights = backend.to_numpy(t), backend.to_numpy(weights).astype(np.float64)
    np.testing.assert_allclose(weights, 1.0 / (T * p[t]), rtol=1e-6)   # float32 weights
    estimate = sum(p[s] * losses[s] / (T * p[s]) for s in range(T))
    assert estimate == pytest.approx(losses.mean(), rel=1e-12)


def test_the_weighted_mean_of_many_draws_is_the_uniform_mean():
    """Monte Carlo, fixed seed: L_t spanning three orders of magnitude; within 4 standard errors, and with a
    smaller spread than uniform sampling's (the point of Eq. 18)."""
    T = 50
    L = np.geomspace(1e-3, 1.0, T)[::-1]          # the first terms dominate, as the bound's do
    sampler = warmed_up(T, L)
    t, w = sampler.sample(backend.Generator(1), 200_000)
    est = backend.to_numpy(w).astype(np.float64) * L[backend.to_numpy(t)]
    assert abs(est.mean() - L.mean()) < 4 * est.std() / math.sqrt(len(est))
    assert est.std() < 0.5 * L.std()


def test_the_draws_follow_p_t():
    T = 8
    sampler = warmed_up(T, np.arange(1, T + 1, dtype=float) ** 2)
    t, _ = sampler.sample(backend.Generator(2), 100_000)
    freq = np.bincount(backend.to_numpy(t), minlength=T) / 100_000
    p = sampler.probabilities()
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / 100_000).max())


def test_state_round_trips_and_the_next_draws_are_equal():
    a = LossSecondMomentSampler(5, 2)
    rng = np.random.default_rng(0)
    a.update(rng.integers(0, 5, 40), rng.uniform(0, 3, 40))
    state = a.state_dict()
    assert state["history"].dtype == np.float64 and state["history"].shape == (5, 2)
    assert state["counts"].dtype == np.int64 and state["counts"].shape == (5,)
    b = LossSecondMomentSampler(5, 2)
    b.load_state_dict(state)
    np.testing.assert_array_equal(a.probabilities(), b.probabilities())
    for x, y in zip(a.sample(backend.Generator(4), 9), b.sample(backend.Generator(4), 9)):
        np.testing.assert_array_equal(backend.to_numpy(x), backend.to_numpy(y))
    state["history"][0, 0] = 99.0
    assert a.state_dict()["history"][0, 0] != 99.0   # a copy, not a view of the live history


@pytest.mark.parametrize("change, match", [
    (lambda s: s.update(history=np.zeros((4, 2))), "shape"),
    (lambda s: s.update(counts=np.full(5, 3)), "counts must lie in 0 .. 2"),
    (lambda s: s["history"].__setitem__((0, 0), np.nan), "NaN or infinite"),
    (lambda s: s.pop("counts"), "must hold 'history' and 'counts'"),
    (lambda s: s.update(counts=np.zeros(5)), "whole numbers"),
])
def test_corrupt_states_are_refused(change, match):
    state = LossSecondMomentSampler(5, 2).state_dict()
    change(state)
    with pytest.raises(ValueError, match=match):
        LossSecondMomentSampler(5, 2).load_state_dict(state)


def test_a_state_of_the_other_sampler_is_refused():
    with pytest.raises(ValueError, match="must hold 'history' and 'counts'"):
        LossSecondMomentSampler(5).load_state_dict({})
    with pytest.raises(ValueError, match="no state"):
        UniformSampler(5).load_state_dict(LossSecondMomentSampler(5).state_dict())


def test_each_mpi_rank_draws_its_rows_of_the_one_process_draw():
    """With a sharded generator (distributed.World.sharded), rank r's t and weights are rows [r n, (r + 1) n)
    of the 1-process draw of 2 n: the same t for each row of the global batch whatever the rank count."""
    sampler = warmed_up(7, np.linspace(0.1, 3.0, 7))
    whole_t, whole_w = sampler.sample(backend.Generator(11), 12)
    parts = [sampler.sample(distributed.ShardedGenerator(backend.Generator(11), r, 2), 6) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([backend.to_numpy(p[0]) for p in parts]), backend.to_numpy(whole_t))
    np.testing.assert_array_equal(np.concatenate([backend.to_numpy(p[1]) for p in parts]), backend.to_numpy(whole_w))


def test_make_timestep_sampler_by_name():
    assert isinstance(make_timestep_sampler("uniform", 10), UniformSampler)
    assert isinstance(make_timestep_sampler("importance", 10), LossSecondMomentSampler)
    assert TIMESTEP_SAMPLERS == ("uniform", "importance")
    with pytest.raises(ValueError, match="use one of uniform, importance"):
        make_timestep_sampler("often", 10)
