#!/usr/bin/env bash
# The GPU check of the MZI engines, one table (docs/PERFORMANCE.md, "The fused engine"):
# one ZO estimate with device.engine=tiles/columns/fused at N = 64, 256, 1024 (M = 100, B = 256),
# peak memory, and a CIFAR-10-shaped epoch on generated images, device=mzi (engine=fused) against
# device=digital. No downloads; about five minutes at most. Arguments go to scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh [--sizes 64,256,1024] [--cap 60] [--no-epoch]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); this check needs one GPU. Nothing was run." >&2
    exit 2
fi
exec timeout 330 python scripts/gpu_check.py "$@"
