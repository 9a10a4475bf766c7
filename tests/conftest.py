"""Shared fixtures: the backend fixture, the strict CuPy stand-in and hypothesis profiles.

HYPOTHESIS_PROFILE=dev (default) keeps the suite fast; "ci" runs more examples.
Tests marked `gpu` run their checks on the `cupy` backend: the real CuPy where it sees a
GPU, else the strict stand-in of tests/strict_cupy.py (NumPy underneath, CuPy's
strictness on top), so every CuPy code path runs on every machine. MINIDIFF_STRICT_CUPY
chooses: "auto" (default) as just said, "1" the stand-in even next to a GPU, "0" never
(the `gpu` tests then skip without a GPU). MINIDIFF_BACKEND=cupy makes cupy the default
backend of the whole suite.

Tests of the `compat` extra (torch, diffusers) call `compat_import(name)`: on a user's
machine without the extra they skip with COMPAT_REASON; in CI (env CI=true, where .ci/run
installs the extra) such a skip is turned into a failure, so they can never silently not run.
"""
import importlib
import os
import sys

# The tests' matrices are small: one BLAS thread avoids oversubscribing the 2 cores
# when pytest and BLAS threads compete (measured 10-30x slowdowns of tiny GEMMs under
# load). Set before numpy is imported; a caller's explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from hypothesis import HealthCheck, settings

import strict_cupy  # tests/ is on sys.path (rootdir conftest, no __init__.py)


def _real_gpu():
    """True when a real CuPy imports and sees a CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # not installed, broken, or no driver: then the stand-in is the cupy backend
        return False


STANDIN = os.environ.get("MINIDIFF_STRICT_CUPY", "auto")
if STANDIN not in ("auto", "0", "1"):
    raise pytest.UsageError(f'MINIDIFF_STRICT_CUPY must be "auto", "0" or "1"; got {STANDIN!r}')
USING_STANDIN = STANDIN == "1" or (STANDIN == "auto" and not _real_gpu())
if USING_STANDIN:
    assert "minidiff" not in sys.modules, "the stand-in must be installed before minidiff.backend imports cupy"
    strict_cupy.install()

from minidiff import backend  # noqa: E402  (after the stand-in became `cupy`)

settings.register_profile("dev", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


COMPAT_REASON = ("needs the compat extra (torch and diffusers): pip install torch==2.13.0 && "
                 "pip install -e '.[compat]'")


def fid_reference_stack():
    """The path of tests/fid_reference.py, or skip with COMPAT_REASON (and how to install
    pytorch-fid, torch-fidelity and torchvision's model files) where that stack is missing."""
    import fid_reference
    why = fid_reference.missing()
    if why:
        pytest.skip(f"{COMPAT_REASON} [FID references: {why}; install them with: {fid_reference.INSTALL_HINT}]")
    return fid_reference.__file__


def in_ci(environ=os.environ):
    """Whether this run is CI's (CI=true, as .ci/run and the usual CI services set it)."""
    return environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def compat_import(name):
    """Import `name` (torch, diffusers) or skip the calling test (or module) with COMPAT_REASON."""
    try:
        return importlib.import_module(name)
    except ImportError as err:  # missing, or installed but broken: either way the extra is not usable
        pytest.skip(f"{COMPAT_REASON} [{name}: {err}]", allow_module_level=True)


def _fail_compat_skip_in_ci(report):
    """Turn a skip with COMPAT_REASON into a failure when in_ci(): CI must run every extra's test."""
    if in_ci() and report.skipped and isinstance(report.longrepr, tuple) and COMPAT_REASON in str(report.longrepr[2]):
        report.outcome = "failed"
        report.longrepr = (f"CI=true: a test of the compat extra was skipped, which fails CI "
                           f"(.ci/run installs the extra): {report.longrepr[2]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_compat_skip_in_ci(outcome.get_result())


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend_name(request):
    """Run a test once per backend; the cupy run skips cleanly where no GPU is visible."""
    if request.param == "cupy" and not backend.gpu_available():
        pytest.skip("needs CuPy and a visible NVIDIA GPU (MINIDIFF_STRICT_CUPY=0 turned the stand-in off)")
    previous = backend.backend_name()
    backend.use_backend(request.param)
    yield request.param
    backend.use_backend(previous)


@pytest.fixture(autouse=True)
def _restore_backend_and_seed():
    """Each test starts on the backend and kernels mode the session started with and leaves them so."""
    from minidiff import kernels
    previous, mode = backend.backend_name(), kernels.mode()
    yield
    backend.use_backend(previous)
    kernels.use_kernels(mode)


@pytest.fixture
def standin():
    """The strict CuPy stand-in as the active backend, its counters zeroed; skips where a real GPU is the cupy."""
    if not USING_STANDIN:
        pytest.skip("the cupy backend is a real CuPy here, not the strict stand-in")
    previous = backend.backend_name()
    backend.use_backend("cupy")
    strict_cupy.reset()
    yield strict_cupy
    backend.use_backend(previous)


def pytest_collection_modifyitems(config, items):
    """In CI the cupy paths must run: turning the stand-in off there is an error."""
    if in_ci() and not USING_STANDIN and not backend.gpu_available():
        raise pytest.UsageError("CI runs the cupy paths on the strict stand-in, but MINIDIFF_STRICT_CUPY=0 "
                                "turned it off")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skipped test of an extra is reported as a failure: the compat extra's (COMPAT_REASON)
    and the cupy paths (gpu-marked, or using the stand-in)."""
    outcome = yield
    report = outcome.get_result()
    _fail_compat_skip_in_ci(report)
    if in_ci() and report.skipped and (item.get_closest_marker("gpu") or "standin" in item.fixturenames):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: this cupy test must run on the strict stand-in, but it skipped: {reason}"


@pytest.fixture
def numpy_backend():
    """Pin numpy for a test whose oracle models hand back host float64 arrays (also under MINIDIFF_BACKEND=cupy)."""
    previous = backend.backend_name()
    backend.use_backend("numpy")
    yield
    backend.use_backend(previous)


@pytest.fixture(params=["fast", "reference"])
def kernels_mode(request):
    """Run a test once on the kernels (fast) and once on the plain math layer alone (reference)."""
    from minidiff import kernels
    previous = kernels.use_kernels(request.param)
    yield request.param
    kernels.use_kernels(previous)


@pytest.fixture
def reference_mode():
    """The plain math layer alone for this test."""
    from minidiff import kernels
    previous = kernels.use_kernels("reference")
    yield
    kernels.use_kernels(previous)
