#!/usr/bin/env bash
# The captured training step's per-kernel table (Nsight Systems), logs in $OUT:
#   profile.md     per case: each kernel's launches and microseconds per step, and the
#                  step's GPU span against the sum of its kernels (tests/graph_kernel_profile.py);
#                  profile-mlp.md with PROFILE_FUSED_MLP=1
#   profile.txt    nsys's own output, the exit codes
# Without nsys (PATH, /usr/local/cuda*/bin, /opt/nvidia/nsight-systems*/bin) it says so and
# stops. The .nsys-rep reports are deleted (too large to bring back); the CSVs stay.
# Run from the repository root: OUT=/some/dir bash tests/run_gpu_profile.sh
# Env: PROFILE_CASES (default "tiny mnist-100 narrow"), PROFILE_PRECISION (float32),
# PROFILE_STEPS (200), T_PROFILE (seconds per case, 90), T_STATS (nsys stats per case, 60),
# PROFILE_FUSED_MLP (1: the step with
# train.fused_mlp = true, the one-kernel forward and backward pass of kernels/mlp.cu).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=$(command -v python3)
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
if [ -z "$NSYS" ]; then
  echo "no nsys on this machine: no per-kernel profile (gpubp bench's per-op table, uncaptured, stands in)" \
    | tee "$OUT/profile.txt" > "$OUT/profile.md"
  exit 0
fi
STEPS=${PROFILE_STEPS:-200}
PRECISION=${PROFILE_PRECISION:-float32}
{ date -u; "$NSYS" --version; } >> "$OUT/profile.txt" 2>&1
export PROFILE_FUSED_MLP=${PROFILE_FUSED_MLP:-0}
MD="$OUT/profile.md"
[ "$PROFILE_FUSED_MLP" = 1 ] && MD="$OUT/profile-mlp.md"
echo "# Captured step, per kernel ($PRECISION, $STEPS steps, fused MLP $PROFILE_FUSED_MLP; $("$NSYS" --version 2>&1 | head -1))" > "$MD"
for case in ${PROFILE_CASES:-tiny mnist-100 narrow}; do
  rep="$OUT/prof-$case-mlp$PROFILE_FUSED_MLP"
  timeout "${T_PROFILE:-90}" "$NSYS" profile --force-overwrite true --trace cuda --cuda-graph-trace node \
    --capture-range cudaProfilerApi --sample none --cpuctxsw none -o "$rep" \
    "$PY" tests/graph_kernel_profile.py run "$case" "$PRECISION" "$STEPS" >> "$OUT/profile.txt" 2>&1
  echo "nsys profile $case: exit $?" >> "$OUT/profile.txt"
  timeout "${T_STATS:-60}" "$NSYS" stats --force-export true --report cuda_gpu_kern_sum,cuda_gpu_trace --format csv \
    --output "$rep" "$rep.nsys-rep" >> "$OUT/profile.txt" 2>&1
  echo "nsys stats $case: exit $?" >> "$OUT/profile.txt"
  { echo; "$PY" tests/graph_kernel_profile.py table "$case" "$STEPS" "${rep}_cuda_gpu_kern_sum.csv" \
      "${rep}_cuda_gpu_trace.csv"; } >> "$MD" 2>&1
  rm -f "$rep.nsys-rep" "$rep.sqlite" "${rep}_cuda_gpu_trace.csv"
done
echo "done; logs in $OUT"
