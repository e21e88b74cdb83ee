#!/usr/bin/env bash
# Data parallel on a GPU machine (issue 13): the NCCL engine with one rank against the
# plain GPU run (overlapped and not), the NCCL all-reduce of the wide bench gradient,
# `mpirun -n 1` through the CLI, and the step time of the wide model with and without
# the overlap. Needs: CuPy, mpi4py + an mpirun, NCCL (pip install '.[cuda12,mpi,nccl-cuda12]').
# Run from the repository root: OUT=/some/dir bash tests/run_dp_gpu_checks.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
MPIRUN=$(command -v mpirun || echo "$(dirname "$(command -v "$PY")")/mpirun")

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import cupy, mpi4py; from cupy.cuda import nccl; print('cupy', cupy.__version__, 'mpi4py', mpi4py.__version__, 'nccl', nccl.get_version() if nccl.available else 'MISSING')"
} > "$OUT/dp-env.txt" 2>&1

GPUBP_TIMING_OUT="$OUT/dp-allreduce.json" $PY -m pytest -v -s -rs -p no:cacheprovider tests/test_distributed_gpu.py \
  > "$OUT/dp-pytest-gpu.txt" 2>&1
echo "pytest exit code: $?" >> "$OUT/dp-pytest-gpu.txt"

# the CLI under a launcher: one rank, NCCL, digits
"$MPIRUN" -n 1 $PY -m gpubp train --config configs/digits.toml --device gpu --set train.steps=200 \
  --out "$OUT/dp-mpirun-1" --overwrite > "$OUT/dp-mpirun-1.txt" 2>&1
echo "exit code: $?" >> "$OUT/dp-mpirun-1.txt"

# step time of the wide model (4096 x 5 layers, batch 8192, float32) on the NCCL path, overlap on/off:
# forward, backward, all-reduce and Adam update, timed over 20 steps after 3 warm-ups
$PY - > "$OUT/dp-overlap-timing.txt" 2>&1 <<'PY'
import os, time
from mpi4py import MPI
from gpubp.config import validate
from gpubp.distributed import MPIWorld
from gpubp.trainer import Trainer

raw = {"data": {"dataset": "regression", "n_samples": 8192, "n_features": 4096, "test_fraction": 0.0},
       "model": {"hidden": [4096] * 4, "activation": "relu"}, "loss": {"name": "mse"},
       "train": {"batch_size": 8192, "steps": 1}}
cfg = validate(raw, "wide-like")
for overlap in ("1", "0", "1", "0"):
    os.environ["GPUBP_NCCL_OVERLAP"] = overlap
    world = MPIWorld(MPI.COMM_WORLD)
    t = Trainer(cfg, f"/tmp/dp-wide-{overlap}", device="gpu", quiet=True, overwrite=True, dist=world)
    world.start(t)
    be, model, opt, part = t.run.backend, t.model, t.opt, t.run.splits["train"]
    def step():
        world.forward_backward(model, part.x, part.target, part.n, lambda: False)
        opt.step()
    for _ in range(3):
        step()
    be.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        step()
    be.synchronize()
    ms = (time.perf_counter() - start) / 20 * 1e3
    print(f"overlap={overlap}: {ms:.2f} ms per step (wide [4096]*6, batch 8192, float32, 1 rank, NCCL)")
    world.close()
PY
echo "exit code: $?" >> "$OUT/dp-overlap-timing.txt"
