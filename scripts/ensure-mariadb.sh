#!/usr/bin/env bash
# Installs the MariaDB server and client the sqlsync tests start (mariadb-install-db, mariadbd, mariadb,
# mariadb-dump). Idempotent: does nothing when they are already on PATH or in /usr/sbin.
set -euo pipefail

have_all() {
  for bin in mariadb mariadb-dump mariadb-install-db; do
    command -v "$bin" >/dev/null 2>&1 || return 1
  done
  command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || return 1
}

if have_all; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

# The packages must not start a system-wide server: the tests start their own on a temporary datadir.
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show mariadb-server >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends mariadb-server mariadb-client; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends mariadb-server mariadb-client
fi
# A Debian install may have launched the system service; the tests do not need it.
if command -v service >/dev/null 2>&1; then
  $SUDO service mariadb stop >/dev/null 2>&1 || true
fi
have_all || { echo "ensure-mariadb: mariadb binaries still missing after install" >&2; exit 1; }
