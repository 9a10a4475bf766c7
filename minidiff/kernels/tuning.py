"""Measured kernel choices: cuDNN's benchmark mode for the CPU kernels.

A kernel that has several ways to compute one op (the convolution: im2col + GEMM or Winograd,
the image block size of its scratch matrices, one thread or the whole pool) gives `choose`
its fixed-rule plan, the alternatives, and a function that runs the op once with a plan.
With tuning on, the first call of each shape times the alternatives, one field at a time
(the fixed-rule plan first; another must be MARGIN faster to replace it, so tuning never
picks a plan that only measured faster by noise), and every later call with that shape
takes the winner from a per-process cache.

    MINIDIFF_TUNING=off    the default: the fixed rules (conv.BLOCK_BYTES, conv.use_winograd,
                           pool.threads_for), no timing
    MINIDIFF_TUNING=on     time each new shape once per process
    MINIDIFF_TUNING=FILE   as on, and the choices are read from and saved to FILE (JSON) under a
                           key naming the CPU model, the BLAS and the thread count: a saved shape is
                           not timed again, and another machine's entries are never used

Bits: every plan computes the same op to float32 rounding (tests/test_kernels_tuning.py holds
each one to the math op), but any change of plan may change the bits: the algorithm does, the
thread split does for the sums over chunks (weight and bias gradients), and so does the block
size, even of a forward (OpenBLAS takes other GEMM kernels for other row counts; measured with
numpy 2.4's OpenBLAS 0.3.31: one image per block gives other bits than the whole batch). A fixed
plan repeats bit for bit (tested). So "on" may pick differently from run to run on a noisy
machine; a FILE pins the choices, and with it (or "off") a run repeats bit for bit at a fixed
thread count.
May import: backend, kernels.pool.
"""
import json
import os
import platform
import time
from typing import NamedTuple

from .. import backend
from . import pool

MARGIN = 0.05      # a candidate must beat the incumbent by 5% to replace it
WARMUP_CALLS = 2   # a shape's first calls run the fixed rules' plan untimed (page faults, cold caches)
MIN_SECONDS = 2e-3  # shapes whose fixed-rules plan takes less keep it (measured: tiny and small lost 2-6% otherwise)
REPEATS = 3        # timed calls per candidate (the minimum is kept: the first also grows its scratch buffers)
FORMAT = 1         # the tuning file's format version


class TuningError(ValueError):
    """A bad MINIDIFF_TUNING value or an unreadable tuning file (the CLI reports it as one error line, exit 2)."""


class Plan(NamedTuple):
    """One way to run a kernel. algo: the main (forward, or input-gradient) algorithm; wgrad: the weight
    gradient's; block: scratch bytes per image block; threads: chunks on the pool."""
    algo: str = "im2col"
    wgrad: str = "im2col"
    block: int = 2 << 20
    threads: int = 1

    def label(self):
        return f"{self.algo}/{self.wgrad} block {self.block >> 10} KiB, {self.threads} thr"


_setting = "off"   # "off", "on" or a file path
_cache = {}        # shape key -> Plan, this process
_records = []      # what was measured: (key, chosen Plan, {Plan: best seconds}), in order
_spent = 0.0       # seconds the searches cost beyond running each winner
_pending_error = None  # a bad MINIDIFF_TUNING at import, raised at the first convolution
_file = None       # the loaded file's {"format", "machines": {machine: {key: entry}}}, or None


def set_tuning(value):
    """"off", "on" or a file path (as MINIDIFF_TUNING); clears the per-process cache. Returns the previous setting."""
    global _setting, _file, _pending_error
    value = (value or "off").strip()
    if value.lower() in ("off", "on"):
        value = value.lower()
    elif os.path.isdir(value):
        raise TuningError(f"MINIDIFF_TUNING={value!r} is a folder: give \"off\", \"on\" or a file path "
                          f"(for example {os.path.join(value, 'tuning.json')})")
    file = _load(value) if value not in ("off", "on") else None
    previous, _setting, _file = _setting, value, file
    _cache.clear()
    _searching.clear()
    _pending_error = None
    return previous


def setting():
    """The current setting: "off", "on" or the file path."""
    return _setting


_machine = None


def machine_key():
    """What a saved choice depends on: the CPU model, numpy and its BLAS, and the pool's thread count."""
    global _machine
    if _machine is None:
        _machine = _cpu_and_blas()
    return f"{_machine} | {pool.get_num_threads()} threads"


def _cpu_and_blas():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = "unknown BLAS"
    try:
        from threadpoolctl import threadpool_info
        libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if libs:
            blas = f"{libs[0].get('internal_api')} {libs[0].get('version')} {libs[0].get('architecture')}"
    except Exception:  # threadpoolctl missing or unable to inspect this platform
        pass
    return f"{cpu} | numpy {backend.host.__version__} | {blas}"


def _load(path):
    if not os.path.exists(path):
        return {"format": FORMAT, "machines": {}}
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != FORMAT or not isinstance(data.get("machines"), dict):
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        for entries in data["machines"].values():
            for entry in entries.values():
                Plan(**entry["plan"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TuningError(f"MINIDIFF_TUNING={path!r} is not a readable minidiff tuning file ({exc}): delete it "
                          f"(it is rebuilt on the next run) or point MINIDIFF_TUNING elsewhere") from None
    return data


def _save(key, plan, times):
    """Add one shape's choice and its candidates' times to the file, written atomically."""
    entries = _file["machines"].setdefault(machine_key(), {})
    entries[key] = {"plan": plan._asdict(), "ms": {p.label(): round(s * 1e3, 3) for p, s in times.items()}}
    folder = os.path.dirname(os.path.abspath(_setting))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{_setting}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(_file, f, indent=1, sort_keys=True)
    os.replace(tmp, _setting)


def _search(default, options, times):
    """Coordinate search over `options`, one field at a time from `default`: a generator that yields the plan to
    run next and is sent the seconds that run took; it returns the winner. Each plan runs REPEATS times."""
    for _ in range(WARMUP_CALLS):                           # untimed: the run's first steps fault in fresh memory
        yield default
    best = default
    candidates = [None] + [(field, value) for field, values in options for value in values]
    for candidate in candidates:
        plan = best if candidate is None else best._replace(**{candidate[0]: candidate[1]})
        while len(times.setdefault(plan, [])) < REPEATS:
            times[plan].append((yield plan))
        if min(times[plan]) < (1 - MARGIN) * min(times[best]):
            best = plan
        if candidate is None and min(times[plan]) < MIN_SECONDS:
            break     # a call this short: its gains are smaller than the noise of timing them in a run
    return best


_searching = {}    # shape key -> (its search generator, the plan it runs next, {Plan: [seconds, ...]})
on_settled = []    # callbacks run when the last search ends (conv frees the scratch of the larger candidates)


def run(key, default, options, fn, clock=time.perf_counter):
    """fn(plan) with this shape's plan: `default` when tuning is off or there is nothing to choose. With tuning on,
    the shape's first calls each run the next candidate of a coordinate search (one field of `options`
    [(field, values), ...] at a time) and time it: the op's real calls, in the step they belong to, so the times
    include what isolated timing misses (which core's cache holds the inputs, the scratch the other ops left).
    Once every candidate has run REPEATS times the fastest is kept for the rest of the process."""
    options = [(field, values) for field, values in options if len(values) > 1]
    if _setting == "off" or not options:
        return fn(default)
    plan = _cache.get(key)
    if plan is None and _file is not None:
        saved = _file["machines"].get(machine_key(), {}).get(key)
        if saved is not None:                               # measured on this machine before: no search
            plan = _cache[key] = Plan(**saved["plan"])
    if plan is not None:
        return fn(plan)
    if key not in _searching:
        times = {}
        search = _search(default, options, times)
        _searching[key] = (search, next(search), times)
    search, plan, times = _searching[key]
    t0 = clock()
    result = fn(plan)
    elapsed = clock() - t0   # (the warm-up calls' times are sent too, and dropped)
    try:
        _searching[key] = (search, search.send(elapsed), times)
    except StopIteration as done:
        _settle(key, done.value, times)
    return result


def _settle(key, best, times):
    global _spent
    del _searching[key]
    seconds = {plan: min(ts) for plan, ts in times.items()}
    # what the search cost against always running the winner: the runs of slower candidates
    _spent += sum(t - seconds[best] for ts in times.values() for t in ts)
    _cache[key] = best
    _records.append((key, best, seconds))
    if _file is not None:
        _save(key, best, seconds)
    if not _searching:
        for callback in on_settled:
            callback()


def searching():
    """How many shapes are still being timed."""
    return len(_searching)


def report():
    """[(shape key, chosen Plan, {Plan: seconds}), ...] of the shapes timed in this process, in order."""
    return list(_records)


def seconds_spent():
    """Seconds the searches cost: the time their slower candidates took beyond the winner's, summed."""
    return _spent


def format_report():
    """The timed shapes as text: each shape, then every candidate's time with the chosen one marked."""
    lines = [f"kernel tuning ({setting()}): {len(_records)} shapes timed; the slower candidates cost {_spent:.2f} s"]
    for key, best, times in _records:
        lines.append(f"  {key}")
        for plan, seconds in times.items():
            lines.append(f"    {'*' if plan == best else ' '} {plan.label():<40} {seconds * 1e3:9.3f} ms")
    return "\n".join(lines)


try:
    set_tuning(os.environ.get("MINIDIFF_TUNING", ""))
except TuningError as exc:  # raised at the first convolution, so `minidiff --help` still works
    _pending_error = exc


def check():
    """Raise a bad MINIDIFF_TUNING's error (kept from import time)."""
    if _pending_error is not None:
        raise _pending_error
