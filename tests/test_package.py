"""The package as it is distributed: one version everywhere, and every asset in the wheel.

The wheel itself is built, checked and installed in a fresh environment by scripts/check_wheel.sh
(.ci/run calls it); these tests are the cheap, static half of that check.
"""
import configparser
import importlib.metadata
import pathlib
import subprocess
import sys

import minidiff

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSETS = ROOT / "minidiff" / "assets"


def setup_cfg():
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    return cfg


def package_data_globs(cfg):
    """setup.cfg's [options.package_data] as (package folder relative to ROOT, glob) pairs."""
    pairs = []
    for package, value in cfg["options.package_data"].items():
        folder = "" if package == "*" else package.replace(".", "/")
        for glob in value.replace("\n", ",").split(","):
            if glob.strip():
                pairs.append((folder, glob.strip()))
    return pairs


def test_version_command_prints_the_package_version():
    out = subprocess.run([sys.executable, "-m", "minidiff", "--version"], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == f"minidiff {minidiff.__version__}"


def test_installed_distribution_has_the_package_version():
    """`pip install -e .` (or the wheel) records the version setup.cfg reads from minidiff/__init__.py."""
    assert importlib.metadata.version("minidiff") == minidiff.__version__


def test_version_has_one_source():
    assert setup_cfg()["metadata"]["version"].strip() == "attr: minidiff.__version__"


def test_package_data_covers_every_asset():
    """A new file in minidiff/assets that no package_data glob matches would silently miss the wheel."""
    cfg = setup_cfg()
    globs = package_data_globs(cfg)
    assets = [p for p in ASSETS.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert assets, "minidiff/assets is empty"
    covered = set()
    for folder, glob in globs:   # setuptools expands each glob in its package's folder, as pathlib does
        covered.update(p for p in (ROOT / folder).glob(glob) if p.is_file())
    uncovered = sorted(p.relative_to(ROOT).as_posix() for p in set(assets) - covered)
    assert not uncovered, f"setup.cfg [options.package_data] misses {uncovered}: add a glob for them"
    # minidiff/assets has no __init__.py, so it is a package only by find_namespace: discovery
    assert cfg["options"]["packages"].strip() == "find_namespace:"
    include = cfg["options.packages.find"]["include"]
    assert "minidiff.*" in include.replace("\n", ",").replace(" ", "").split(",")


def test_metadata_is_complete():
    meta = setup_cfg()["metadata"]
    assert meta["license_expression"].strip() == "MIT"
    assert "license" not in meta, "use license_expression (PEP 639), not the legacy license field"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    classifiers = meta["classifiers"].split("\n")
    assert not [c for c in classifiers if c.startswith("License ::")], "licence classifiers are superseded"
    for version in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    assert "Operating System :: OS Independent" in classifiers
    urls = dict(line.split("=", 1) for line in meta["project_urls"].strip().split("\n"))
    assert {key.strip() for key in urls} >= {"Homepage", "Source", "Documentation", "Changelog"}
    assert setup_cfg()["options"]["python_requires"].strip() == ">=3.10"
    test_extra = setup_cfg()["options.extras_require"]["test"]
    assert "nbclient>=0.7" in test_extra and "ipykernel>=6" in test_extra


def test_changelog_has_this_release():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{minidiff.__version__}]" in changelog
