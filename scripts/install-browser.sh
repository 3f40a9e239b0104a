#!/usr/bin/env bash
# Install headless Chromium and its driver from Debian's packages for the browser test of lcm serve; never fails.
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    if { $SUDO apt-get install -y -qq chromium chromium-driver || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver; }; } >/dev/null 2>&1; then
        echo "installed chromium and chromedriver (chromium, chromium-driver) for the browser test of lcm serve"
        exit 0
    fi
fi
echo "chromium/chromedriver not installed from apt; the browser test of lcm serve (tests/test_serve_browser.py) will be skipped."
exit 0
