#!/usr/bin/env bash
# Release check: build the sdist and the wheel of this checkout, check them, install the wheel
# into a fresh virtual environment and run the command line from a folder outside the checkout.
#
#   scripts/check_wheel.sh            # PYTHON=python3.12 scripts/check_wheel.sh for another Python
#   KEEP=1 scripts/check_wheel.sh     # keep the temporary folder (printed) for a look afterwards
#
# Steps, each of which fails the script loudly (exit 1, "check_wheel: FAILED: ..." on stderr):
#   1. python -m build (sdist, then the wheel from the sdist) into a temporary folder; no
#      setuptools warning may appear in its output;
#   2. twine check --strict on both;
#   3. the wheel and the sdist hold every file of minidiff/assets (data sets, classifier weights
#      and their JSON) and the LICENSE;
#   4. a fresh virtual environment gets the wheel (dependencies from PyPI or pip's configured
#      local indexes);
#   5. from a temporary folder outside the checkout, with PYTHONPATH unset: minidiff is imported
#      from that environment's site-packages and no sys.path entry lies inside the checkout;
#      `minidiff --version` prints the wheel's version; `minidiff train --steps 20 --out r` and
#      `minidiff eval --checkpoint r --num 64` succeed (the bundled digits and classifier, read
#      from the installed package).
# build and twine come from the calling Python if it has them, else from a throwaway venv.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd -P)"
python="${PYTHON:-python3}"
start=$SECONDS

fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }
step() { echo "check_wheel: [$((SECONDS - start))s] $*"; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/minidiff-wheel.XXXXXX")"
tmp="$(cd "$tmp" && pwd -P)"
case "$tmp/" in "$root"/*) fail "the temporary folder $tmp lies inside the checkout $root";; esac
if [ "${KEEP:-0}" = 1 ]; then
  echo "check_wheel: keeping $tmp"
else
  trap 'rm -rf "$tmp"' EXIT
fi
unset PYTHONPATH PYTHONHOME

# ---------------------------------------------------------------- 1-2: build, twine check
if "$python" -c "import build, twine" 2>/dev/null; then
  tools="$python"
else
  step "installing build and twine into a throwaway venv"
  "$python" -m venv "$tmp/tools" || fail "cannot create a virtual environment with $python"
  "$tmp/tools/bin/python" -m pip install -qq build twine || fail "cannot install build and twine"
  tools="$tmp/tools/bin/python"
fi

step "building the sdist and the wheel into $tmp/dist"
if ! "$tools" -m build --outdir "$tmp/dist" "$root" >"$tmp/build.log" 2>&1; then
  cat "$tmp/build.log" >&2
  fail "python -m build"
fi
# setuptools' warnings (deprecations, "Package ... is absent from the packages configuration",
# unknown options) all carry one of these words, and a MANIFEST.in line that matches nothing says
# "no files found matching"; distutils' "byte-compiling is disabled" notice
# (PYTHONDONTWRITEBYTECODE) is not a packaging problem and is let through.
if grep -E "Warning|WARNING|is absent from|Unknown distribution option|no files found matching|no previously-included files" \
    "$tmp/build.log" >&2; then
  fail "python -m build printed the warnings above (full log: $tmp/build.log with KEEP=1)"
fi
shopt -s nullglob
wheels=("$tmp"/dist/*.whl)
sdists=("$tmp"/dist/*.tar.gz)
shopt -u nullglob
[ "${#wheels[@]}" -eq 1 ] || fail "expected one wheel in $tmp/dist, found ${#wheels[@]}"
[ "${#sdists[@]}" -eq 1 ] || fail "expected one sdist in $tmp/dist, found ${#sdists[@]}"
wheel="${wheels[0]}"
sdist="${sdists[0]}"

step "twine check --strict"
"$tools" -m twine check --strict "$tmp"/dist/* || fail "twine check"

# ---------------------------------------------------------------- 3: the assets are in both
step "checking that the wheel and the sdist hold minidiff/assets and the LICENSE"
"$tools" - "$root" "$wheel" "$sdist" <<'EOF' || fail "the distributions lack files (above)"
import pathlib, sys, tarfile, zipfile

root, wheel, sdist = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
assets = sorted(p.relative_to(root).as_posix() for p in (root / "minidiff" / "assets").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts)
if not assets:
    sys.exit("minidiff/assets is empty in the checkout")
in_wheel = set(zipfile.ZipFile(wheel).namelist())
with tarfile.open(sdist) as tar:
    top = tar.getnames()[0].split("/")[0]
    in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
missing = [f"wheel: {a}" for a in assets if a not in in_wheel]
missing += [f"sdist: {a}" for a in assets if a not in in_sdist]
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in in_wheel):
    missing.append("wheel: *.dist-info/licenses/LICENSE")
missing += [f"sdist: {f}" for f in ("LICENSE", "CHANGELOG.md", "README.md") if f not in in_sdist]
for m in missing:
    print("missing from the", m, file=sys.stderr)
if missing:
    sys.exit(1)
size = pathlib.Path(wheel).stat().st_size
print(f"  {len(assets)} asset files in both; wheel {size / 2**20:.2f} MiB, {len(in_wheel)} files; sdist {top}")
EOF

# ---------------------------------------------------------------- 4: a fresh environment
step "installing $(basename "$wheel") into a fresh virtual environment"
venv="$tmp/venv"
"$python" -m venv "$venv" || fail "cannot create a virtual environment with $python"
"$venv/bin/python" -m pip install -qq "$wheel" || fail "pip install of the wheel"

# ---------------------------------------------------------------- 5: run it outside the checkout
work="$tmp/work"
mkdir "$work"
cd "$work"
export PATH="$venv/bin:$PATH"
hash -r
step "importing minidiff from $work"
"$venv/bin/python" - "$root" "$venv" <<'EOF' || fail "minidiff is not imported from the fresh environment"
import os, sys, sysconfig

root, venv = (os.path.realpath(p) for p in sys.argv[1:3])
import minidiff

where = os.path.realpath(minidiff.__file__)
site = os.path.realpath(sysconfig.get_paths()["purelib"])
print(f"  minidiff {minidiff.__version__} from {where}")
inside = lambda path, folder: os.path.commonpath([path, folder]) == folder
if not (inside(where, site) and inside(site, venv)):
    sys.exit(f"minidiff was imported from {where}, not from the fresh environment's {site}")
leaks = [p for p in sys.path if p and inside(os.path.realpath(p), root)]
if leaks:
    sys.exit(f"the checkout {root} is on sys.path: {leaks}")
assets = os.path.join(os.path.dirname(where), "assets")
for name in ("digits8x8.npz", "mnist5k.npz", "classifier_digits.safetensors", "classifier_digits.json",
             "classifier_mnist.safetensors", "classifier_mnist.json"):
    if not os.path.isfile(os.path.join(assets, name)):
        sys.exit(f"the installed package lacks assets/{name}")
EOF

[ "$(command -v minidiff)" = "$venv/bin/minidiff" ] || fail "the minidiff command is $(command -v minidiff), not the fresh environment's"
expected="$(basename "$wheel" | cut -d- -f2)"
step "minidiff --version"
version="$(minidiff --version)" || fail "minidiff --version"
echo "  $version"
[ "$version" = "minidiff $expected" ] || fail "minidiff --version printed '$version', the wheel is $expected"

step "minidiff train --steps 20 --out r"
minidiff train --steps 20 --out r >"$tmp/train.log" 2>&1 || { cat "$tmp/train.log" >&2; fail "minidiff train"; }
tail -n 1 "$tmp/train.log"
[ -s r/checkpoint.safetensors ] || fail "minidiff train wrote no r/checkpoint.safetensors"

step "minidiff eval --checkpoint r --num 64"
minidiff eval --checkpoint r --num 64 >"$tmp/eval.log" 2>&1 || { cat "$tmp/eval.log" >&2; fail "minidiff eval"; }
grep -q "Frechet distance" "$tmp/eval.log" || { cat "$tmp/eval.log" >&2; fail "minidiff eval printed no Frechet distance"; }
grep -E "^\| Frechet distance" "$tmp/eval.log" || true

step "passed: $(basename "$wheel") and $(basename "$sdist") ($((SECONDS - start)) s in all)"
