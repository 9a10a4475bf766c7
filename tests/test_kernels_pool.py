"""The thread pool (kernels/pool.py): chunking, ordering, errors, `split`, and 1 vs n threads giving the same results."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minidiff import Tensor, backend, functional as F
from minidiff.kernels import pool
from minidiff.unet import UNet


@pytest.fixture
def threads(monkeypatch):
    """set(n) switches the pool to n threads with no size threshold; the old count is restored after."""
    old = pool.get_num_threads()
    monkeypatch.setattr(pool, "MIN_PARALLEL_SIZE", 0)  # tests' arrays are small: chunk them anyway
    yield pool.set_num_threads
    pool.set_num_threads(old)


@given(st.integers(0, 200), st.integers(1, 9))
def test_chunks_cover_the_range_in_order(n, parts):
    bounds = pool.chunks(n, parts)
    if n == 0:
        assert bounds == [(0, 0)]
        return
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a < b for a, b in bounds)                               # none empty
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))   # contiguous
    sizes = [b - a for a, b in bounds]
    assert len(bounds) == min(parts, n) and max(sizes) - min(sizes) <= 1


def test_parallel_for_returns_chunk_results_in_order_and_uses_other_threads(threads):
    threads(3)
    seen = []
    out = pool.parallel_for(10, lambda a, b: (seen.append(threading.get_ident()), (a, b))[1])
    assert out == [(0, 4), (4, 7), (7, 10)]
    assert len(set(seen)) == 3 and threading.get_ident() in seen      # the caller runs the first chunk


def test_one_thread_is_one_plain_call(threads):
    threads(1)
    assert pool.parallel_for(10, lambda a, b: (a, b, threading.get_ident())) == [(0, 10, threading.get_ident())]


def test_an_error_in_a_chunk_is_raised_after_every_chunk_finished(threads):
    threads(2)
    done = []

    def fn(a, b):
        if a > 0:
            raise KeyError("chunk two failed")
        done.append(a)
        return a

    with pytest.raises(KeyError, match="chunk two failed"):
        pool.parallel_for(4, fn)
    assert done == [0]
    assert pool.parallel_for(4, lambda a, b: b - a) == [2, 2]       # the pool still works afterwards


def test_nested_calls_run_their_chunks_serially_in_the_calling_thread(threads):
    """Same chunks (so the same sums) as a top-level call, but no hand-off: the pool is busy."""
    threads(2)

    def outer(a, b):
        me = threading.get_ident()
        return pool.parallel_for(6, lambda c, d: (c, d, threading.get_ident() == me))

    assert pool.parallel_for(4, outer) == [[(0, 3, True), (3, 6, True)]] * 2


def test_bad_thread_counts_are_refused():
    with pytest.raises(ValueError, match="positive"):
        pool.set_num_threads(0)
    env = dict(os.environ, MINIDIFF_NUM_THREADS="two")
    proc = subprocess.run([sys.executable, "-c", "from minidiff.kernels import pool; pool.get_num_threads()"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "MINIDIFF_NUM_THREADS must be a positive integer" in proc.stderr


def _run(fn, n_threads, threads):
    threads(n_threads)
    return fn()


def _grads_of(loss_fn, *arrays):
    ts = [Tensor(a, requires_grad=True) for a in arrays]
    out = loss_fn(*ts)
    out.backward(backend.xp().asarray(np.random.default_rng(1).standard_normal(out.shape).astype(out.data.dtype)))
    return [out.numpy()] + [t.grad for t in ts]


def _assert_same(one, many, tol=1e-5, scale=None):
    """Each array equal up to tol times its largest entry (or `scale`): float32 summation-order error
    (eps 6e-8 times the square root of a sum's length, with margin), far below a wrong index or a lost chunk."""
    for a, b in zip(one, many):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=0, atol=tol * (scale or float(np.abs(a).max())))


# float32: the chunked ops compute the same products per image; only the weight gradient's sum over the
# batch is split into per-chunk partial sums, so 1 and n threads differ by float32 reduction order.
OPS = {
    "conv3x3": (lambda x, w, b: F.conv2d(x, w, b, padding=1), [(5, 3, 6, 7), (4, 3, 3, 3), (4,)]),
    "conv3x3_stride2": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), [(5, 3, 6, 7), (4, 3, 3, 3), (4,)]),
    "conv1x1": (lambda x, w, b: F.conv2d(x, w, b), [(5, 3, 6, 7), (4, 3, 1, 1), (4,)]),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), [(5, 4, 6, 7), (4,), (4,)]),
    "silu": (lambda x: F.silu(x), [(5, 4, 6, 7)]),
    "linear": (lambda x, w, b: F.linear(x, w, b), [(5, 7, 6), (3, 6), (3,)]),
    "attention": (lambda q, k, v: F.attention(q, k, v), [(5, 12, 4), (5, 12, 4), (5, 12, 3)]),
    "group_norm_silu": (lambda x, w, b: F.group_norm(x, 2, w, b, silu=True), [(5, 4, 6, 7), (4,), (4,)]),
    "add": (lambda a, b: a + b, [(5, 4, 6, 7), (5, 4, 6, 7)]),
    "add_per_channel": (lambda a, b: a + b, [(5, 4, 6, 7), (5, 4, 1, 1)]),    # the timestep projection's add
}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("n_threads", [2, 3])
def test_ops_agree_between_one_and_n_threads(name, n_threads, threads):
    fn, shapes = OPS[name]
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    one = _run(lambda: _grads_of(fn, *arrays), 1, threads)
    many = _run(lambda: _grads_of(fn, *arrays), n_threads, threads)
    _assert_same(one, many)


def test_channels_last_inputs_agree_between_one_and_two_threads(threads):
    """conv2d returns channels-last views; group norm and SiLU chunk those along the batch too."""
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((4, 3, 5, 5)).astype(np.float32), rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    fn = lambda x, w: F.silu(F.group_norm(F.conv2d(x, w, padding=1), 3)) + x[:, :1]   # noqa: E731
    _assert_same(_run(lambda: _grads_of(fn, x, w), 1, threads), _run(lambda: _grads_of(fn, x, w), 2, threads))


def test_unet_training_gradients_agree_between_one_and_two_threads(threads):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    t = np.array([1, 500, 999])

    def step():
        backend.manual_seed(0)
        model = UNet(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
        for p in model.parameters():  # the DDPM init zeroes output layers: random weights give every path a gradient
            p.data[...] = backend.xp().asarray(rng.standard_normal(p.shape).astype(np.float32) * 0.2)
        out = model(Tensor(x), t)
        (out * out).mean().backward()
        return [out.numpy()] + [p.grad for p in model.parameters()]

    rng = np.random.default_rng(3)
    one = _run(step, 1, threads)
    rng = np.random.default_rng(3)
    many = _run(step, 2, threads)
    # some gradients are zero in exact arithmetic (a conv bias followed by group norm) and hold only
    # rounding: compare every gradient at the scale of the largest, as the torch conformance check does
    _assert_same(one[:1], many[:1])
    _assert_same(one[1:], many[1:], scale=max(float(np.abs(g).max()) for g in one[1:]))


def test_adam_and_ema_updates_are_bitwise_the_same_on_one_and_three_threads(threads):
    """The flat-buffer updates are elementwise: chunking them changes no bit."""
    from minidiff.optim import EMA, Adam
    from minidiff import kernels
    assert kernels.enabled()

    def run():
        backend.manual_seed(0)
        model = UNet(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
        opt, ema = Adam(model.parameters(), lr=1e-3, grad_clip=1.0, weight_decay=0.01), EMA(model, decay=0.9)
        rng = np.random.default_rng(4)
        for _ in range(3):
            for p in model.parameters():
                p.grad = backend.xp().asarray(rng.standard_normal(p.shape).astype(np.float32))
            opt.step()
            ema.update(model)
        return [p.data.copy() for p in model.parameters()] + [ema.flat_shadow.copy()]

    one, many = _run(run, 1, threads), _run(run, 3, threads)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


def test_blas_is_single_threaded_inside_a_multi_thread_pool_and_restored_with_one(threads):
    from threadpoolctl import ThreadpoolController
    blas = ThreadpoolController().select(user_api="blas")
    threads(1)
    before = [lib.num_threads for lib in blas.lib_controllers]
    blas.limit(limits=2)  # what a user's OPENBLAS_NUM_THREADS=2 would give
    threads(2)
    assert [lib.num_threads for lib in ThreadpoolController().select(user_api="blas").lib_controllers] == \
        [1] * len(before)
    threads(1)  # back to the count BLAS had before the pool first limited it
    assert [lib.num_threads for lib in ThreadpoolController().select(user_api="blas").lib_controllers] == before


def test_threads_for_splits_only_work_worth_a_hand_off():
    old = pool.get_num_threads()
    pool.set_num_threads(3)
    try:
        small = np.zeros(pool.MIN_PARALLEL_SIZE // 2, np.float32)
        assert pool.threads_for(small) == 1                                   # a cheap elementwise pass
        assert pool.threads_for(small, size=pool.MIN_PARALLEL_SIZE) == 3  # its declared work is large
        assert pool.threads_for(small, macs=pool.MIN_PARALLEL_MACS) == 3  # a matrix product's is
        assert pool.threads_for(small, macs=pool.MIN_PARALLEL_MACS - 1) == 1
        assert pool.threads_for(np.zeros(pool.MIN_PARALLEL_SIZE, np.float32)) == 3
    finally:
        pool.set_num_threads(old)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_split_writes_rows_into_one_output_and_adds_the_partial_sums_in_order(n_threads, threads):
    """pool.split: row results land in their rows (copied when a chunk returns a new array, not its
    view), sums add up over the chunks, None outputs stay None, and one chunk returns its own arrays."""
    threads(n_threads)
    x = np.arange(12.0).reshape(6, 2)
    seen = []

    def chunk(a, b, doubled, unused, tripled_rows):
        seen.append((a, b))
        d = np.multiply(x[a:b], 2, out=doubled)                # written into its view when there is one
        tripled = x[a:b].repeat(2, axis=0) * 3                  # a fresh array: split copies it into place
        return d, None, tripled, x[a:b].sum(axis=0), None

    doubled, unused, tripled, total, nothing = pool.split(
        np, 6, chunk, n_threads, rows=[((6, 2), np.float64), None, ((12, 2), np.float64)], sums=2)
    np.testing.assert_array_equal(doubled, 2 * x)
    np.testing.assert_array_equal(tripled, 3 * x.repeat(2, axis=0))
    np.testing.assert_array_equal(total, x.sum(axis=0))
    assert unused is None and nothing is None
    assert sorted(seen) == pool.chunks(6, n_threads)


def test_split_checks_the_chunk_returns_what_it_declared():
    with pytest.raises(AssertionError, match="returned 1 results, not 1 \\+ 1"):
        pool.split(np, 4, lambda a, b, out: np.zeros(b - a), 1, rows=[((4,), np.float64)], sums=1)
