#!/usr/bin/env bash
# Lint and type checks (what CI runs first): ruff over the code, tests and benchmarks; mypy over the package.
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
