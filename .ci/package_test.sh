#!/usr/bin/env bash
# Packaging check (part of `make test`): install flowgmm-fast the way a user of the released files would.
#   1. the sdist, made with the switches that used to drop sources (FLOWGMM_FAST_BUILD_EXT=0, _CUDA=0): it must hold
#      every source, header and .cu file all the same;
#   2. a CPU-only wheel built from that sdist (not from the checkout) against the torch of $PYTHON's environment;
#   3. a fresh virtual environment into which pip installs the wheel and what it requires (torch pinned by the wheel,
#      held to the same release as $PYTHON's by a constraint, from the package index / local cache);
#   4. tests/smoke_installed.py run from a folder outside the repository: import, `python -m flowgmm_fast`, metadata,
#      one op per available backend, one FlowGMM training step.
# Environment: PYTHON (default .venv/bin/python; needs torch, setuptools>=77, build); KEEP=1 keeps the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
start=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/flowgmm-package.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "package-test: work folder $work"; else trap 'rm -rf "$work"' EXIT; fi
step() { echo "package-test [$((SECONDS - start)) s]: $*"; }

step "sdist"
FLOWGMM_FAST_BUILD_EXT=0 FLOWGMM_FAST_BUILD_CUDA=0 "$PY" -m build --sdist --no-isolation --outdir "$work/dist" . \
    >"$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/flowgmm_fast-*.tar.gz)
"$PY" - "$sdist" <<'EOF'
import subprocess, sys, tarfile
names = {n.split("/", 1)[1] for n in tarfile.open(sys.argv[1]).getnames() if "/" in n}
tracked = subprocess.run(["git", "ls-files", "csrc", "kernels", "flowgmm_fast", "LICENSE"], capture_output=True,
                         text=True, check=True).stdout.split()
missing = sorted(set(tracked) - names)
if missing or any(n.endswith(".so") for n in names):
    raise SystemExit(f"package-test: sdist lacks {missing} or holds a compiled file")
print(f"package-test: {sys.argv[1].rsplit('/', 1)[1]} holds all {len(tracked)} tracked package files")
EOF

step "CPU-only wheel from the sdist (compiles the CPU kernels)"
FLOWGMM_FAST_BUILD_CUDA=0 "$PY" -m pip wheel --quiet --no-build-isolation --no-deps --wheel-dir "$work/dist" "$sdist"
wheel=$(ls "$work"/dist/flowgmm_fast-*.whl)
echo "package-test: $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"

step "fresh virtual environment, pip install the wheel"
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --upgrade pip >"$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
"$PY" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" >"$work/constraints.txt"
"$work/venv/bin/python" -m pip install --quiet --constraint "$work/constraints.txt" "$wheel"
"$work/venv/bin/python" -m pip check

step "smoke test from outside the repository"
mkdir "$work/run"
cp tests/smoke_installed.py "$work/run/"
(cd "$work/run" && env -u PYTHONPATH -u TRITON_INTERPRET -u FLOWGMM_FAST_BACKEND \
    "$work/venv/bin/python" smoke_installed.py --expect-native)
step "passed"
