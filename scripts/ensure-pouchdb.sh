#!/usr/bin/env bash
# Installs the CouchDB-API stand-in (pouchdb-server) and, for the benchmark, IBM's couchbackup into the
# project's .local/node_modules. Idempotent: does nothing when both are already there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="$root/.local"
if ! command -v npm >/dev/null 2>&1; then
    echo "npm is missing: install Node.js 18+ (apt-get install nodejs npm)" >&2
    exit 1
fi
mkdir -p "$prefix"
if [ ! -x "$prefix/node_modules/.bin/pouchdb-server" ]; then
    npm install --prefix "$prefix" --omit=optional --no-audit --no-fund pouchdb-server@4.2.0
fi
if [ ! -x "$prefix/node_modules/.bin/couchbackup" ]; then
    npm install --prefix "$prefix" --no-audit --no-fund @cloudant/couchbackup@2.11.12
fi
