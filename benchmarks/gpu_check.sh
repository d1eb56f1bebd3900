#!/usr/bin/env bash
# Proves the CUDA path and measures speed on a borrowed GPU machine, in one short run (~5 min).
# Usage (from the repository root, with .venv built by `make install`, or a CUDA torch on PATH's python):
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.log when OUT is set
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SD="$PY -m stardomain.cli"
W=$(mktemp -d)
LOG=${OUT:-$W}/gpu_check.log
exec > >(tee "$LOG") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv || true
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.cuda.get_device_name())"
SET="--set train.epochs=3"
# training, evaluation, model files on CUDA (bf16 autocast as well)
for s in 0 1 2; do $SD train --seed $s --device cuda --out $W/s$s.safetensors $SET; done
$SD train --seed 9 --device cuda --out $W/h.safetensors $SET --set train.amp=true
$SD eval $W/s0.safetensors --device cuda --json
# Starlight, barrier and BMA on CUDA
$SD star --sources $W/s0.safetensors $W/s1.safetensors $W/s2.safetensors --device cuda --out $W/star.safetensors $SET
$SD barrier $W/star.safetensors $W/h.safetensors --device cuda --json-out $W/b.json
$SD bma --star $W/star.safetensors --sources $W/s0.safetensors $W/s1.safetensors --k 8 --seeds 1 --device cuda --json-out $W/bma.json
# speed: barrier fast path vs the per-t reference, on the GPU
$PY benchmarks/barrier.py --device cuda --reps 1 || true
echo "gpu_check: OK"
