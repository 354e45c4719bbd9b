#!/usr/bin/env bash
# Make sure redis-server and redis-cli are on PATH (the Redis tier's tests start real servers).
# Quick when both are present; otherwise installs Debian's packages (needs root, as on CI).
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
if [ "${#need[@]}" -eq 0 ]; then
    exit 0
fi
echo "[ensure_redis] installing ${need[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "[ensure_redis] need root (or sudo) to install ${need[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${need[@]}" >/dev/null
command -v redis-server >/dev/null && command -v redis-cli >/dev/null
echo "[ensure_redis] $(redis-server --version | cut -d' ' -f1-3)"
