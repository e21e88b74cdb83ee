"""Time and memory of reading a ~38 MB CSV: gpubp's reader against numpy.loadtxt.

    python docs/csv_read_bench.py [--rows 250000] [--repeats 5]

Writes two seeded files to a temporary folder, 16 float features (6 decimals) and a
label column: one with integer labels (numpy.loadtxt reads it too) and one with text
labels. Each read runs in a fresh process; the figures are the median wall time and
the median growth of the peak resident memory (VmHWM, Linux) over the process's
size before the read. docs/csv-reading.md records the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the peak resident size of this process image (VmHWM, KiB; unlike ru_maxrss it does not
# carry over the parent's peak through fork and exec)
PROBE = r"""
import sys, time
import numpy as np
from gpubp import data as D
def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
which, path = sys.argv[1], sys.argv[2]
before = peak()
t = time.perf_counter()
if which == "numpy.loadtxt":
    x = np.loadtxt(path, delimiter=",", skiprows=1)
else:
    x = D.load_csv(path, "label", None).x
t = time.perf_counter() - t
print(t, (peak() - before) / 1024, x.shape[0])
"""


def write_files(folder: str, rows: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 16))
    y = rng.integers(0, 3, rows)
    header = ",".join([f"f{j}" for j in range(16)] + ["label"]) + "\n"
    paths = {"numeric": os.path.join(folder, "numeric.csv"), "text labels": os.path.join(folder, "text.csv")}
    with open(paths["numeric"], "w") as f:
        f.write(header)
        np.savetxt(f, np.column_stack([x, y]), delimiter=",", fmt=["%.6f"] * 16 + ["%d"])
    names = np.array(["alpha", "beta", "gamma"])
    with open(paths["text labels"], "w") as f:
        f.write(header)
        for i in range(0, rows, 10_000):
            block = [",".join(f"{v:.6f}" for v in r) + "," + names[c] for r, c in zip(x[i : i + 10_000], y[i:])]
            f.write("\n".join(block) + "\n")
    return paths


def measure(which: str, path: str) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", PROBE, which, path], capture_output=True, text=True, env=env,
                         check=True).stdout.split()  # fmt: skip
    return float(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=250_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(folder, args.rows)
        runs = [("numpy.loadtxt", "numeric"), ("gpubp", "numeric"), ("gpubp", "text labels")]
        results = {run: [] for run in runs}
        for _ in range(args.repeats):  # interleaved, so that load on the machine hits all alike
            for which, kind in runs:
                results[(which, kind)].append(measure(which, paths[kind]))
        print("| reader | file | size MB | time s (median) | peak memory growth MB (median) |")
        print("|---|---|---|---|---|")
        for (which, kind), values in results.items():
            size = os.path.getsize(paths[kind]) / 1e6
            t = statistics.median(v[0] for v in values)
            m = statistics.median(v[1] for v in values)
            print(f"| {which} | {kind} | {size:.1f} | {t:.2f} | {m:.0f} ({m / size:.1f}x the file) |")


if __name__ == "__main__":
    main()
