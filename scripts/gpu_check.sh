#!/usr/bin/env bash
# The one GPU check (under 8 minutes on one H100/H200): `diffunet bench --gpu-check`, into $OUT
# (the device tool's output folder) or ./gpu_check. On a CPU, to check the check:
#   scripts/gpu_check.sh --device cpu --quick
set -euo pipefail
exec python -m diffunet bench --gpu-check "${OUT:-gpu_check}" --json "" "$@"
