#!/usr/bin/env bash
# Set up everything the tests need (Python packages, a Prometheus server, kustomize) and run
# every check: ruff, mypy, the import layering contracts, then pytest. GPU tests
# skip themselves without a GPU.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -x .ci/install-prometheus.sh ]; then
    .ci/install-prometheus.sh
fi
if [ -x .ci/install-kustomize.sh ]; then
    .ci/install-kustomize.sh
fi
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy
echo "== import layering (import-linter)"
.venv/bin/lint-imports --no-cache
echo "== pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure of the suite" >&2
    exit 1
fi
exit "$rc"
