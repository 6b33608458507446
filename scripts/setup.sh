#!/usr/bin/env bash
# Set up Rooftop in ./.venv: the package (editable), its dependencies and the dev tools.
# Installs once: a stamp in .venv records the checksum of pyproject.toml and of this
# script it was set up for, and while both match a run returns at once without
# touching pip (code edits need no reinstall: the install is editable). A changed
# pyproject.toml, a deleted .venv or ROOFTOP_SETUP_FORCE=1 installs again. Quiet: pip's
# output is shown only when it fails. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.rooftop-setup

# cksum is POSIX (no sha256sum on macOS); it only has to notice a change, not an attack.
wanted=$(cksum pyproject.toml scripts/setup.sh)
if [ "${ROOFTOP_SETUP_FORCE:-0}" != 1 ] && [ -x .venv/bin/python ] && [ -x .venv/bin/agentctl ] \
    && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ]; then
    exit 0
fi

echo "setup: installing Rooftop and its tools into .venv (once per pyproject.toml change)..." >&2
rm -f "$STAMP"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! {
    { [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv; } \
        && .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip \
        && .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,plot]'
} >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: failed (output above); nothing stamped, the next run tries again" >&2
    exit 1
fi
echo "$wanted" >"$STAMP"
