"""`gpubp gradcheck` through a real subprocess: exit 0 below the tolerance, 1 above, 2 for
a bad config; and the choice of samples clear of kinks."""

import re

import numpy as np

from gpubp import MLP
from gpubp.gradcheck import kink_margin, pick_samples

from .conftest import run_cli

# spirals' relu network, small and residual: kinks to avoid and a skip to sum through
SMALL = ["--config", "configs/spirals.toml", "--device", "cpu", "--samples", "3",
         "--set", "model.hidden=[8, 8]", "--set", "model.residual=true"]  # fmt: skip


def test_passes_below_tolerance_and_reports_each_layer():
    r = run_cli("gradcheck", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "model [2, 8, 8, 3] residual, float64" in r.stdout and "3 training samples" in r.stdout
    rows = re.findall(r"^\s+(\d)\s+\(\d+, \d+\)\s+(\S+)\s+(\S+)$", r.stdout, re.M)
    assert [int(layer) for layer, _, _ in rows] == [1, 2, 3]
    errors = [float(e) for _, w, b in rows for e in (w, b)]
    assert max(errors) < 1e-6 and re.search(r"^ok: max relative error \S+ <= --tol 1e-06$", r.stdout, re.M)


def test_fails_above_tolerance_with_one_line():
    # float64 differences are good to ~1e-10, never to 1e-15: the check must say so
    r = run_cli("gradcheck", *SMALL, "--tol", "1e-15")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"gpubp: error: gradcheck failed: layer \d max relative error \S+ > --tol 1e-15$", lines[0])  # fmt: skip
    assert "Traceback" not in r.stderr


def test_missing_config_is_a_usage_error():
    r = run_cli("gradcheck", "--config", "missing.toml")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "gpubp: error: config file 'missing.toml' not found; check the path (see configs/ for examples)"
    ]
    r = run_cli("gradcheck")
    assert r.returncode == 2 and r.stderr.strip() == "gpubp: error: give --config FILE (e.g. configs/digits.toml)"


def test_samples_on_a_kink_are_left_out():
    # zero biases: the all-zero input puts every relu pre-activation exactly on its kink
    model = MLP([3, 5, 2], "relu", dtype="float64", seed=0)
    x = np.random.default_rng(0).normal(size=(6, 3))
    x[[0, 3]] = 0.0
    rows, margin, seen = pick_samples(model, x, None, 3)
    # the rule, row by row: margin above 10 times the largest step 2h |x_i| (h = 1e-3)
    clear = [i for i in range(6) if kink_margin(model, x[i : i + 1]) > 0.02 * max(1.0, np.abs(x[i]).max())]
    assert 0 not in clear and 3 not in clear and len(clear) >= 3
    assert rows == clear[:3] and seen == rows[-1] + 1
    assert margin == min(kink_margin(model, x[i : i + 1]) for i in rows)
    # without kinks every sample counts
    smooth = MLP([3, 5, 2], "tanh", dtype="float64", seed=0)
    assert pick_samples(smooth, x, None, 3) == ([0, 1, 2], np.inf, 3)
