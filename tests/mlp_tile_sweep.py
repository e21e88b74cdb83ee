"""Choosing the fused MLP kernel's tiling on a GPU (as BIAS_GRAD_MAX_CHUNKS was chosen):
the captured training step of bench cases with train.fused_mlp = true, for several
values of cupy_backend.MLP_TILES (tiles a batch is cut into), MLP_MAX_ROWS (rows a tile
at most), MLP_ROWS_PER_THREAD and MLP_COLS_PER_THREAD (a thread's register tile in the
products) and MLP_RESIDENT_WEIGHTS (every W staged once per block where it fits, or once
per tile), against the separate ops' step (train.fused_mlp = false), all timed in the
same rounds (bench.steps_ms). Then, per case, its network at batches of 128 to 16384 rows:
the separate ops' step against the fused MLP's with the constants as they are, and what
train.fused_mlp = "auto" chose (cupy_backend.mlp_pays): where the two cross is where
MLP_AUTO_TILE_FMAS belongs. A tuning aid, not a speed claim: the claim is `gpubp bench`'s
"mlp x" column once the constants are chosen.

    python3 tests/mlp_tile_sweep.py [CASE ...]      (default: tiny narrow)

Prints, per case, a line per distinct launch: rows per tile, blocks, rows and columns
per thread, whether the weights were resident, us/step, and the separate ops' step over
it (> 1: the fused MLP is faster); then a line per batch.
"""

from __future__ import annotations

import gc
import sys


def sweep(case_name: str, backend=None, steps: int | None = None) -> None:
    """The sweep of one case on `backend` (a CupyBackend; the tests pass the recording
    backend), `steps` timed steps (the case's GPU count)."""
    from gpubp import bench as B
    from gpubp.activations import make_activation
    from gpubp.backend import cupy_backend as C

    (case,) = B.find_cases([case_name])
    backend = backend or C.CupyBackend()
    warmup, gpu_steps = case.counts("gpu")
    warmup, steps = max(warmup, 3), steps or gpu_steps
    settings = [(t, r, rt, ct, w) for t in (16, 32, 64) for r in (16, 32, 64) for rt in (2, 4) for ct in (1, 4)
                for w in (True, False)]  # fmt: skip
    names = ("MLP_TILES", "MLP_MAX_ROWS", "MLP_ROWS_PER_THREAD", "MLP_COLS_PER_THREAD", "MLP_RESIDENT_WEIGHTS")
    saved = tuple(getattr(C, name) for name in names)

    def use(setting):
        for name, value in zip(names, setting):
            setattr(C, name, value)

    saves_z = [make_activation(case.activation).saves == "input"] * (len(case.sizes) - 2) + [False]
    grids = {}  # setting -> (rows a tile, blocks, rows a thread, columns a thread at most, resident): each launch once
    try:
        for setting in settings:
            use(setting)
            r = C.mlp_tile_rows(case.sizes, saves_z, 4, case.batch)
            if r == 0:
                print(f"{case.name}: the network does not fit the fused MLP kernel", flush=True)
                return
            key = (r, min(-(-case.batch // r), C.MLP_MAX_BLOCKS), min(C.MLP_ROWS_PER_THREAD, r), *setting[3:])
            if key not in grids.values():
                grids[setting] = key
        dataset = B._dataset(case)
        runs = {"separate": B.TrainerStep(case, backend, "float32", True, 10**5, dataset, fused_mlp=False)}
        for setting in grids:
            use(setting)
            step = runs[setting] = B.TrainerStep(case, backend, "float32", True, 10**5, dataset, fused_mlp=True)
            assert step.trainer.model.fused_mlp_fits(case.batch)
            for _ in range(3):  # plain, captured, replayed: the graph holds this setting's launch
                step()
        ms = B.steps_ms(runs, backend.synchronize, warmup, steps)
    finally:
        use(saved)
    print(f"{case.name} (batch {case.batch}, float32): separate ops' step {1e3 * ms['separate']:.1f} us", flush=True)
    for setting, (r, blocks, rt, ct, resident) in grids.items():
        print(f"  tiles {setting[0]:>3} max rows {setting[1]:>2}: {r:>2} rows a tile, {blocks:>4} blocks, "
              f"{rt} rows x {ct} columns a thread, weights {'resident if they fit' if resident else 'per tile'}: "
              f"{1e3 * ms[setting]:9.1f} us/step, "
              f"separate / this {ms['separate'] / ms[setting]:.2f}", flush=True)  # fmt: skip
    runs.clear()
    gc.collect()


BATCHES = (128, 512, 2048, 8192, 16384)


def batches(case_name: str, backend=None, steps: int | None = None, sizes=BATCHES) -> None:
    """Per batch of `sizes` rows, the case's network: the separate ops' captured step and
    the fused MLP's (the constants as they are), timed in the same rounds, and whether
    train.fused_mlp = "auto" takes the fused MLP there (the model's runs_fused_mlp)."""
    from dataclasses import replace

    from gpubp import bench as B
    from gpubp.backend import cupy_backend as C

    (case,) = B.find_cases([case_name])
    backend = backend or C.CupyBackend()
    warmup, gpu_steps = case.counts("gpu")
    warmup, steps = max(warmup, 3), steps or gpu_steps
    for n in sizes:
        at = replace(case, batch=n)
        dataset = B._dataset(at)
        runs = {fused: B.TrainerStep(at, backend, "float32", True, 10**5, dataset, fused_mlp=fused)
                for fused in (False, True)}  # fmt: skip
        if not runs[True].trainer.model.fused_mlp_fits(n):
            print(f"{case.name} at {n} rows: the network does not fit the fused MLP kernel", flush=True)
            continue
        auto = B.TrainerStep(at, backend, "float32", True, 10**5, dataset).trainer.model.runs_fused_mlp(n)
        ms = B.steps_ms(runs, backend.synchronize, warmup, steps)
        print(f"{case.name} at {n:>6} rows: separate ops {1e3 * ms[False]:9.1f} us, fused MLP {1e3 * ms[True]:9.1f} us, "
              f"separate / fused {ms[False] / ms[True]:.2f}; auto takes the {'fused MLP' if auto else 'separate ops'}",
              flush=True)  # fmt: skip
        runs.clear()
        gc.collect()


if __name__ == "__main__":
    for name in sys.argv[1:] or ["tiny", "narrow"]:
        sweep(name)
    for name in sys.argv[1:] or ["tiny", "narrow"]:
        batches(name)
