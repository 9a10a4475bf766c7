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
ROOT = PACKAGE.parent

# A module may import only minidiff modules of a strictly lower level (data flows one way).
LEVEL = {
    "backend": 0,
    "tensor": 1, "schedule": 1, "data": 1, "images": 1, "resample": 1, "torchfile": 1,
    # the kernels layer sits below the math ops it speeds up: each op imports its kernel, never the reverse
    "kernels.memory": 1, "kernels.pool": 1, "kernels.tuning": 1.2,
    "kernels.dense": 1.4,   # its column_sums (a GEMV) serves the convolution's bias gradient
    "kernels.elementwise": 1.5, "kernels.conv": 1.5, "kernels.optim": 1.5,
    "kernels.norm": 1.6, "kernels": 1.7,
    "ops": 2,
    "conv": 3, "testing": 3, "losses": 3, "optim": 3, "distributed": 3,
    "functional": 4, "diffusion": 4,
    "nn": 5, "explainer": 5,
    "unet": 6, "classifier": 6, "inception": 6,
    "checkpoint": 7, "config": 7,
    "metrics": 8, "pretrained": 8,
    "sampling": 9,
    "train": 10,
    "cli": 11,
}
EXEMPT = {"__init__", "__main__"}  # the public API re-exports; `python -m minidiff`


def imported_names(path, module=""):
    """(top-level module name, minidiff module or None) for every import in `path`, the file of `module`
    ("ops", "kernels.conv", "kernels" for kernels/__init__.py): minidiff modules by dotted name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".") if module else []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                yield parts[0], ".".join(parts[1:]) or None if parts[0] == "minidiff" else None
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: `from . import ops`, `from .ops import x`, `from ..tensor import x`
                base = package[:len(package) - (node.level - 1)] + (mod.split(".") if mod else [])
                for alias in node.names:
                    sub = ".".join(base + [alias.name])
                    yield "minidiff", sub if sub in LEVEL or not base else ".".join(base)
            else:
                parts = mod.split(".")
                yield parts[0], ".".join(parts[1:]) or None if parts[0] == "minidiff" else None


def package_modules():
    """Every module of the package by dotted name, subpackages included ("kernels.conv", "kernels")."""
    names = []
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name and name not in EXEMPT:
            names.append(name)
    return names


def module_path(module):
    path = PACKAGE.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@pytest.mark.parametrize("module", package_modules())
def test_only_backend_imports_numpy_or_cupy(module):
    for top, _ in imported_names(module_path(module), module):
        if top in {"numpy", "cupy", "cupyx"}:
            assert module == "backend", f"minidiff/{module}.py imports {top}; ask minidiff.backend instead"


@pytest.mark.parametrize("module", package_modules())
def test_imports_flow_one_way(module):
    assert module in LEVEL, f"minidiff/{module}.py has no import level: add it to LEVEL in this test"
    for top, sub in imported_names(module_path(module), module):
        if top == "minidiff" and sub is not None and sub in LEVEL:
            assert LEVEL[sub] < LEVEL[module], (
                f"minidiff/{module}.py (level {LEVEL[module]}) must not import minidiff.{sub} (level {LEVEL[sub]})")


def test_import_rule_catches_a_violation(tmp_path):
    """The checker itself must flag a planted numpy import and an upward import."""
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy as np\nfrom .unet import UNet\nfrom . import cli\n")
    names = list(imported_names(bad))
    assert ("numpy", None) in names and ("minidiff", "unet") in names and ("minidiff", "cli") in names
    # a kernel that reached up into the math layer it speeds up, and a math op importing its kernel
    kernel = tmp_path / "kernel.py"
    kernel.write_text("from .. import functional\nfrom ..conv import im2col\nfrom . import pool\n")
    assert list(imported_names(kernel, "kernels.conv")) == [
        ("minidiff", "functional"), ("minidiff", "conv"), ("minidiff", "kernels.pool")]
    assert LEVEL["conv"] > LEVEL["kernels.conv"] and LEVEL["functional"] > LEVEL["kernels.conv"]


def test_xp_follows_a_switch_after_import(monkeypatch):
    class FakeCupy:  # stands in for cupy so the switch can be tested without a GPU
        class ndarray:
            pass

    monkeypatch.setattr(backend, "cupy", FakeCupy)
    monkeypatch.setattr(backend, "gpu_status", lambda: (True, ""))
    backend.use_backend("cupy")
    assert backend.xp() is FakeCupy and backend.backend_name() == "cupy"
    backend.use_backend("numpy")
    assert backend.xp() is np
    assert isinstance(Tensor([1.0]).data, np.ndarray)


def test_cupy_without_cupy_names_the_install_command(monkeypatch):
    previous = backend.backend_name()
    monkeypatch.setattr(backend, "cupy", None)
    monkeypatch.setattr(backend, "CUPY_IMPORT_ERROR", None)
    with pytest.raises(backend.BackendError, match=r'not installed: in the minidiff checkout pip install -e "\.\[gpu\]".*from a wheel pip install "minidiff\[gpu\]"'):
        backend.use_backend("cupy")
    assert backend.backend_name() == previous  # a failed switch leaves the active backend alone


def test_cupy_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(backend, "gpu_status", lambda: (False, "CUDA reports no usable GPU (no driver)"))
    with pytest.raises(backend.BackendError, match="no usable GPU"):
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
    h = backend.to_numpy
    a, b = backend.Generator(7), backend.Generator(7)
    np.testing.assert_array_equal(h(a.normal((3, 4))), h(b.normal((3, 4))))
    assert a.normal((2,)).dtype == np.float32
    state = a.get_state()
    first = h(a.normal((5,)))
    c = backend.Generator(0)
    c.set_state(state)
    np.testing.assert_array_equal(h(c.normal((5,))), first)
    assert not np.array_equal(h(backend.Generator(8).normal((5,))), h(backend.Generator(7).normal((5,))))


def test_manual_seed_resets_the_default_generator():
    minidiff.manual_seed(3)
    x = backend.to_numpy(backend.default_generator().integers(0, 1000, (10,)))
    minidiff.manual_seed(3)
    np.testing.assert_array_equal(backend.to_numpy(backend.default_generator().integers(0, 1000, (10,))), x)


def test_to_numpy_returns_host_arrays():
    t = Tensor([[1.0, 2.0]])
    assert isinstance(backend.to_numpy(t.data), np.ndarray)
    np.testing.assert_array_equal(t.numpy(), [[1.0, 2.0]])


# ---------------------------------------------------------------- what a reading of the code found


def _import_backend_with(tmp_path, cupy_init, env=None):
    """Run `import minidiff` with a planted `cupy` package; print what use_backend("cupy") says."""
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text(cupy_init)
    code = ("import minidiff.backend as b\n"
            "try:\n    b.use_backend('cupy')\nexcept b.BackendError as e:\n    print('ERR', e)\n")
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), **(env or {})}
    environ.pop("MINIDIFF_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_a_broken_cupy_install_is_shown_as_broken_not_missing(tmp_path):
    out = _import_backend_with(tmp_path, "raise ImportError('libcudart.so.12: cannot open shared object file')")
    assert "failed to import" in out and "libcudart.so.12" in out and "not installed" not in out


def test_a_missing_dependency_of_cupy_is_a_broken_install(tmp_path):
    out = _import_backend_with(tmp_path, "import fastrlock_missing_for_this_test\n")
    assert "failed to import" in out and "fastrlock_missing_for_this_test" in out


def test_gpu_available_swallows_only_cuda_runtime_errors(monkeypatch):
    class CUDARuntimeError(RuntimeError):
        pass

    def fake(count):
        def get_device_count():
            if isinstance(count, Exception):
                raise count
            return count
        runtime = type("runtime", (), {"CUDARuntimeError": CUDARuntimeError,
                                       "getDeviceCount": staticmethod(get_device_count)})
        return type("cupy", (), {"cuda": type("cuda", (), {"runtime": runtime})})

    monkeypatch.setattr(backend, "cupy", fake(CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device")))
    assert backend.gpu_available() is False
    assert "cudaErrorNoDevice" in backend.gpu_status()[1]
    monkeypatch.setattr(backend, "cupy", fake(0))
    assert backend.gpu_available() is False
    monkeypatch.setattr(backend, "cupy", fake(ZeroDivisionError("a bug, not a missing GPU")))
    with pytest.raises(ZeroDivisionError):
        backend.gpu_available()


def test_an_unusable_minidiff_backend_fails_at_first_use_not_at_import():
    code = ("import minidiff, minidiff.cli as cli\n"
            "assert cli.main(['--version']) == 0\n"
            "try:\n    minidiff.Tensor([1.0])\nexcept ValueError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, MINIDIFF_BACKEND="bogus", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "ERR MINIDIFF_BACKEND=bogus: unknown backend 'bogus'" in run.stdout


def test_minidiff_backend_is_the_default_of_every_command_and_of_train_config(monkeypatch):
    from minidiff import cli
    from minidiff.config import TrainConfig
    monkeypatch.setenv("MINIDIFF_BACKEND", "cupy")
    assert TrainConfig().backend == "cupy"
    parser = cli.build_parser()
    for command in ("sample --checkpoint x", "forward", "interpolate --checkpoint x", "eval"):
        assert parser.parse_args(command.split()).backend == "cupy", command
    assert parser.parse_args(["sample", "--checkpoint", "x", "--backend", "numpy"]).backend == "numpy"  # explicit wins
    monkeypatch.delenv("MINIDIFF_BACKEND")
    assert TrainConfig().backend == "numpy"


def test_to_backend_of_moves_only_across_backends(standin):
    host, dev = np.arange(3.0), standin.arange(3.0)
    assert backend.to_backend_of(dev, dev) is dev
    assert isinstance(backend.to_backend_of(host, dev), standin.ndarray)
    assert isinstance(backend.to_backend_of(dev, host), np.ndarray)
    assert backend.to_backend_of([1, 2], dev).dtype == np.int64


def test_keep_mask_is_the_same_on_both_backends_and_has_the_right_rate(standin):
    """Counter-based on the device: identical bits on numpy and cupy, P(keep) = 1 - p, no host copy."""
    g_host, g_dev = backend.Generator(5), backend.Generator(5)
    a = g_host.keep_mask((200, 500), 0.1, like=np.zeros(1))
    standin.reset()
    b = g_dev.keep_mask((200, 500), 0.1, like=standin.zeros(1))
    assert standin.counts["h2d_bytes"] == 0 and isinstance(b, standin.ndarray)
    np.testing.assert_array_equal(a, backend.to_numpy(b))
    assert a.shape == (200, 500) and abs(a.mean() - 0.9) < 0.004  # 5 sigma of 100,000 draws
    assert g_host.get_state() == g_dev.get_state()  # one host draw each: checkpoints carry the state
    c = g_host.keep_mask((200, 500), 0.1, like=np.zeros(1))  # the next mask is a fresh one
    assert abs((a == c).mean() - (0.9 ** 2 + 0.1 ** 2)) < 0.005
    assert g_host.keep_mask((4,), 0.0, like=np.zeros(1)).all()
    assert not backend.Generator(1).keep_mask((1000,), 1.0, like=np.zeros(1)).any()


def test_no_nvidia_driver_at_all_is_not_told_to_upgrade_it(monkeypatch):
    class CUDARuntimeError(RuntimeError):
        pass

    def get_device_count():
        raise CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime")
    runtime = type("runtime", (), {"CUDARuntimeError": CUDARuntimeError,
                                   "getDeviceCount": staticmethod(get_device_count)})
    monkeypatch.setattr(backend, "cupy", type("cupy", (), {"cuda": type("cuda", (), {"runtime": runtime})}))
    monkeypatch.setattr(backend, "nvidia_driver_loaded", lambda: False)
    ok, why = backend.gpu_status()
    assert not ok and "no NVIDIA driver is loaded" in why and "upgrade" not in why and "--backend numpy" in why
    monkeypatch.setattr(backend, "nvidia_driver_loaded", lambda: True)
    ok, why = backend.gpu_status()
    assert not ok and "older than the CUDA" in why and "upgrade the driver" in why and '.[gpu]' in why


def test_the_install_hint_names_the_checkout_and_the_wheel_forms():
    assert 'pip install -e ".[gpu]"' in backend.GPU_INSTALL_HINT and '"minidiff[gpu]"' in backend.GPU_INSTALL_HINT
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[gpu]"' in readme
