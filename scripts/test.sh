#!/usr/bin/env bash
# The test suite (what CI runs): bootstrap, prepare the demo model, then pytest.
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
bash scripts/ensure_redis.sh   # the Redis tier's tests start real redis-server processes
# the daemon's status page is tested in a real headless browser: Debian's chromium, driven by selenium
bash scripts/ensure_debian_packages.sh chromium=chromium chromedriver=chromium-driver
.venv/bin/kvmesh model prepare
exec .venv/bin/python -m pytest "$@"
