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

from minidiff import backend, checkpoint, distributed
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
    if total == 0:   # every loss zero: nothing to prefer
        return [1.0 / T] * T
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


# ---------------------------------------------------------------- more: exact inverse CDF, states, MPI shares


class FixedUniforms:
    """A stand-in generator whose uniform draw is the given numbers (to aim sample()'s inverse CDF at each t)."""

    def __init__(self, u):
        self.u = np.asarray(u, dtype=np.float64)

    def uniform(self, shape, low=0.0, high=1.0, dtype=np.float64, like=None):
        assert tuple(shape) == self.u.shape and (low, high) == (0.0, 1.0)
        return self.u.astype(dtype)


def slow_cdf_midpoints(p):
    """For each t, a uniform number inside [p_0 + .. + p_{t-1}, p_0 + .. + p_t), by a plain running sum."""
    mids, below = [], 0.0
    for pt in p:
        mids.append(below + pt / 2)
        below += pt
    return mids


def random_history(T, K, data, low=1e-6, high=1e6):
    """A warmed-up sampler fed K random positive losses per t in a shuffled order, and the list of updates."""
    updates = [(t, data.draw(st.floats(low, high))) for t in range(T) for _ in range(K)]
    updates = data.draw(st.permutations(updates))
    sampler = LossSecondMomentSampler(T, K)
    sampler.update(np.array([t for t, _ in updates]), np.array([loss for _, loss in updates]))
    return sampler, updates


@pytest.mark.parametrize("T", [1, 2, 7, 49, 1000])   # 49 * (1 / 49) != 1 in float64
def test_a_fresh_sampler_is_uniform_with_unit_weights(T):
    """No history at all: p_t = 1 / T exactly and every weight is exactly 1 (the Ho et al. loss, unweighted)."""
    sampler = LossSecondMomentSampler(T)
    assert not sampler.warmed_up()
    p = sampler.probabilities()
    assert p.dtype == np.float64 and p.shape == (T,)
    np.testing.assert_array_equal(p, np.full(T, 1.0 / T))
    t, w = sampler.sample(backend.Generator(5), 257)
    t, w = backend.to_numpy(t), backend.to_numpy(w)
    assert t.dtype == np.int64 and w.dtype == backend.DTYPE and t.shape == w.shape == (257,)
    assert ((0 <= t) & (t < T)).all()
    np.testing.assert_array_equal(w, np.ones(257, dtype=backend.DTYPE))


@settings(deadline=None, max_examples=40)
@given(st.integers(2, 6), st.integers(1, 3), st.floats(0.0, 1.0),
       st.lists(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([0.0, 1e-3, 0.5, 2.0, 7.0])), min_size=1,
                         max_size=25), min_size=1, max_size=5))
def test_p_t_for_any_uniform_mix_and_repeated_terms(T, K, u, batches):
    """Eq. 18 mixed with any u in [0, 1] (u = 1: uniform), with zero losses allowed and terms repeated past K
    within a batch, equals the deque reference after every batch."""
    sampler = LossSecondMomentSampler(T, K, uniform_prob=u)
    seen = []
    for batch in batches:
        batch = [(t % T, loss) for t, loss in batch]
        seen += batch
        sampler.update(np.array([t for t, _ in batch]), np.array([loss for _, loss in batch]))
        np.testing.assert_allclose(sampler.probabilities(), slow_probabilities(T, K, seen, u), rtol=1e-12, atol=1e-15)
        assert sampler.warmed_up() == all(sum(1 for s, _ in seen if s == t) >= K for t in range(T))


def test_one_batch_far_longer_than_the_history():
    """One term seen 3K + 2 times in one batch, interleaved with the other: only its last K values count."""
    K = 4
    t = np.array([0, 1] * (3 * K + 2))
    losses = np.arange(len(t), dtype=np.float64) + 1.0
    sampler = LossSecondMomentSampler(2, K)
    sampler.update(t, losses)
    np.testing.assert_array_equal(sampler.state_dict()["counts"], [K, K])
    np.testing.assert_array_equal(sampler.state_dict()["history"][0], losses[t == 0][-K:])   # oldest first
    np.testing.assert_allclose(sampler.probabilities(), slow_probabilities(2, K, zip(t.tolist(), losses.tolist())),
                               rtol=1e-12)


def test_update_needs_one_loss_per_timestep():
    sampler = LossSecondMomentSampler(3, 2)
    with pytest.raises(ValueError, match="got 3 timesteps and 2 losses"):
        sampler.update(np.array([0, 1, 2]), np.array([1.0, 2.0]))
    np.testing.assert_array_equal(sampler.state_dict()["counts"], [0, 0, 0])
    sampler.update(np.array([[0, 1], [2, 0]]), np.array([[1.0, 2.0], [3.0, 4.0]]))   # flattened in C order
    np.testing.assert_array_equal(sampler.state_dict()["history"], [[1.0, 4.0], [2.0, 0.0], [3.0, 0.0]])


@settings(deadline=None, max_examples=40)
@given(st.integers(1, 12), st.integers(1, 5), st.data())
def test_sample_is_the_inverse_cdf_and_its_weights_make_the_loss_unbiased(T, K, data):
    """Aimed at every t in turn (a uniform number inside t's CDF interval, from a plain running sum of the
    reference p_t), sample() returns that t and the weight 1 / (T p_t); with these returned weights
    sum_t p_t w_t L_t = mean_t L_t for random positive losses, to float32's rounding of w (the terms are
    positive, so the relative error is at most 2^-24), and exactly (1e-12) with the reference's float64 weights."""
    sampler, updates = random_history(T, K, data)
    p_ref = slow_probabilities(T, K, updates)
    np.testing.assert_allclose(sampler.probabilities(), p_ref, rtol=1e-12)
    t, w = sampler.sample(FixedUniforms(slow_cdf_midpoints(p_ref)), T)
    t, w = backend.to_numpy(t), backend.to_numpy(w).astype(np.float64)
    np.testing.assert_array_equal(t, np.arange(T))
    np.testing.assert_allclose(w, [1.0 / (T * pt) for pt in p_ref], rtol=2.0 ** -24)
    L = data.draw(st.lists(st.floats(1e-6, 1e6), min_size=T, max_size=T))
    uniform_mean = math.fsum(L) / T
    assert math.fsum(p_ref[s] * w[s] * L[s] for s in range(T)) == pytest.approx(uniform_mean, rel=2.0 ** -24 + 1e-12)
    assert math.fsum(p_ref[s] * (1.0 / (T * p_ref[s])) * L[s] for s in range(T)) == pytest.approx(uniform_mean,
                                                                                                   rel=1e-12)


def test_the_inverse_cdf_at_the_interval_ends():
    """u = 0 is term 0; u just below 1 (or past a last CDF value rounded below 1) is the last term, never T."""
    sampler = warmed_up(5, [1.0, 2.0, 3.0, 4.0, 5.0])
    t, w = sampler.sample(FixedUniforms([0.0, np.nextafter(1.0, 0.0), 1.0]), 3)
    np.testing.assert_array_equal(backend.to_numpy(t), [0, 4, 4])
    assert np.isfinite(backend.to_numpy(w)).all()


def test_the_draws_pass_a_chi_square_test():
    """100k draws, fixed seed, strongly non-uniform p_t over T = 8: Pearson's statistic below the 0.1% critical
    value of chi^2 with 7 degrees of freedom (24.32); the same counts against uniform p are far above it."""
    T, n = 8, 100_000
    sampler = warmed_up(T, np.geomspace(1.0, 100.0, T))
    p = np.array(slow_probabilities(T, 10, [(t, loss) for t, loss in enumerate(np.geomspace(1.0, 100.0, T))
                                            for _ in range(10)]))
    counts = np.bincount(backend.to_numpy(sampler.sample(backend.Generator(9), n)[0]), minlength=T)
    assert ((counts - n * p) ** 2 / (n * p)).sum() < 24.32
    q = np.full(T, 1.0 / T)
    assert ((counts - n * q) ** 2 / (n * q)).sum() > 1000


def test_the_state_survives_a_checkpoint_file(tmp_path):
    """history (float64, (T, K)) and counts (int64, (T,)) through checkpoint.save / load: the same p_t and the
    same next draws from identically seeded generators; a half-warmed state keeps its counts."""
    a = LossSecondMomentSampler(6, 3)
    a.update(np.array([0, 1, 2, 3, 4, 5] * 3 + [2, 2]), np.linspace(0.5, 9.0, 20))
    half = LossSecondMomentSampler(6, 3)
    half.update(np.array([0, 0, 1]), np.array([1.0, 2.0, 3.0]))
    path = tmp_path / "sampler.safetensors"
    checkpoint.save(path, {"format": "test-resample", "timestep_sampler": a.state_dict(),
                           "half": half.state_dict()})
    loaded = checkpoint.load(path)
    for sampler, state in ((a, loaded["timestep_sampler"]), (half, loaded["half"])):
        assert state["history"].dtype == np.float64 and state["history"].shape == (6, 3)
        assert state["counts"].dtype == np.int64 and state["counts"].shape == (6,)
        b = LossSecondMomentSampler(6, 3)
        b.load_state_dict(state)
        assert b.warmed_up() == sampler.warmed_up()
        np.testing.assert_array_equal(b.probabilities(), sampler.probabilities())
        for x, y in zip(sampler.sample(backend.Generator(8), 33), b.sample(backend.Generator(8), 33)):
            np.testing.assert_array_equal(backend.to_numpy(x), backend.to_numpy(y))
        sampler.update(np.array([0]), np.array([50.0]))   # both continue alike
        b.update(np.array([0]), np.array([50.0]))
        np.testing.assert_array_equal(b.state_dict()["history"], sampler.state_dict()["history"])


@pytest.mark.parametrize("change, match", [
    (lambda s: s.update(history=np.zeros((5, 3))), "shape"),                 # another history_per_term
    (lambda s: s.update(history=np.zeros((6, 2))), "shape"),                 # another T
    (lambda s: s.update(history=np.zeros((5, 2), dtype=np.int64)), "float array"),
    (lambda s: s.update(history=[[0.0, 0.0]] * 5), "float array"),           # not an array
    (lambda s: s["history"].__setitem__((2, 1), np.inf), "NaN or infinite"),
    (lambda s: s["history"].__setitem__((4, 0), -np.inf), "NaN or infinite"),
    (lambda s: s.update(counts=np.array([0, 0, -1, 0, 0])), "counts must lie in 0 .. 2"),
    (lambda s: s.update(counts=np.zeros(4, dtype=np.int64)), "whole numbers"),
    (lambda s: s.update(counts=np.zeros(5, dtype=bool)), "whole numbers"),
    (lambda s: s.pop("history"), "must hold 'history' and 'counts'"),
    (lambda s: s.update(extra=np.zeros(1)), "must hold 'history' and 'counts'"),
])
def test_more_corrupt_states_are_refused_and_leave_the_sampler_as_it_was(change, match):
    sampler = LossSecondMomentSampler(5, 2)
    sampler.update(np.repeat(np.arange(5), 2), np.arange(10.0) + 1)
    before = sampler.state_dict()
    state = sampler.state_dict()
    change(state)
    with pytest.raises(ValueError, match=match):
        sampler.load_state_dict(state)
    np.testing.assert_array_equal(sampler.state_dict()["history"], before["history"])
    np.testing.assert_array_equal(sampler.state_dict()["counts"], before["counts"])


@pytest.mark.parametrize("state", [None, [], {}, {"history": None}])
def test_an_importance_sampler_refuses_what_is_not_its_state(state):
    with pytest.raises(ValueError, match="must hold 'history' and 'counts'"):
        LossSecondMomentSampler(5).load_state_dict(state)


def test_a_uniform_sampler_takes_only_an_empty_state():
    UniformSampler(5).load_state_dict({})
    UniformSampler(5).load_state_dict(None)
    with pytest.raises(ValueError, match="no state"):
        UniformSampler(5).load_state_dict({"history": np.zeros((5, 10))})


@pytest.mark.parametrize("n", [1, 5, 6])
@pytest.mark.parametrize("warm", [True, False])
def test_two_ranks_draw_the_one_process_rows_and_end_on_its_stream(n, warm):
    """Two separately made, identically seeded sharded generators (ranks 0 and 1 of 2): the concatenated
    (t, weights) are the 1-process draw of 2 n, warmed up (Eq. 18) or not, and two successive draws stay
    aligned because every rank's stream advances as the 1-process one does."""
    sampler = warmed_up(9, np.geomspace(1e-3, 1.0, 9)) if warm else LossSecondMomentSampler(9)
    whole = backend.Generator(21)
    want = [sampler.sample(whole, 2 * n) for _ in range(2)]
    ranks = [distributed.ShardedGenerator(backend.Generator(21), r, 2) for r in range(2)]
    got = [[sampler.sample(g, n) for _ in range(2)] for g in ranks]
    for draw in range(2):
        for k in range(2):   # t, then weights
            np.testing.assert_array_equal(np.concatenate([backend.to_numpy(got[r][draw][k]) for r in range(2)]),
                                          backend.to_numpy(want[draw][k]))
    if warm and n > 1:   # the rows are not all one t: the comparison sees the inverse CDF at work
        assert len(set(backend.to_numpy(want[0][0]).tolist())) > 1


def test_make_timestep_sampler_builds_the_paper_defaults():
    """"importance" is Improved DDPM's: K = 10 losses per term, u = 0.001; both samplers know T; an unknown name
    is a ValueError naming it and both choices."""
    s = make_timestep_sampler("importance", 37)
    assert (s.num_timesteps, s.history_per_term, s.uniform_prob) == (37, 10, 0.001)
    assert make_timestep_sampler("uniform", 37).num_timesteps == 37
    with pytest.raises(ValueError, match=r"unknown timestep sampler 'Uniform': use one of uniform, importance"):
        make_timestep_sampler("Uniform", 37)


def test_cdf_boundaries_belong_to_the_next_term_and_zero_probability_terms_are_never_drawn():
    """t is the term whose interval [p_0 + .. + p_{t-1}, p_0 + .. + p_t) holds u: at T = 4 before warm-up the CDF
    is 1/4, 1/2, 3/4, 1 exactly, so u = 1/4 is term 1 and the float just below it term 0. With u = 0 (no uniform
    mix) and zero losses for terms 0 and 2, p = (0, 1/2, 0, 1/2): no u, not even 0 or 1/2, draws a term of
    probability 0 (whose weight 1 / (T p_t) would be infinite)."""
    fresh = LossSecondMomentSampler(4)
    t, w = fresh.sample(FixedUniforms([0.0, 0.25, 0.5, 0.75, np.nextafter(0.25, 0.0), np.nextafter(1.0, 0.0)]), 6)
    np.testing.assert_array_equal(backend.to_numpy(t), [0, 1, 2, 3, 0, 3])
    np.testing.assert_array_equal(backend.to_numpy(w), np.ones(6))
    sparse = LossSecondMomentSampler(4, 1, uniform_prob=0.0)
    sparse.update(np.arange(4), np.array([0.0, 1.0, 0.0, 1.0]))
    np.testing.assert_array_equal(sparse.probabilities(), [0.0, 0.5, 0.0, 0.5])
    t, w = sparse.sample(FixedUniforms([0.0, 0.25, 0.5, np.nextafter(0.5, 0.0), 0.75]), 5)
    np.testing.assert_array_equal(backend.to_numpy(t), [1, 1, 3, 1, 3])
    np.testing.assert_array_equal(backend.to_numpy(w), np.full(5, 0.5))


def test_update_refuses_timesteps_outside_the_chain_and_non_finite_losses():
    sampler = LossSecondMomentSampler(4, 2)
    for t, losses, match in (([4], [1.0], "0 .. 3"), ([-1], [1.0], "0 .. 3"), ([0], [math.nan], "finite")):
        with pytest.raises(ValueError, match=match):
            sampler.update(np.array(t), np.array(losses))
    assert sampler.state_dict()["counts"].sum() == 0
