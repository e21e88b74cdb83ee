#!/usr/bin/env bash
# The GPU speed issue's table in one run (gpubp bench, PyTorch eager and torch.compile in the
# same process), logs in $OUT:
#   bench.md / bench.json  every row: gpubp's step captured as a CUDA graph and uncaptured,
#                          samples/s, TFLOP/s (6 x weights x batch), the sum of the step's GEMM
#                          times and step / GEMM (the wide target), PyTorch eager and
#                          torch.compile (default and reduce-overhead, the faster kept), the
#                          per-op table of the uncaptured step; both files are rewritten after
#                          each row, so a run cut short by T_BENCH keeps what it measured
#   bench.txt              the console table as rows finish, and the exit code
# Rows: float32 (every target's precision) and bf16 (narrow's bf16 >= 1.5x our float32, wide's
# bf16 TFLOP/s); torch.compile in the float32 rows only (the targets compare with it there:
# each compile takes tens of seconds). BENCH_ARGS replaces those choices, e.g.
# BENCH_ARGS="--case tiny" or BENCH_ARGS="--no-compile"; BENCH_EXTRA is added to either
# (run_gpu_checks.sh: --no-fused-mlp after a failed fused-MLP test).
# Run from the repository root: OUT=/some/dir bash tests/run_gpu_bench.sh
# Budget in seconds (env): T_BENCH.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=$(command -v python3)
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} > "$OUT/bench.txt" 2>&1
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout "${T_BENCH:-420}" "$PY" -m gpubp.cli bench --device gpu \
  ${BENCH_ARGS---precision float32 --precision bf16 --compile-precision float32} ${BENCH_EXTRA:-} \
  --json "$OUT/bench.json" --markdown "$OUT/bench.md" --overwrite >> "$OUT/bench.txt" 2>&1
echo "exit: $?" >> "$OUT/bench.txt"
