#!/usr/bin/env bash
# Installs Debian's chromium for the status-page browser test (tests/test_status_page.py); the Playwright Python
# package that drives it comes with requirements-dev.txt. Does nothing when chromium is present.
# Playwright's own browser download is never used: the test launches /usr/bin/chromium.
set -euo pipefail

if [ ! -x /usr/bin/chromium ]; then
  if ! apt-cache show chromium >/dev/null 2>&1; then
    apt-get update
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core
fi

