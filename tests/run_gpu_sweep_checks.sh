#!/usr/bin/env bash
# Issue 12 on a GPU machine: the stacked-model GPU tests, the captured sweep step's GPU
# tests (CUDA graph == plain, bitwise), a sweep run on the GPU, and `gpubp bench --case
# sweep` (stacked vs sequential vs torch.func; the sweep step plain and as a CUDA graph). Run from the repo root:
#   OUT=/some/dir bash tests/run_gpu_sweep_checks.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/env.txt" 2>&1
$PY -c "import cupy, numpy, torch; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)" >> "$OUT/env.txt" 2>&1
timeout "${T_STACK:-180}" $PY -m pytest -m gpu -x -q -p no:cacheprovider tests/test_stack_gpu.py > "$OUT/pytest-stack-gpu.txt" 2>&1
echo "pytest exit code: $?" >> "$OUT/pytest-stack-gpu.txt"
# the sweep's step as a replayed CUDA graph equals the uncaptured sweep bitwise (gpubp/sweep_step.py)
timeout "${T_SWEEP_GRAPH:-240}" $PY -m pytest -m gpu -x -q -p no:cacheprovider tests/test_sweep_step_gpu.py > "$OUT/pytest-sweep-graph-gpu.txt" 2>&1
echo "pytest exit code: $?" >> "$OUT/pytest-sweep-graph-gpu.txt"
printf '[data]\nval_fraction = 0.2\n[model]\nhidden = [64]\n[train]\nepochs = 5\n[sweep]\n"optimizer.lr" = [1e-3, 3e-3, 1e-2, 3e-2]\n"train.seed" = [0, 1, 2, 3]\n' > "$OUT/sweep.toml"
timeout "${T_SWEEP_TRAIN:-120}" $PY -m gpubp train --config "$OUT/sweep.toml" --device gpu --out "$OUT/sweep-run" --quiet > "$OUT/sweep-train.txt" 2>&1
echo "train exit code: $?" >> "$OUT/sweep-train.txt"
rm -rf "$OUT/sweep-run"
timeout "${T_SWEEP_BENCH:-240}" $PY -m gpubp bench --case sweep --device gpu --json "$OUT/bench-sweep.json" --markdown "$OUT/bench-sweep.md" > "$OUT/bench-sweep.txt" 2>&1
echo "bench exit code: $?" >> "$OUT/bench-sweep.txt"
cat "$OUT"/env.txt "$OUT"/pytest-stack-gpu.txt "$OUT"/pytest-sweep-graph-gpu.txt "$OUT"/sweep-train.txt "$OUT"/bench-sweep.txt
