#!/usr/bin/env bash
# What the browser tests (tests/test_browser.py) need: Debian's headless Chromium and ChromeDriver,
# and the Python driver (Playwright, which drives /usr/bin/chromium and never downloads a browser).
# Run after `make install` (it installs into .venv). Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
        chromium chromium-driver fonts-dejavu-core
fi
/usr/bin/chromium --version

if ! .venv/bin/python -c "import playwright" 2>/dev/null; then
    .venv/bin/pip install -q -c constraints.txt -e '.[browser]'
fi
.venv/bin/python -c "import importlib.metadata as m; print('playwright', m.version('playwright'))"
