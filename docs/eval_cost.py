"""Evaluation + checkpoint cost of one default run (docs/benchmarks.md): a fresh process,
gpubp imported before timing (as the CLI has it), the run directory on disk; prints
summary.json's eval_seconds / (seconds - eval_seconds), unrounded, and the test score.

    python docs/eval_cost.py DIR NAME     # DIR holds NAME.toml ([data] dataset = "csv",
                                          # path = "NAME.csv"), e.g. wine or diabetes
MES=N overrides trainer.MIN_EVAL_STEPS (the default evaluation cadence)."""

import os
import shutil
import sys

import gpubp.trainer as T
from gpubp.config import load_config


def main(folder: str, name: str) -> None:
    os.chdir(folder)
    T.round = lambda x, n=None: x  # the summary's seconds unrounded
    T.MIN_EVAL_STEPS = int(os.environ.get("MES", T.MIN_EVAL_STEPS))
    out = f"evalcost_{name}"
    shutil.rmtree(out, ignore_errors=True)
    s = T.Trainer(load_config(f"{name}.toml"), out, device="cpu", quiet=True).train()
    e, t = s["eval_seconds"], s["seconds"]
    score = s.get("test_accuracy", s.get("test_r2"))
    print(f"{name} {s['steps']} steps, test {score:.4f}, ratio {e / (t - e):.4f} (eval {e:.4f} s, run {t:.4f} s)")
    shutil.rmtree(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
