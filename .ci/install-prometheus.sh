#!/usr/bin/env bash
# Install a real Prometheus server for tests/collector/test_prometheus_scrape.py.
#
# Idempotent: does nothing when a `prometheus` binary is already on PATH. Uses Debian's
# package (the only registry reachable from CI besides PyPI/npm) and never starts the
# systemd unit: the test runs its own server on a loopback port with a temp config.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
    echo "prometheus already installed: $(command -v prometheus)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-prometheus: not root and no sudo; skipping (the test will skip)" >&2
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d exit 101 keeps the package's postinst from starting the daemon in a
# container without systemd (and on hosts with it: the test starts its own server).
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    CREATED_POLICY=1
fi
cleanup() {
    if [ "$CREATED_POLICY" = 1 ]; then $SUDO rm -f "$POLICY"; fi
}
trap cleanup EXIT

# A mirror hiccup must not fail the whole suite: the Prometheus test then skips,
# saying why, and this says so loudly.
if ! $SUDO apt-get update -qq || \
   ! $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; then
    echo "install-prometheus: WARNING: apt-get could not install prometheus;" \
         "tests/collector/test_prometheus_scrape.py will skip" >&2
    exit 0
fi

# Belt and braces: if a systemd is running, make sure the packaged service is not.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

echo "prometheus installed: $(command -v prometheus) ($(prometheus --version 2>&1 | head -1))"
