#!/usr/bin/env bash
# Make sure redis-server and redis-cli are on PATH (the Redis tier's tests start real servers).
# Quick when both are present; otherwise installs Debian's packages (needs root, as on CI).
set -euo pipefail
bash "$(dirname "$0")/ensure_debian_packages.sh" redis-server=redis-server redis-cli=redis-tools
