#!/usr/bin/env bash
# The whole-step CUDA graph on a GPU (the GPU speed issue's first two bullets), logs in $OUT:
#   graph-pytest.txt   tests/test_step_gpu.py (graph == no graph bitwise, no allocation in replays)
#                      and the CPU contract checks of the raw cuBLAS / ctypes calls
#   graph-time.md      microseconds per trainer step with and without the graph (tests/graph_step_time.py)
#   graph-cpu.txt      tests/test_step.py (the CPU proof), to see it beside the GPU's
# Run from the repository root: OUT=/some/dir bash tests/run_gpu_graph_checks.sh
# Budgets in seconds (env): T_PYTEST, T_TIME.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=$(command -v python3)
timeout "${T_PYTEST:-240}" "$PY" -m pytest -v -rs -p no:cacheprovider tests/test_step_gpu.py tests/test_gpu_contract.py \
  > "$OUT/graph-pytest.txt" 2>&1
echo "pytest exit code: $?" >> "$OUT/graph-pytest.txt"
timeout "${T_TIME:-240}" "$PY" tests/graph_step_time.py > "$OUT/graph-time.md" 2>&1
echo "exit: $?" >> "$OUT/graph-time.md"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_step.py > "$OUT/graph-cpu.txt" 2>&1
echo "done; logs in $OUT"
