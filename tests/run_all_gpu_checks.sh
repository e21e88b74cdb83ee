#!/usr/bin/env bash
# Every GPU check of the project in one visit (each script under its own budget), the
# logs packed into $OUT/gpu-logs.tar.gz (the device tool returns at most 8 files):
#   tests/run_gpu_checks.sh        bring-up: every gpu-marked test, sanitizers, bias gradient, and
#                                  tests/run_gpu_bench.sh: the speed issue's table (gpubp bench --device gpu
#                                  --markdown: graph / no graph, GEMM sum, PyTorch eager and torch.compile)
#   tests/run_gpu_sweep_checks.sh  sweeps: a 16-model sweep on the GPU, bench --case sweep (GPU, and CPU on its cores)
#   tests/run_dp_gpu_checks.sh     data parallel: NCCL with one rank, all-reduce timing, mpirun -n 1
#   tests/run_gpu_graph_checks.sh  the whole-step CUDA graph: bitwise tests, step time with and without
# An MPI for mpi4py may be carried as wheels in .whl/ (see docs/gpu-verification.md).
# Run from the repository root: OUT=/some/dir bash tests/run_all_gpu_checks.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT/logs"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
OUT="$OUT/logs" bash tests/run_gpu_checks.sh
OUT="$OUT/logs" timeout "${T_SWEEP:-200}" bash tests/run_gpu_sweep_checks.sh > /dev/null 2>&1
OUT="$OUT/logs" timeout "${T_DP:-150}" bash tests/run_dp_gpu_checks.sh > /dev/null 2>&1
OUT="$OUT/logs" timeout "${T_GRAPH:-300}" bash tests/run_gpu_graph_checks.sh > /dev/null 2>&1
tar -czf "$OUT/gpu-logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "logs in $OUT/gpu-logs.tar.gz"
