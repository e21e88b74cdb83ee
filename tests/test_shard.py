"""Each rank reads only its rows (gpubp/shard.py, the memory-mapped loaders of
gpubp/data.py): the mapped loaders give the whole-file loaders' data; the
standardisation statistics from per-rank partial sums equal one process's; under
mpirun a memory-mapped .npz trains exactly as one process reading it whole, and each
rank reads only its shares of the splits and its slices of the batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from gpubp import data as D
from gpubp.distributed import row_range
from gpubp.errors import DataError
from tests.conftest import ROOT
from tests.test_data import write_idx
from tests.test_distributed import _env, _mpirun, assert_same_run, mpi_train, params


def run_ranks(rank, size: int) -> None:
    """rank(r) for r < size, each on its own thread (the ranks of a ThreadWorld), joined."""
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ----------------------------------------------------------------- loaders, without MPI


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.uint8, np.int16])
def test_npz_members_are_mapped_with_the_whole_file_loaders_values(tmp_path, dtype):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(50, 3, 2)) * 20).astype(dtype)  # 3-D: flattened to (50, 6), as load_npz does
    y = rng.integers(0, 4, 50)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    member = D.map_npz_member(str(tmp_path / "a.npz"), "x")
    assert isinstance(member, np.memmap) and np.array_equal(member, x)
    mapped, whole = D.load_npz_mapped(str(tmp_path / "a.npz"), None), D.load_npz(str(tmp_path / "a.npz"), None)
    assert isinstance(mapped.x, D.Rows) and mapped.x.shape == whole.x.shape == (50, 6)
    assert np.array_equal(mapped.x.read(np.arange(50)), whole.x)  # bitwise: the same float64 conversion
    assert np.array_equal(mapped.y, whole.y) and mapped.n_classes == whole.n_classes == 4
    part = mapped.x[np.array([7, 3, 40])][np.array([2, 0])]  # views compose, reading nothing
    assert np.array_equal(part.read(np.arange(2)), whole.x[[40, 7]])


def test_npz_with_a_test_part_is_mapped(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"x_train": rng.normal(size=(30, 4)), "y_train": rng.normal(size=30),
              "x_test": rng.normal(size=(9, 4)), "y_test": rng.normal(size=9)}  # fmt: skip
    np.savez(tmp_path / "b.npz", **arrays)
    mapped, whole = D.load_npz_mapped(str(tmp_path / "b.npz"), False), D.load_npz(str(tmp_path / "b.npz"), False)
    assert np.array_equal(mapped.test.x.read(np.arange(9)), whole.test.x)
    assert np.array_equal(mapped.y, whole.y) and np.array_equal(mapped.test.y, whole.test.y)
    assert mapped.n_classes is None and mapped.test.y.shape == (9, 1)


def test_what_cannot_be_mapped_is_read_whole(tmp_path):
    x, y = np.ones((5, 2)), np.arange(5)
    np.savez_compressed(tmp_path / "z.npz", x=x, y=y)  # deflated members: no offset to map
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(np.ones((5, 2))), y=y)
    np.savez(tmp_path / "other.npz", a=x, b=y)  # not gpubp's layout: load_npz says so
    np.save(tmp_path / "single.npy", x)
    for name in ("z.npz", "f.npz", "other.npz", "single.npy", "missing.npz"):
        assert D.load_npz_mapped(str(tmp_path / name), None) is None, name


def test_a_non_finite_value_is_named_by_its_file_row(tmp_path):
    x = np.ones((6, 3))
    x[4, 2] = np.nan
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(6) % 2)
    rows = D.load_npz_mapped(str(tmp_path / "a.npz"), None).x
    assert rows[np.array([0, 1])].read(np.arange(2)).shape == (2, 3)  # rows without it read fine
    with pytest.raises(DataError, match=r"a\.npz: feature 2 of sample 4 is nan"):
        rows[np.array([1, 4])].read(np.arange(2))


def test_mnist_images_are_mapped_at_the_header_offset(tmp_path):
    rng = np.random.default_rng(2)
    xtr, xte = rng.integers(0, 256, size=(20, 28, 28)), rng.integers(0, 256, size=(7, 28, 28))
    for name, a in [("train-images-idx3-ubyte", xtr), ("train-labels-idx1-ubyte", np.arange(20) % 10),
                    ("t10k-images-idx3-ubyte", xte), ("t10k-labels-idx1-ubyte", np.arange(7))]:  # fmt: skip
        write_idx(tmp_path / name, a, False)
    mapped, whole = D.load_mnist_mapped(str(tmp_path)), D.load_mnist(str(tmp_path))
    assert isinstance(mapped.x.array, np.memmap)
    assert np.array_equal(mapped.x.read(np.arange(20)), whole.x)  # bitwise: uint8 / 255.0 as load_mnist
    assert np.array_equal(mapped.test.x.read(np.arange(7)), whole.test.x)
    assert np.array_equal(mapped.y, whole.y) and mapped.n_classes == whole.n_classes
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", xte, True)  # gzipped: read whole
    os.unlink(tmp_path / "t10k-images-idx3-ubyte")
    assert D.load_mnist_mapped(str(tmp_path)) is None


# ----------------------------------------------------------------- statistics, without MPI


class ThreadWorld:
    """N ranks as threads of one process: all_sum adds every rank's values in rank order."""

    def __init__(self, size):
        self.size, self.slots, self.barrier = size, [None] * size, threading.Barrier(size)

    def rank(self, r):
        world = self

        class Rank:
            is_root = r == 0

            def all_sum(self, values, what):
                world.slots[r] = values.copy()
                world.barrier.wait()
                total = np.sum(world.slots, axis=0)
                world.barrier.wait()
                values[...] = total

        return Rank()


@pytest.mark.parametrize("size", [2, 3, 5])
def test_statistics_from_partial_sums_equal_one_process(tmp_path, size):
    from gpubp import shard
    from gpubp.model import MLP

    rng = np.random.default_rng(size)
    x = rng.normal(3.0, 2.0, size=(1001, 7)) * np.array([1, 10, 1e3, 1e-3, 1, 1, 1])
    x[:, 5] = 4.25  # constant: only centred
    np.savez(tmp_path / "a.npz", x=x, y=rng.normal(size=1001))
    train = D.load_npz_mapped(str(tmp_path / "a.npz"), False).x[rng.permutation(1001)[:900]]
    ref = D.Standardizer.fit(train.read(np.arange(900)))  # one process: the whole training split
    model = MLP([7, 1], "identity", "identity", "mse", dtype="float64")
    world, out = ThreadWorld(size), [None] * size

    def rank(r):
        part = shard.MappedSplit(model, D.Dataset(train, np.zeros((900, 1)), None, "t"), np.zeros((900, 1)), r, size)
        assert part.raw.shape[0] == row_range(900, r, size)[1] - row_range(900, r, size)[0]  # only its share
        out[r] = shard.fit_standardizer(world.rank(r), part, True)

    run_ranks(rank, size)
    for std in out:
        # float64, sums in another order: the bound of 1e-12, relative to the values
        assert np.all(np.abs(std.mean - ref.mean) <= 1e-12 * np.abs(ref.mean))
        assert np.all(np.abs(std.std - ref.std) <= 1e-12 * ref.std)
        assert std.std[5] == 1.0 and ref.std[5] == 1.0
        assert np.array_equal(std.mean, out[0].mean) and np.array_equal(std.std, out[0].std)  # every rank alike


# ----------------------------------------------------------------- with MPI


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """digits and a regression problem as uncompressed .npz files (np.savez)."""
    root = tmp_path_factory.mktemp("npz")
    ds = D.load_digits()
    np.savez(root / "digits.npz", x=ds.x.astype(np.uint8), y=ds.y)
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, size=(2000, 5))
    np.savez(root / "regression.npz", x=x, y=np.sin(3 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.05 * rng.normal(size=2000))
    return root


def _args(files, case):
    common = ["--set", "model.dtype=float64", "--set", "train.steps=100", "--set", "train.eval_every=25",
              "--set", "data.dataset=npz", "--set", "data.val_fraction=0.1", "--quiet"]  # fmt: skip
    if case == "digits":
        return ["--config", "configs/digits.toml", "--set", f"data.path={files / 'digits.npz'}", *common]
    # 1600 training rows in batches of 311 = 5 * 311 + 45; 311 is not divisible by 2 or 3
    return ["--config", "configs/regression.toml", "--set", f"data.path={files / 'regression.npz'}",
            "--set", "train.batch_size=311", "--set", "train.early_stopping_patience=0", *common]  # fmt: skip


@pytest.mark.parametrize(("case", "n"), [("digits", 2), ("digits", 3), ("regression", 3)])
def test_a_memory_mapped_npz_trains_as_one_process(files, tmp_path, case, n):
    one = mpi_train(1, *_args(files, case), "--out", str(tmp_path / "one"))  # reads the file whole
    assert one.returncode == 0, one.stderr
    many = mpi_train(n, *[a for a in _args(files, case) if a != "--quiet"], "--out", str(tmp_path / "many"))
    assert many.returncode == 0, many.stderr
    assert f"data: each of the {n} ranks memory-maps {files / (case + '.npz')} and reads only its rows" in many.stderr
    a, b = params(tmp_path / "many"), params(tmp_path / "one")
    assert_same_run(a, b, f"memory-mapped {case} on {n} ranks")
    from gpubp.checkpoint import load_checkpoint

    mine, ref = (
        load_checkpoint(str(tmp_path / "many" / "last.npz"))[1],
        load_checkpoint(str(tmp_path / "one" / "last.npz"))[1],
    )
    for key in ("std.mean", "std.std"):  # float64 partial sums: to 1e-12 of the values
        assert np.all(np.abs(mine[key] - ref[key]) <= 1e-12 * np.maximum(np.abs(ref[key]), 1.0)), key
    want = json.loads((tmp_path / "one" / "summary.json").read_text())
    got = json.loads((tmp_path / "many" / "summary.json").read_text())
    keys = [k for k in ("test_loss", "test_accuracy", "val_loss", "test_r2", "test_rmse") if k in want]
    assert len(keys) >= 3
    for key in keys:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_each_rank_reads_only_its_rows(files, tmp_path):
    """3 ranks, 650 training rows in batches of 100 (13 steps: two epochs, the 7th batch
    of each 50 rows): each rank reads its contiguous share of every split once, then per
    step exactly its slice of the global batch, nothing else."""
    from gpubp.config import load_config

    sets = ["data.dataset=npz", f"data.path={files / 'regression.npz'}", "data.val_fraction=0.25",
            "data.test_fraction=0.425", "train.batch_size=100", "train.steps=13", "train.eval_every=5",
            "model.dtype=float64"]  # fmt: skip
    cmd = [_mpirun(), "-n", "3", sys.executable, os.path.join(ROOT, "tests", "mpi_rows_child.py"), str(tmp_path),
           "configs/regression.toml", *sets]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240, env=_env())
    assert result.returncode == 0, result.stderr
    # the file rows of each split, from an independent split of the row numbers
    cfg = load_config(os.path.join(ROOT, "configs/regression.toml"), sets)
    rows = D.Dataset(np.arange(2000.0).reshape(-1, 1), np.zeros((2000, 1)), None, "rows")
    splits = D.split_dataset(rows, cfg.data.val_fraction, cfg.data.test_fraction, cfg.train.seed, cfg.data.stratify)
    train, val, test = (s.x[:, 0].astype(np.int64) for s in (splits.train, splits.val, splits.test))
    assert len(train) == 650
    seen_steps = []
    for r in range(3):
        record = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert record["mapped"] == "MappedSplit" and record["steps"] == 13
        want = [part[slice(*row_range(len(part), r, 3))].tolist() for part in (train, val, test)]  # start-up
        for step in range(13):
            epoch, b = divmod(step, 7)
            batch = D.epoch_permutation(cfg.train.seed, epoch, 650)[b * 100 : (b + 1) * 100]
            want.append(train[batch[slice(*row_range(len(batch), r, 3))]].tolist())
        assert record["calls"] == want, f"rank {r} read other rows"
        seen_steps.append(record["calls"][3:])
    for step in range(13):  # together the ranks read each step's global batch, each row once
        together = sorted(sum((calls[step] for calls in seen_steps), []))
        epoch, b = divmod(step, 7)
        assert together == sorted(train[D.epoch_permutation(cfg.train.seed, epoch, 650)[b * 100 : (b + 1) * 100]])


def test_a_bad_row_is_reported_once_by_the_rank_that_read_it(tmp_path):
    """A NaN in the file: only the rank whose share holds it reads it; it is said once,
    naming that rank and the file row, and nothing is written."""
    from gpubp.config import load_config

    x = np.random.default_rng(5).normal(size=(300, 3))
    sets = [
        "data.dataset=npz",
        f"data.path={tmp_path / 'a.npz'}",
        "data.val_fraction=0",
        "data.test_fraction=0",
        "train.early_stopping_patience=0",
    ]
    cfg = load_config(os.path.join(ROOT, "configs/regression.toml"), sets)
    rows = D.Dataset(np.arange(300.0).reshape(-1, 1), np.zeros((300, 1)), None, "rows")
    train = D.split_dataset(rows, 0.0, 0.0, cfg.train.seed, cfg.data.stratify).train.x[:, 0].astype(np.int64)
    bad = int(train[row_range(300, 2, 3)[0] + 5])  # a row in rank 2's share
    x[bad, 1] = np.nan
    np.savez(tmp_path / "a.npz", x=x, y=x[:, 0] + 0.5)  # regression values
    result = mpi_train(3, "--config", "configs/regression.toml", *[a for s in sets for a in ("--set", s)],
                       "--quiet", "--out", str(tmp_path / "run"))  # fmt: skip
    assert result.returncode == 2, result.stderr  # a data error
    lines = [line for line in result.stderr.splitlines() if line.startswith("gpubp: error:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpubp: error: rank 2: ") and f"feature 1 of sample {bad} is nan" in lines[0]
    assert not os.path.exists(tmp_path / "run")  # rank 0 had made it: a run failing at start-up leaves none


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_on_the_gpu_a_mapped_split_gives_the_device_splits_batches(tmp_path, dtype):
    """One rank's MappedSplit on the GPU backend: its batches (read on the host, copied
    each step) and its evaluation share hold the same numbers as DeviceSplit's."""
    from gpubp import shard
    from gpubp.backend import resolve_device
    from gpubp.model import MLP

    backend, _ = resolve_device("gpu")
    rng = np.random.default_rng(6)
    np.savez(tmp_path / "a.npz", x=rng.normal(size=(97, 5)), y=rng.integers(0, 3, 97))
    mapped, whole = D.load_npz_mapped(str(tmp_path / "a.npz"), None), D.load_npz(str(tmp_path / "a.npz"), None)
    std = D.Standardizer.fit(whole.x)
    model = MLP([5, 8, 3], "tanh", "identity", "softmax_cross_entropy", dtype=dtype, backend=backend)
    ref = D.DeviceSplit(model, whole, std, whole.y)
    part = shard.MappedSplit(model, mapped, whole.y, 1, 2)
    part.finish(std)
    idx = rng.permutation(97)[:40]
    xb, yb = part.batch(part.order(idx), None)
    cache = {}
    xr, yr = ref.batch(
        ref.order(idx), lambda name, like, n: cache.setdefault(name, backend.empty((n, *like.shape[1:]), like.dtype))
    )
    assert np.array_equal(backend.to_numpy(xb), backend.to_numpy(xr)) and np.array_equal(
        backend.to_numpy(yb), backend.to_numpy(yr)
    )
    start, stop = row_range(97, 1, 2)
    for a, b in zip(part.share(start, stop), ref.share(start, stop)):
        assert np.array_equal(backend.to_numpy(a), backend.to_numpy(b))


# ----------------------------------------------------------------- data.missing with .npz files (NaN = missing)


def _gappy(tmp_path, name="g.npz", n=400, f=4, seed=7, compressed=False, classes=False):
    """An .npz file whose features hold NaN (missing values) in ~5% of the cells."""
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, size=(n, f))
    y = rng.integers(0, 3, n) if classes else x[:, :1] * 0.5 - x[:, 1:2] + 0.1 * rng.normal(size=(n, 1))
    x[rng.random(size=x.shape) < 0.05] = np.nan
    (np.savez_compressed if compressed else np.savez)(tmp_path / name, x=x, y=y)
    return str(tmp_path / name), x, y


def test_npz_missing_values_follow_data_missing(tmp_path):
    path, x, y = _gappy(tmp_path)
    with pytest.raises(DataError, match=r"g\.npz: feature \d of sample \d+ is nan"):
        D.load_npz(path, False)  # data.missing = "error" (default): named
    for load in (D.load_npz, D.load_npz_mapped):
        ds = load(path, False, missing="mean")  # kept as NaN, filled later with the training means
        got = ds.x if isinstance(ds.x, np.ndarray) else ds.x.read(np.arange(len(ds)))
        assert np.array_equal(np.isnan(got), np.isnan(x)) and np.array_equal(got[~np.isnan(x)], x[~np.isnan(x)])
        keep = ~np.isnan(x).any(axis=1)
        ds = load(path, False, missing="drop")  # the rows with a gap are left out, with a note
        got = ds.x if isinstance(ds.x, np.ndarray) else ds.x.read(np.arange(len(ds)))
        assert np.array_equal(got, x[keep]) and np.array_equal(ds.y, y[keep])
        assert ds.notes == [f'{path}: dropped {(~keep).sum()} rows with a missing value (data.missing = "drop")']
    x[3, 1] = np.inf  # infinity is never a missing value
    np.savez(tmp_path / "inf.npz", x=x, y=y)
    with pytest.raises(DataError, match=r"inf\.npz: feature 1 of sample 3 is inf"):
        D.load_npz(str(tmp_path / "inf.npz"), False, missing="mean")
    with pytest.raises(DataError, match=r"inf\.npz: feature 1 of sample 3 is inf"):
        D.load_npz_mapped(str(tmp_path / "inf.npz"), False, missing="mean").x.read(np.arange(10))


def test_fill_is_fitted_whenever_data_missing_is_mean():
    """A training split without gaps still gets its fill (the column means): a NaN in the
    validation or test rows, or in data given to predict later, is filled, not passed on."""
    x = np.arange(12.0).reshape(4, 3)
    std = D.Standardizer.fit(x, True, fill_missing=True)
    assert np.array_equal(std.fill, x.mean(axis=0))
    assert np.all(np.isfinite(std(np.array([[np.nan, 1.0, np.nan]]))))
    assert D.Standardizer.fit(x, True).fill is None  # data.missing = "error": nothing to fill


@pytest.mark.parametrize(("size", "standardize"), [(2, True), (3, True), (2, False)])
def test_missing_means_from_partial_sums_equal_one_process(tmp_path, size, standardize):
    """data.missing = "mean": the fill (mean of each column's present training values)
    from per-rank partial sums and counts equals Standardizer.fit's on the whole split,
    and so do the mean and std of the filled values."""
    from gpubp import shard
    from gpubp.model import MLP

    path, x, _ = _gappy(tmp_path, n=1001, f=5)
    x[:, 2] *= 1e3
    train = D.load_npz_mapped(path, False, missing="mean").x[np.random.default_rng(1).permutation(1001)[:900]]
    ref = D.Standardizer.fit(train.read(np.arange(900)), standardize, fill_missing=True)
    model = MLP([5, 1], "identity", "identity", "mse", dtype="float64")
    world, out = ThreadWorld(size), [None] * size

    def rank(r):
        part = shard.MappedSplit(model, D.Dataset(train, np.zeros((900, 1)), None, "t"), np.zeros((900, 1)), r, size)
        out[r] = shard.fit_standardizer(world.rank(r), part, standardize, fill_missing=True)

    run_ranks(rank, size)
    for std in out:
        # float64 sums in another order: the bound of 1e-12, relative to the values
        for key in ("fill", "mean", "std"):
            want, got = getattr(ref, key), getattr(std, key)
            assert np.all(np.abs(got - want) <= 1e-12 * np.maximum(np.abs(want), 1.0)), key
            assert np.array_equal(got, getattr(out[0], key))  # every rank alike


def test_a_column_without_values_is_reported_by_rank_0_alone(tmp_path):
    from gpubp import shard
    from gpubp.distributed import Silent
    from gpubp.model import MLP

    x = np.random.default_rng(0).normal(size=(50, 3))
    x[:, 1] = np.nan
    np.savez(tmp_path / "e.npz", x=x, y=np.zeros(50))
    train = D.load_npz_mapped(str(tmp_path / "e.npz"), False, missing="mean").x
    model = MLP([3, 1], "identity", "identity", "mse", dtype="float64")
    world, out = ThreadWorld(2), [None] * 2

    def rank(r):
        part = shard.MappedSplit(model, D.Dataset(train, np.zeros((50, 1)), None, "t"), np.zeros((50, 1)), r, 2)
        try:
            shard.fit_standardizer(world.rank(r), part, True, fill_missing=True)
        except Exception as e:
            out[r] = e

    run_ranks(rank, 2)
    assert isinstance(out[0], DataError) and "column 1 has no value in the training split" in str(out[0])
    assert getattr(out[0], "reported", False)  # not prefixed with "rank 0:" by distributed.report
    assert isinstance(out[1], Silent)


def test_compressed_files_are_read_whole_and_rank_0_says_why(tmp_path):
    from gpubp.config import load_config
    from gpubp.distributed import whole_file_note

    path, _, _ = _gappy(tmp_path, compressed=True)
    cfg = load_config("configs/regression.toml", ["data.dataset=npz", f"data.path={path}"])
    note = whole_file_note(cfg, 2)
    assert note.startswith(f"data: each of the 2 ranks reads the whole dataset {path} ") and "\n" not in note
    assert "compressed" in note and "np.savez" in note  # why, and how to let each rank read only its rows
    rng = np.random.default_rng(0)
    for name, a in [("train-images-idx3-ubyte", rng.integers(0, 256, (4, 28, 28))), ("train-labels-idx1-ubyte",
                    np.arange(4)), ("t10k-images-idx3-ubyte", rng.integers(0, 256, (2, 28, 28))),
                    ("t10k-labels-idx1-ubyte", np.arange(2))]:  # fmt: skip
        (tmp_path / "mnist").mkdir(exist_ok=True)
        write_idx(tmp_path / "mnist" / (name + ".gz"), a, True)
    cfg = load_config("configs/digits.toml", ["data.dataset=mnist", f"data.path={tmp_path / 'mnist'}"])
    assert "its IDX files are gzipped" in whole_file_note(cfg, 2)


@pytest.mark.parametrize(("missing", "compressed"), [("mean", False), ("drop", False), ("mean", True)])
def test_npz_with_missing_values_trains_on_2_ranks_as_one_process(tmp_path, missing, compressed):
    path, _, _ = _gappy(tmp_path, n=600, compressed=compressed)
    args = ["--config", "configs/regression.toml", "--set", "data.dataset=npz", "--set", f"data.path={path}",
            "--set", f"data.missing={missing}", "--set", "model.dtype=float64", "--set", "train.steps=60",
            "--set", "train.eval_every=20", "--set", "train.batch_size=97"]  # fmt: skip
    one = mpi_train(1, *args, "--quiet", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    many = mpi_train(2, *args, "--out", str(tmp_path / "many"))
    assert many.returncode == 0, many.stderr
    notes = [line for line in many.stderr.splitlines() if line.startswith("data: each of the 2 ranks")]
    assert len(notes) == 1, many.stderr  # said once, by rank 0
    assert ("reads the whole dataset" in notes[0]) == compressed
    assert many.stderr.count(": dropped ") == (missing == "drop")  # the note of rows left out: rank 0 alone
    assert_same_run(params(tmp_path / "many"), params(tmp_path / "one"), f"npz, data.missing = {missing}")
    from gpubp.checkpoint import load_checkpoint

    mine = load_checkpoint(str(tmp_path / "many" / "last.npz"))[1]
    ref = load_checkpoint(str(tmp_path / "one" / "last.npz"))[1]
    keys = ("std.mean", "std.std", "missing.mean") if missing == "mean" else ("std.mean", "std.std")
    assert ("missing.mean" in ref) == (missing == "mean")
    for key in keys:  # float64 partial sums: to 1e-12 of the values
        assert np.all(np.abs(mine[key] - ref[key]) <= 1e-12 * np.maximum(np.abs(ref[key]), 1.0)), key


def test_a_column_without_values_on_2_ranks_is_one_line_and_leaves_no_run(tmp_path):
    x = np.random.default_rng(3).normal(size=(200, 3))
    x[:, 2] = np.nan
    np.savez(tmp_path / "e.npz", x=x, y=x[:, 0])
    result = mpi_train(2, "--config", "configs/regression.toml", "--set", "data.dataset=npz", "--set",
                       f"data.path={tmp_path / 'e.npz'}", "--set", "data.missing=mean", "--quiet",
                       "--out", str(tmp_path / "run"))  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('gpubp: error: data.missing = "mean": column 2 has no value'), (
        result.stderr
    )
    assert not (tmp_path / "run").exists()


def test_a_gap_only_in_the_validation_rows_is_filled(tmp_path):
    """data.missing = "mean" with a gap-free training split and a NaN in a validation row:
    the row is filled with the training means (before, the NaN reached the model and
    val_loss was NaN)."""
    from gpubp.config import load_config
    from gpubp.trainer import Trainer

    x = np.random.default_rng(0).normal(size=(100, 2))
    cells = D.Dataset(np.arange(100.0).reshape(-1, 1), np.zeros((100, 1)), None, "rows")
    v = int(D.split_dataset(cells, 0.2, 0.0, 0, True).val.x[0, 0])  # a row of the validation split
    lines = ["a,b,target", *(f"{'' if i == v else x[i, 0]},{x[i, 1]},{x[i, 0]}" for i in range(100))]
    (tmp_path / "v.csv").write_text("\n".join(lines) + "\n")
    sets = ["data.dataset=csv", f"data.path={tmp_path / 'v.csv'}", "data.label_column=target",
            "data.task=regression", "data.missing=mean", "data.val_fraction=0.2", "data.test_fraction=0",
            "train.steps=20", "train.device=cpu", "model.dtype=float64"]  # fmt: skip
    trainer = Trainer(load_config("configs/regression.toml", sets), None, quiet=True)
    fill = trainer.run.standardizer.fill
    train_x = D.split_dataset(D.load_csv(str(tmp_path / "v.csv"), "target", False, missing="mean"), 0.2, 0.0, 0).train.x
    assert np.array_equal(fill, train_x.mean(axis=0))  # no gap in the training rows: their plain mean
    summary = trainer.train()
    assert np.isfinite(summary["val_loss"]) and np.isfinite(summary["val_r2"])
