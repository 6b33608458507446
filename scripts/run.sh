#!/usr/bin/env bash
# Set up Rooftop and run the main job: on a GPU host, diagnose every GPU; on a machine
# without an NVIDIA driver, the demo (collector + agents replaying real H100
# recordings, with a live fleet view and a Prometheus endpoint). Extra arguments go to
# the command that runs. Usage: scripts/run.sh [args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if .venv/bin/python -c 'import pynvml; pynvml.nvmlInit()' 2>/dev/null; then
    exec .venv/bin/agentctl diagnose "$@"
fi
echo "No NVIDIA driver here: running the demo (a replay of real H100 recordings)." >&2
exec .venv/bin/agentctl demo "$@"
