"""Measured kernel choices (kernels/tuning.py): the search, the cache, the file, and the convolution's plans
held to the math op (and their bits pinned where they must not change)."""
import json

import numpy as np
import pytest

from minidiff import Tensor, functional as F, kernels
from minidiff.kernels import conv as kconv, pool, tuning
from minidiff.kernels.tuning import Plan


@pytest.fixture
def tuning_mode():
    """Switch tuning for one test, and back to what it was (off in CI) afterwards."""
    previous = tuning.setting()
    yield tuning.set_tuning
    tuning.set_tuning(previous)


class FakeClock:
    """A clock that a fake op advances by its plan's cost, so the search's outcome is known in advance."""
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture(autouse=True)
def no_minimum(monkeypatch):
    """The fake ops below take 0.1-1 s; a test of the short-call rule sets its own minimum."""
    monkeypatch.setattr(tuning, "MIN_SECONDS", 0.0)


def drive(key, default, options, cost, calls=100):
    """Call tuning.run `calls` times with an op whose time is cost(plan); the plans it ran, in order."""
    clock, ran = FakeClock(), []

    def fn(plan):
        ran.append(plan)
        clock.now += cost(plan)
        return plan

    for _ in range(calls):
        assert tuning.run(key, default, options, fn, clock=clock) == ran[-1]
    return ran


def test_off_runs_the_fixed_rules_plan_and_times_nothing(tuning_mode):
    tuning_mode("off")
    default = Plan(algo="im2col", threads=2)
    ran = drive("off-key", default, [("algo", ("im2col", "winograd"))], lambda p: 1.0, calls=5)
    assert ran == [default] * 5 and tuning.searching() == 0 and "off-key" not in dict(
        (k, b) for k, b, _ in tuning.report())


def test_search_finds_the_fastest_plan_one_field_at_a_time(tuning_mode):
    tuning_mode("on")
    default = Plan(algo="im2col", block=2 << 20, threads=2)
    costs = {("im2col", 2): 1.0, ("winograd", 2): 0.5, ("winograd", 1): 0.7, ("im2col", 1): 0.1}

    def cost(p):
        return costs[p.algo, p.threads] * (0.8 if p.block == 1 << 19 else 1.0)

    options = [("algo", ("im2col", "winograd")), ("threads", (2, 1)), ("block", (2 << 20, 1 << 19))]
    ran = drive("search-key", default, options, cost)
    # warm-up calls run the default; then algo (winograd wins), threads (1 loses for winograd), block (512 KiB wins)
    assert ran[:tuning.WARMUP_CALLS] == [default] * tuning.WARMUP_CALLS
    best = Plan(algo="winograd", block=1 << 19, threads=2)
    assert ran[-1] == best and tuning.searching() == 0
    key, chosen, seconds = tuning.report()[-1]
    assert key == "search-key" and chosen == best and seconds[best] == pytest.approx(0.4)
    # each distinct candidate ran REPEATS times (coordinate search: im2col/1 thread is never tried)
    assert set(seconds) == {default, default._replace(algo="winograd"), Plan("winograd", threads=1),
                            best}
    searched = ran[tuning.WARMUP_CALLS:tuning.WARMUP_CALLS + len(seconds) * tuning.REPEATS]
    assert all(searched.count(p) == tuning.REPEATS for p in seconds)
    assert "search-key" in tuning.format_report() and best.label() in tuning.format_report()


def test_a_candidate_must_beat_the_incumbent_by_the_margin(tuning_mode):
    tuning_mode("on")
    default = Plan(algo="im2col")
    slightly = 1 - tuning.MARGIN / 2
    ran = drive("margin-key", default, [("algo", ("im2col", "winograd"))],
                lambda p: 1.0 if p.algo == "im2col" else slightly)
    assert ran[-1] == default   # noise-sized gains never replace the fixed rules


def test_calls_shorter_than_the_minimum_keep_the_fixed_rules(tuning_mode, monkeypatch):
    tuning_mode("on")
    monkeypatch.setattr(tuning, "MIN_SECONDS", 0.5)
    default = Plan(algo="im2col")
    ran = drive("short-key", default, [("algo", ("im2col", "winograd"))],
                lambda p: 0.4 if p.algo == "im2col" else 0.1, calls=20)
    assert ran == [default] * 20 and tuning.report()[-1][:2] == ("short-key", default)


def test_the_file_saves_choices_and_reuses_them_without_timing(tuning_mode, tmp_path):
    path = tmp_path / "sub" / "tuning.json"
    tuning_mode(str(path))
    default, fast = Plan(algo="im2col"), Plan(algo="winograd")
    options = [("algo", ("im2col", "winograd"))]
    drive("file-key", default, options, lambda p: 1.0 if p == default else 0.25)
    data = json.loads(path.read_text())
    entry = data["machines"][tuning.machine_key()]["file-key"]
    assert entry["plan"] == fast._asdict() and entry["ms"][fast.label()] == pytest.approx(250.0)
    # a new process (here: the setting read again) takes the saved choice at its first call
    tuning_mode(str(path))
    assert drive("file-key", default, options, lambda p: 1.0, calls=3) == [fast] * 3
    assert tuning.searching() == 0
    # another machine's entries are never used
    data["machines"] = {"Another CPU | numpy 0 | some BLAS | 2 threads": data["machines"][tuning.machine_key()]}
    path.write_text(json.dumps(data))
    tuning_mode(str(path))
    assert drive("file-key", default, options, lambda p: 1.0, calls=1) == [default]
    assert tuning.searching() == 1


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 99, "machines": {}}),
                                     json.dumps({"format": 1, "machines": {"m": {"k": {"plan": {"colour": 1}}}}})])
def test_a_bad_tuning_file_is_one_clear_error(tuning_mode, tmp_path, content):
    path = tmp_path / "tuning.json"
    path.write_text(content)
    with pytest.raises(tuning.TuningError, match="not a readable minidiff tuning file.*delete it"):
        tuning_mode(str(path))
    assert path.read_text() == content   # never overwritten


def test_a_folder_is_refused(tuning_mode, tmp_path):
    with pytest.raises(tuning.TuningError, match="is a folder"):
        tuning_mode(str(tmp_path))


# ---------------------------------------------------------------- the convolution's plans


def _conv(x, w, b, stride, padding, cot):
    ts = [Tensor(a, requires_grad=True) for a in (x, w, b)]
    out = F.conv2d(*ts, stride=stride, padding=padding)
    out.backward(cot)
    return [out.numpy()] + [t.grad for t in ts]


def _case(n=6, c=8, o=8, h=8, w=8, stride=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    ho, wo = (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1
    cot = rng.standard_normal((n, o, ho, wo)).astype(np.float32)
    return x, weight, b, (stride, stride), (1, 1, 1, 1), cot


PLANS = [Plan(algo=a, wgrad=g, block=blk, threads=t) for a in ("im2col", "winograd") for g in ("im2col", "winograd")
         for blk in (1, 2 << 20) for t in (1, 2)]


@pytest.fixture
def forced_plan(monkeypatch, tuning_mode):
    """Make every convolution run one given plan (tuning.run's choice replaced by it)."""
    tuning_mode("off")
    monkeypatch.setattr(pool, "MIN_PARALLEL_SIZE", 0)
    pool.set_num_threads(2)
    chosen = {}
    monkeypatch.setattr(tuning, "run", lambda key, default, options, fn, clock=None: fn(chosen["plan"]))

    def force(plan):
        chosen["plan"] = plan
    yield force
    pool.set_num_threads(pool._threads_from_env())


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.label())
def test_every_plan_computes_the_math_op(forced_plan, plan):
    x, w, b, stride, padding, cot = _case()
    previous = kernels.use_kernels("reference")
    try:
        want = _conv(x, w, b, stride, padding, cot)
    finally:
        kernels.use_kernels(previous)
    forced_plan(plan)
    got = _conv(x, w, b, stride, padding, cot)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-4 * np.abs(r).max())


def test_a_fixed_plan_repeats_bit_for_bit(forced_plan):
    x, w, b, stride, padding, cot = _case(n=5)
    for plan in (Plan(algo="winograd", wgrad="winograd", block=1, threads=2), Plan(threads=2)):
        forced_plan(plan)
        first, again = _conv(x, w, b, stride, padding, cot), _conv(x, w, b, stride, padding, cot)
        for a, b_ in zip(first, again):
            assert np.array_equal(a, b_)


def test_conv_tuning_searches_real_calls_and_settles(tuning_mode, monkeypatch):
    """On: a convolution's first calls try the candidates, then one plan sticks; results stay right throughout."""
    tuning_mode("on")
    monkeypatch.setattr(pool, "MIN_PARALLEL_SIZE", 0)
    x, w, b, stride, padding, cot = _case(n=4, c=5, o=6, h=7, w=6, seed=3)
    previous = kernels.use_kernels("reference")
    try:
        want = _conv(x, w, b, stride, padding, cot)
    finally:
        kernels.use_kernels(previous)
    for _ in range(40):
        got = _conv(x, w, b, stride, padding, cot)
        for g, r in zip(got, want):
            np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-4 * np.abs(r).max())
    keys = [key for key, _, _ in tuning.report()]
    assert tuning.searching() == 0
    assert any(k.startswith("conv2d.forward x=4x5x7x6 w=6x5x3x3") for k in keys)
    assert any(k.startswith("conv2d.backward x=4x5x7x6 w=6x5x3x3") and k.endswith("grads=xwb") for k in keys)


def test_block_choices_keep_only_distinct_splits():
    assert kconv.block_choices(1, 10) == (kconv.BLOCK_BYTES,)             # one image: one split whatever the size
    big = kconv.block_choices(64, 1 << 20)                                  # 64 MiB of scratch: three splits
    assert big[0] == kconv.BLOCK_BYTES and sorted(big) == sorted(kconv.BLOCK_CHOICES)


def test_the_cli_reports_a_bad_setting_in_one_line_before_any_work(monkeypatch, capsys, tmp_path):
    from minidiff import cli
    monkeypatch.setattr(tuning, "_pending_error", tuning.TuningError("MINIDIFF_TUNING='x' is a folder: give ..."))
    assert cli.main(["train", "--steps", "1", "--out", str(tmp_path / "run")]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == "minidiff train: error: MINIDIFF_TUNING='x' is a folder: give ..."
    assert not (tmp_path / "run").exists()
