"""`python tests/standin_launch.py ARGS...` is `python -m minidiff ARGS...` with the strict CuPy
stand-in (tests/strict_cupy.py) as `cupy`: the CLI smoke tests run every command in a fresh
process on it. With STRICT_CUPY_REPORT=PATH the stand-in's counters are written there as JSON
when the process exits, so a test can tell that the work really ran on the device.
"""
import atexit
import json
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import strict_cupy  # noqa: E402

strict_cupy.install()
report = os.environ.get("STRICT_CUPY_REPORT")
if report:
    atexit.register(lambda: json.dump(strict_cupy.snapshot(), open(report, "w")))
sys.argv = ["minidiff", *sys.argv[1:]]
runpy.run_module("minidiff", run_name="__main__", alter_sys=True)
