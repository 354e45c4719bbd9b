#!/usr/bin/env bash
# The main job on embedded defaults: prepare the demo model, run kvmesh on it, show cold vs warm.
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/kvmesh demo "$@"
