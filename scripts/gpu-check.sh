#!/usr/bin/env bash
# One command on a GPU host: set up what the GPU tests need, then measure and test the
# GPU stack and write gpu-check.json (scripts/gpu_check.py says what is in it):
# driver / NVML / pynvml versions, MIG mode and uid; the time of every NVML call the
# sampling loop makes, per call and per GPU; fresh GPM readings at 1 Hz and 10 Hz; the
# result of every gpu-marked test; the same sampling as the unprivileged user nobody.
# Extra arguments go to gpu_check.py (e.g. --fake h100 for a dry run without a GPU).
# Exit status: 0 all good, 1 no usable NVIDIA driver or a problem found (listed).
# Usage: scripts/gpu-check.sh [gpu_check.py args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# No driver: one clear line now, before downloading gigabytes of torch for nothing.
if ! backend=$(timeout 120 .venv/bin/python scripts/gpu_check.py --probe "$@"); then
    exit 1
fi

# The GPU tests run workloads with torch (and transformers for the HF-generate one); on a
# GPU host they fail without them, so put them into the project's venv once.
install_if_missing() {
    local module=$1 package=$2
    if .venv/bin/python -c "import $module" 2>/dev/null; then
        return 0
    fi
    echo "gpu-check: installing $package into .venv (the GPU tests need it; once)..." >&2
    # pip's own progress shows: torch with its CUDA libraries is a few GB.
    if ! timeout 1800 .venv/bin/python -m pip install --disable-pip-version-check "$package"; then
        echo "gpu-check: could not install $package into .venv (pip output above; a host" \
            "without internet cannot download it: copy a wheel over and run" \
            ".venv/bin/pip install <wheel>). Going on: the GPU tests will fail with" \
            "'$module is missing'." >&2
    fi
}
if [ "$backend" = real ]; then
    install_if_missing torch torch
    install_if_missing transformers transformers
fi

# gpu_check.py keeps to 10 min (--deadline): ~1 min of sampling and probes, the GPU
# tests (at most 7 min), the unprivileged run (at most 2 min, as root). The hard stop
# here only catches a driver call that hangs.
exec timeout --kill-after=15 660 .venv/bin/python scripts/gpu_check.py \
    --out gpu-check.json --pytest --unprivileged nobody "$@"
