"""docs/walkthrough.ipynb: committed with its outputs, linked to real functions, and it runs.

The fast tests read the committed notebook as JSON: every code cell has outputs and none is an
error, it holds exactly the cells of scripts/build_walkthrough.py, and every link to
../minidiff/*.py names a function or class defined in that file. The slow test executes it in a
fresh kernel on this interpreter (nbclient, ipykernel: the test extra) within TIME_LIMIT_S; where
those are missing it skips, except under CI=true, where .ci/run installs them and a skip would
hide a broken notebook, so it fails.
"""
import copy
import importlib
import json
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import in_ci

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "walkthrough.ipynb"
sys.path.insert(0, str(ROOT / "scripts"))
import build_walkthrough  # noqa: E402  (scripts/ is not a package; its cells need no Jupyter to import)

TIME_LIMIT_S = 180   # measured about 80 s on 2 idle cores; the margin is for a loaded machine
MAX_BYTES = 1_500_000
NOTEBOOK_REASON = "executing the notebook needs nbclient and ipykernel: pip install -e '.[test]'"
LINK = re.compile(r"\[([^\]]*)\]\((\.\./minidiff/[^)]*)\)")
NAMED_LINK = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def _cells():
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]


def _source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_committed_notebook_has_outputs_and_no_errors():
    assert NOTEBOOK.stat().st_size < MAX_BYTES, f"{NOTEBOOK} is {NOTEBOOK.stat().st_size} bytes: shrink its pictures"
    code = [c for c in _cells() if c["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    for k, cell in enumerate(code):
        head = _source(cell).splitlines()[0] if _source(cell) else ""
        assert cell["outputs"], (f"code cell {k} ({head!r}) has no outputs: rebuild with "
                                 f"python scripts/build_walkthrough.py")
        assert cell.get("execution_count") is not None, f"code cell {k} ({head!r}) was never executed"
        errors = [o for o in cell["outputs"] if o["output_type"] == "error"]
        assert not errors, f"code cell {k} ({head!r}) failed: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    pictures = sum("image/png" in o.get("data", {}) for c in code for o in c["outputs"])
    assert pictures >= 8, f"only {pictures} embedded pictures; the walkthrough shows at least 8"


def test_committed_notebook_is_the_builders():
    """The notebook is generated: editing it by hand (or the builder without rebuilding) is caught here."""
    committed = [(c["cell_type"], _source(c)) for c in _cells()]
    assert committed == build_walkthrough.CELLS, ("docs/walkthrough.ipynb differs from scripts/build_walkthrough.py's "
                                                  "CELLS: rebuild with python scripts/build_walkthrough.py")


def test_links_name_functions_that_exist():
    links = [m for c in _cells() if c["cell_type"] == "markdown" for m in LINK.findall(_source(c))]
    assert len(links) >= 15, f"only {len(links)} links into minidiff/"
    for text, target in links:
        name = NAMED_LINK.fullmatch(text)
        assert name, f"link [{text}]({target}): the text must be one `function` name"
        path = (NOTEBOOK.parent / target).resolve()
        assert path.is_file() and path.parent == ROOT / "minidiff", f"link [{text}]({target}): no such file"
        definition = re.compile(rf"^\s*(?:def|class)\s+{name.group(1)}\b", re.M)
        assert definition.search(path.read_text(encoding="utf-8")), \
            f"link [{text}]({target}): {path.name} defines no function or class {name.group(1)}"


def test_sections_cite_the_paper():
    text = "\n".join(_source(c) for c in _cells() if c["cell_type"] == "markdown")
    for cite in ("Eq. 2", "Eq. 4", "Eq. 14", "Eq. 15", "Algorithm 1", "Algorithm 2", "Fig. 6", "Fig. 8"):
        assert cite in text, f"no markdown cell cites {cite}"


def _runner():
    """nbclient and nbformat, or a skip (a failure under CI) naming what to install."""
    try:
        for name in ("nbformat", "nbclient", "ipykernel", "jupyter_client"):
            importlib.import_module(name)
    except ImportError as err:
        if in_ci():
            pytest.fail(f"{NOTEBOOK_REASON} [{err}]; .ci/run installs the test extra, so CI must not skip this")
        pytest.skip(f"{NOTEBOOK_REASON} [{err}]")
    import nbformat
    return nbformat


def test_kernel_is_this_interpreter():
    _runner()
    cmd = build_walkthrough.kernel_manager().format_kernel_cmd()
    assert cmd[0] == sys.executable and cmd[1:3] == ["-m", "ipykernel_launcher"], cmd


@pytest.mark.slow
def test_notebook_runs_from_a_clean_kernel_in_time():
    nbformat = _runner()
    nb = copy.deepcopy(nbformat.read(NOTEBOOK, as_version=4))
    t0 = time.perf_counter()
    seconds = build_walkthrough.execute(nb)   # raises CellExecutionError, with the cell's traceback, on failure
    wall = time.perf_counter() - t0
    assert wall < TIME_LIMIT_S, (f"the notebook took {wall:.0f} s (cells {seconds:.0f} s), over its {TIME_LIMIT_S} s "
                                 f"budget: shorten its training runs in scripts/build_walkthrough.py")
    failed = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not failed, failed
