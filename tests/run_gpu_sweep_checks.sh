#!/usr/bin/env bash
# Issue 12 on a GPU machine: the stacked-model GPU tests, the captured sweep step's GPU
# tests (CUDA graph == plain, bitwise), a sweep run on the GPU, and `gpubp bench --case
# sweep` (stacked vs sequential vs torch.func; the sweep step plain and as a CUDA graph;
# sequential_graph: M single runs' captured steps). Then the CPU target on the machine's
# many cores (the dev VM has 2): `gpubp bench --case sweep --device cpu` with the default
# threads (the stacked pool: every usable CPU) -> bench-sweep-cpu.{json,md,txt}, and again
# with GPUBP_THREADS=n for each n in SWEEP_CPU_THREADS (default "8": half, the physical
# cores where the CPUs are SMT pairs; "" skips it) -> bench-sweep-cpu-t$n.*; cpu.txt: lscpu, and
# whether the optimizers' compiled CPU kernels (Numba) are installed and used.
# Budgets in seconds (env): T_STACK, T_SWEEP_GRAPH, T_SWEEP_TRAIN, T_SWEEP_BENCH, T_SWEEP_CPU (each CPU run).
# Run from the repo root:
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
# the CPU target (>= 3x sequential gpubp, >= 1.2x torch.func at M = 64 tiny models) on this machine's cores.
# The GPU machine has no numba and no network: carry the wheels (run's carry [".whl-numba"]: numba and
# llvmlite for its Python, `pip download numba llvmlite --python-version 3.12 --only-binary=:all:
# --platform manylinux_2_28_x86_64 --no-deps -d .whl-numba`, 62 MB) and they are installed here.
if ! $PY -c "import numba" 2> /dev/null && ls .whl-numba/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps .whl-numba/*.whl > "$OUT/numba-install.txt" 2>&1
fi
{ nproc; lscpu; $PY -c "from gpubp.backend import cpu_kernels; print('CPU kernels:', cpu_kernels.describe())"; } \
  > "$OUT/cpu.txt" 2>&1
timeout "${T_SWEEP_CPU:-120}" $PY -m gpubp bench --case sweep --device cpu --json "$OUT/bench-sweep-cpu.json" \
  --markdown "$OUT/bench-sweep-cpu.md" > "$OUT/bench-sweep-cpu.txt" 2>&1
echo "bench exit code: $?" >> "$OUT/bench-sweep-cpu.txt"
cpu_logs="$OUT/bench-sweep-cpu.txt"
# the same without the compiled updates (what a plain `pip install gpubp` gets)
GPUBP_CPU_KERNELS=numpy timeout "${T_SWEEP_CPU:-120}" $PY -m gpubp bench --case sweep --device cpu \
  --json "$OUT/bench-sweep-cpu-numpy.json" --markdown "$OUT/bench-sweep-cpu-numpy.md" > "$OUT/bench-sweep-cpu-numpy.txt" 2>&1
echo "bench (GPUBP_CPU_KERNELS=numpy) exit code: $?" >> "$OUT/bench-sweep-cpu-numpy.txt"
cpu_logs="$cpu_logs $OUT/bench-sweep-cpu-numpy.txt"
for n in ${SWEEP_CPU_THREADS-8}; do
  GPUBP_THREADS=$n timeout "${T_SWEEP_CPU:-120}" $PY -m gpubp bench --case sweep --device cpu \
    --json "$OUT/bench-sweep-cpu-t$n.json" --markdown "$OUT/bench-sweep-cpu-t$n.md" > "$OUT/bench-sweep-cpu-t$n.txt" 2>&1
  echo "bench (GPUBP_THREADS=$n) exit code: $?" >> "$OUT/bench-sweep-cpu-t$n.txt"
  cpu_logs="$cpu_logs $OUT/bench-sweep-cpu-t$n.txt"
done
# shellcheck disable=SC2086  # cpu_logs is a list of paths
cat "$OUT"/env.txt "$OUT"/pytest-stack-gpu.txt "$OUT"/pytest-sweep-graph-gpu.txt "$OUT"/sweep-train.txt "$OUT"/bench-sweep.txt \
  $cpu_logs
