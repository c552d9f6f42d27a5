#!/bin/sh
# Installs Debian's rsync when it is missing: bench/directory.py compares the directory copy engine with
# `rsync -a --delete --link-dest`. Does nothing when rsync is already on PATH.
set -eu

if command -v rsync >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# Only refresh the package lists when apt does not know the package yet.
if ! apt-cache show rsync >/dev/null 2>&1; then
    $SUDO apt-get update
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rsync
rsync --version | head -n 1
