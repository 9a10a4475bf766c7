"""Shared fixtures: the backend fixture and hypothesis profiles.

HYPOTHESIS_PROFILE=dev (default) keeps the suite fast; "ci" runs more examples.
Tests marked `gpu` run only where CuPy sees a GPU (MINIDIFF_BACKEND=cupy makes the
whole suite run its `backend_name`-parametrised tests on cupy as well).

Tests of the `compat` extra (torch, diffusers) call `compat_import(name)`: on a user's
machine without the extra they skip with COMPAT_REASON; in CI (env CI=true, where .ci/run
installs the extra) such a skip is turned into a failure, so they can never silently not run.
"""
import importlib
import os

# The tests' matrices are small: one BLAS thread avoids oversubscribing the 2 cores
# when pytest and BLAS threads compete (measured 10-30x slowdowns of tiny GEMMs under
# load). Set before numpy is imported; a caller's explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from hypothesis import HealthCheck, settings

from minidiff import backend

settings.register_profile("dev", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


COMPAT_REASON = ("needs the compat extra (torch and diffusers): pip install torch==2.13.0 && "
                 "pip install -e '.[compat]'")


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
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_compat_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_compat_skip_in_ci(outcome.get_result())


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend_name(request):
    """Run a test once per backend; the cupy run skips cleanly where no GPU is visible."""
    if request.param == "cupy" and not backend.gpu_available():
        pytest.skip("needs CuPy and a visible NVIDIA GPU")
    previous = backend.backend_name()
    backend.use_backend(request.param)
    yield request.param
    backend.use_backend(previous)


@pytest.fixture(autouse=True)
def _restore_backend_and_seed():
    """Each test starts on the backend the session started with and leaves it so."""
    previous = backend.backend_name()
    yield
    backend.use_backend(previous)
