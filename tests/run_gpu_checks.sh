#!/usr/bin/env bash
# One visit to a GPU machine: the GPU tests (compute-sanitizer included), the
# bias-gradient kernel-vs-GEMV timing, and the facts docs/gpu-verification.md records.
# Run from the repository root: OUT=/some/dir bash tests/run_gpu_checks.sh
# Logs go to $OUT (default: gpu-out/).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python - <<'PY'
import cupy, numpy, sys
rt = cupy.cuda.runtime
print("python", sys.version.split()[0], "numpy", numpy.__version__, "cupy", cupy.__version__)
print("cuda runtime", rt.runtimeGetVersion(), "driver", rt.driverGetVersion())
PY
  command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null || echo "no compute-sanitizer"
} > "$OUT/env.txt" 2>&1

python -m pytest -m gpu -v -rs -p no:cacheprovider tests/ > "$OUT/pytest-gpu.txt" 2>&1
echo "pytest exit code: $?" >> "$OUT/pytest-gpu.txt"

python - > "$OUT/bias-grad-timing.txt" 2>&1 <<'PY'
# column sums of D' (n, m): our two-pass kernel vs cuBLAS GEMV with a ones vector
import cupy, numpy as np
from gpubp.backend.cupy_backend import CupyBackend
be = CupyBackend()
for dtype in (np.float32, np.float64):
    for n, m in [(128, 10), (128, 128), (1024, 512), (8192, 4096), (262144, 64), (262144, 10)]:
        d = cupy.random.standard_normal((n, m)).astype(dtype)
        out = cupy.empty(m, dtype)
        row = []
        for impl in ("kernel", "gemv"):
            be.bias_grad_impl = impl
            for _ in range(5):
                be.bias_grad(d, out)
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            times = []
            for _ in range(50):
                start.record(); be.bias_grad(d, out); stop.record(); stop.synchronize()
                times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3)
            row.append(f"{impl} {np.median(times):8.1f} us")
        print(f"{np.dtype(dtype).name} n={n:7d} m={m:5d}: " + "  ".join(row))
PY
echo "done; logs in $OUT"
