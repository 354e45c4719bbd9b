#!/usr/bin/env bash
# Make sure commands are on PATH, installing the Debian packages that bring them where they are missing.
# Usage: ensure_debian_packages.sh COMMAND=PACKAGE...   (quick when every command is present; installing needs
# root or sudo, as on CI)
set -euo pipefail
need=()
for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null 2>&1 || need+=("${pair#*=}")
done
if [ "${#need[@]}" -eq 0 ]; then
    exit 0
fi
echo "[ensure_debian_packages] installing ${need[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "[ensure_debian_packages] need root (or sudo) to install ${need[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null || { echo "[ensure_debian_packages] ${pair#*=} did not bring ${pair%%=*}" >&2; exit 1; }
done
