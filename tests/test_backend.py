"""The backend switch, seeded generators, and the project's import rules (checked with ast)."""
import ast
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import minidiff
from minidiff import backend
from minidiff.tensor import Tensor

PACKAGE = pathlib.Path(minidiff.__file__).parent

# A module may import only minidiff modules of a strictly lower level (data flows one way).
LEVEL = {
    "backend": 0,
    "tensor": 1, "schedule": 1, "data": 1, "images": 1, "parallel": 1,
    "ops": 2,
    "conv": 3, "testing": 3, "losses": 3, "optim": 3,
    "functional": 4, "diffusion": 4,
    "nn": 5,
    "unet": 6, "classifier": 6,
    "checkpoint": 7,
    "train": 8, "metrics": 8,
    "cli": 9,
}
EXEMPT = {"__init__", "__main__"}  # the public API re-exports; `python -m minidiff`


def imported_names(path):
    """(top-level module name, minidiff submodule or None) for every import in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                yield parts[0], parts[1] if parts[0] == "minidiff" and len(parts) > 1 else None
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: `from . import ops` or `from .ops import x`
                if mod:
                    yield "minidiff", mod.split(".")[0]
                else:
                    for alias in node.names:
                        yield "minidiff", alias.name
            else:
                parts = mod.split(".")
                yield parts[0], parts[1] if parts[0] == "minidiff" and len(parts) > 1 else None


def package_modules():
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in EXEMPT)


@pytest.mark.parametrize("module", package_modules())
def test_only_backend_imports_numpy_or_cupy(module):
    for top, _ in imported_names(PACKAGE / f"{module}.py"):
        if top in {"numpy", "cupy", "cupyx"}:
            assert module == "backend", f"minidiff/{module}.py imports {top}; ask minidiff.backend instead"


@pytest.mark.parametrize("module", package_modules())
def test_imports_flow_one_way(module):
    assert module in LEVEL, f"minidiff/{module}.py has no import level: add it to LEVEL in this test"
    for top, sub in imported_names(PACKAGE / f"{module}.py"):
        if top == "minidiff" and sub is not None and sub in LEVEL:
            assert LEVEL[sub] < LEVEL[module], (
                f"minidiff/{module}.py (level {LEVEL[module]}) must not import minidiff.{sub} (level {LEVEL[sub]})")


def test_import_rule_catches_a_violation(tmp_path):
    """The checker itself must flag a planted numpy import and an upward import."""
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy as np\nfrom .unet import UNet\nfrom . import cli\n")
    names = list(imported_names(bad))
    assert ("numpy", None) in names and ("minidiff", "unet") in names and ("minidiff", "cli") in names


def test_xp_follows_a_switch_after_import(monkeypatch):
    class FakeCupy:  # stands in for cupy so the switch can be tested without a GPU
        class ndarray:
            pass

    monkeypatch.setattr(backend, "cupy", FakeCupy)
    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    backend.use_backend("cupy")
    assert backend.xp() is FakeCupy and backend.backend_name() == "cupy"
    backend.use_backend("numpy")
    assert backend.xp() is np
    assert isinstance(Tensor([1.0]).data, np.ndarray)


def test_cupy_without_cupy_names_the_install_command(monkeypatch):
    monkeypatch.setattr(backend, "cupy", None)
    with pytest.raises(backend.BackendError, match=r'pip install "minidiff\[gpu\]"'):
        backend.use_backend("cupy")
    assert backend.backend_name() == "numpy"  # a failed switch leaves the active backend alone


def test_cupy_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(backend, "cupy", object())
    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    with pytest.raises(backend.BackendError, match="GPU"):
        backend.use_backend("cupy")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="'jax'.*numpy.*cupy"):
        backend.use_backend("jax")


@pytest.mark.parametrize("value, expected", [("numpy", "numpy"), ("bogus", "unknown backend 'bogus'")])
def test_environment_variable_picks_the_default(value, expected):
    env = dict(os.environ, MINIDIFF_BACKEND=value)
    run = subprocess.run([sys.executable, "-c", "import minidiff; print(minidiff.backend.backend_name())"],
                         env=env, capture_output=True, text=True)
    assert expected in (run.stdout + run.stderr)


def test_generator_is_reproducible_and_resumable():
    a, b = backend.Generator(7), backend.Generator(7)
    np.testing.assert_array_equal(a.normal((3, 4)), b.normal((3, 4)))
    assert a.normal((2,)).dtype == np.float32
    state = a.get_state()
    first = a.normal((5,))
    c = backend.Generator(0)
    c.set_state(state)
    np.testing.assert_array_equal(c.normal((5,)), first)
    assert not np.array_equal(backend.Generator(8).normal((5,)), backend.Generator(7).normal((5,)))


def test_manual_seed_resets_the_default_generator():
    minidiff.manual_seed(3)
    x = backend.default_generator().integers(0, 1000, (10,))
    minidiff.manual_seed(3)
    np.testing.assert_array_equal(backend.default_generator().integers(0, 1000, (10,)), x)


def test_to_numpy_returns_host_arrays():
    t = Tensor([[1.0, 2.0]])
    assert isinstance(backend.to_numpy(t.data), np.ndarray)
    np.testing.assert_array_equal(t.numpy(), [[1.0, 2.0]])
