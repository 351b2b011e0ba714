#!/usr/bin/env bash
# Every speed and memory figure of the FP8 fast path (issue #7), on one GPU:
# SD3.5-Large and SD3.5-Medium architectures with random weights, 1024x1024, transformer batch 2,
# blocks compiled, steps replayed from CUDA graphs (the table also shows them launched kernel by kernel);
# the bf16 reference and the FP8 candidates measured in the same process.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-results}
mkdir -p "$out"
for model in sd35-large sd35-medium; do
    # An empty inductor cache: the compile times are those of a first run.
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m evals bench --model "models/configs/$model" \
        --policy fp8-e4m3-rowwise --policy benchmarks/policies/fp8-e4m3-rowwise-fast-accum.yaml \
        --resolution 1024 --batch 2 --cuda-graph --json "$out/$model.json" "${@:2}"
done
