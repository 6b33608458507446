#!/usr/bin/env bash
# Install a real Prometheus server for tests/collector/test_prometheus_scrape.py.
#
# Idempotent: does nothing when `prometheus` and `promtool` are already on PATH. Uses
# Debian's package (the only registry reachable from CI besides PyPI/npm) and never
# starts the systemd unit: the test runs its own server on a loopback port with a temp
# config.
#
# Under CI (env CI set, as the CI runner does) a Prometheus that cannot be installed is
# an error: this exits non-zero, and the tests that need it fail rather than skip
# (tests/support.py require_tool). Elsewhere it warns and the tests skip, saying why.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

TOOL=prometheus
NEEDS="the tests that need Prometheus"
# shellcheck source=.ci/give-up.sh
. "$HERE/give-up.sh"

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "prometheus already installed: $(command -v prometheus)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        give_up "not root and no sudo"
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

# Outside CI a mirror hiccup must not fail the whole suite: the Prometheus tests then
# skip, saying why, and this says so loudly. Under CI it fails the run.
if ! $SUDO apt-get update -qq || \
   ! $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; then
    give_up "apt-get could not install prometheus"
fi
for tool in prometheus promtool; do
    command -v "$tool" >/dev/null 2>&1 || give_up "the prometheus package installed no $tool"
done

# Belt and braces: if a systemd is running, make sure the packaged service is not.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

echo "prometheus installed: $(command -v prometheus) ($(prometheus --version 2>&1 | head -1))"
