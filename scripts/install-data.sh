#!/usr/bin/env bash
# Install Fashion-MNIST from Debian's package where apt is available; elsewhere lcm downloads and verifies it.
set -u
if [ -d /usr/share/datasets/fashion-mnist ]; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    if { $SUDO apt-get install -y -qq dataset-fashion-mnist || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; }; } >/dev/null 2>&1; then
        echo "installed Fashion-MNIST (dataset-fashion-mnist) into /usr/share/datasets/fashion-mnist"
        exit 0
    fi
fi
echo "Fashion-MNIST not installed from apt; lcm will download and checksum it on first use (or give --data-dir)."
exit 0
