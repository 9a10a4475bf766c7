"""Shared fixtures: the backend fixture and hypothesis profiles.

HYPOTHESIS_PROFILE=dev (default) keeps the suite fast; "ci" runs more examples.
Tests marked `gpu` run only where CuPy sees a GPU (MINIDIFF_BACKEND=cupy makes the
whole suite run its `backend_name`-parametrised tests on cupy as well).
"""
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
