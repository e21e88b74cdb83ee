"""Each rank reads only its rows: the splits of a data-parallel run whose features are
memory-mapped (`data.Rows`: an uncompressed .npz, uncompressed MNIST IDX files).

Every rank knows the split and each epoch's order (functions of the seed), so it
knows which rows of the file it needs:

- start-up: its contiguous share `row_range(n, rank, N)` of each split (train, val,
  test), read once, checked (finite), kept on the device for evaluation, which
  splits every split so;
- each step: its slice of the global batch, read from the memory map on the host,
  standardised and copied to the device (host -> device each step, instead of the
  whole training split on the device).

Standardisation statistics: the exact two-pass formulas of `Standardizer.fit`,
mean = sum_i x_i / n, then std = sqrt(sum_i (x_i - mean)^2 / n), each sum made of
per-rank partial sums over the rank's share of the training rows, all-reduced in
float64. They equal one process's to rounding (the order of the sums, ~1e-16
relative); tests/test_shard.py checks 1e-12. Standardising is elementwise, so a row
gives the same bits whether standardised with the whole split or alone.

Missing values (NaN, data.missing): with "mean" each column's gaps are filled first
with fill_j = (sum of its present training values) / (their count), from per-rank sums
and counts, and the statistics above are those of the filled values. With "drop"
every rank finds the rows holding a NaN in one chunked pass over the map
(data.Rows.complete) before the split, so all agree on the rows that remain.

Targets (N x T numbers, small beside N x F features) stay whole on the host.
"""

from __future__ import annotations

import numpy as np

from . import data as D
from .distributed import Silent, row_range


class MappedSplit:
    """One split of a memory-mapped dataset on this rank: the interface of
    `data.DeviceSplit` (n, share, order, batch), holding only this rank's rows."""

    def __init__(self, model, ds: D.Dataset, targets: np.ndarray, rank: int, size: int):
        self.model, self.backend = model, model.backend
        self.n = len(ds)
        self.rows = ds.x  # data.Rows: the split's rows of the file, nothing read yet
        self.targets = targets  # (n,) labels or (n, T) values, in the loss's form, host
        self.y = ds.y if ds.is_classification else None
        self.start, self.stop = row_range(self.n, rank, size)
        self.raw = self.rows.read(np.arange(self.start, self.stop))  # (k, F) float64: this rank's share
        self.standardizer = None
        self.x = self.target = self.labels = None  # this rank's share on the device, after `finish`

    def finish(self, standardizer: D.Standardizer) -> None:
        """With the run's statistics: this rank's share, standardised, to the device."""
        be, model, k = self.backend, self.model, self.stop - self.start
        self.standardizer = standardizer
        self.x = be.asarray(standardizer(self.raw), dtype=model.dtype)
        self.target = model.as_target(self.targets[self.start : self.stop], k)
        self.labels = be.asarray(self.y[self.start : self.stop], dtype=np.int32) if self.y is not None else None
        self.raw = None

    def share(self, start: int, stop: int):
        if (start, stop) != (self.start, self.stop):
            raise AssertionError(f"rows {start}:{stop} asked of a rank holding {self.start}:{self.stop}")
        return self.x, self.target, self.labels

    def order(self, perm: np.ndarray) -> np.ndarray:
        return perm  # `batch` reads on the host

    def batch(self, idx: np.ndarray, buffer=None):
        """(x, target) on the device of split rows idx (k,): only those rows are read."""
        x = self.standardizer(self.rows.read(idx))  # (k, F) float64
        return self.backend.asarray(x, dtype=self.model.dtype), self.model.as_target(self.targets[idx], len(idx))


def fit_standardizer(world, train: MappedSplit, standardize: bool, fill_missing: bool = False) -> D.Standardizer:
    """`Standardizer.fit` of the whole training split from every rank's share (two
    passes, per-rank partial sums all-reduced in float64); identity without standardize.
    `fill_missing` (data.missing = "mean"): first the fill, each column's mean over its
    present values, fill_j = sum_i present x_ij / count_j (per-rank sums and counts in one
    all-reduce), put in the gaps before the mean and std are taken, as Standardizer.fit."""
    n_features = train.rows.shape[1]
    raw = train.raw  # (k, F) float64
    fill = None
    if fill_missing:
        gaps = np.isnan(raw)  # (k, F)
        sums = np.concatenate([np.where(gaps, 0.0, raw).sum(axis=0), (~gaps).sum(axis=0)])  # (2F,) float64
        world.all_sum(sums, "the means that fill missing values")
        count = sums[n_features:]  # (F,) exact: integers below 2^53
        empty = np.flatnonzero(count == 0)
        if empty.size:  # every rank sees it: rank 0 alone says it
            error = D.no_value_error(int(empty[0]))
            error.reported = True
            raise error if world.is_root else Silent(error.exit_code)
        fill = sums[:n_features] / count
        raw = np.where(gaps, fill, raw)
    if not standardize:
        return D.Standardizer(np.zeros(n_features), np.ones(n_features), fill)
    total = raw.sum(axis=0)  # (F,)
    world.all_sum(total, "the standardisation statistics")
    mean = total / train.n
    sq = ((raw - mean) ** 2).sum(axis=0)  # (F,)
    world.all_sum(sq, "the standardisation statistics")
    std = np.sqrt(sq / train.n)
    std[std < 1e-12] = 1.0  # a constant feature is only centred, as Standardizer.fit
    return D.Standardizer(mean, std, fill)


def finish(trainer, world) -> None:
    """In the collective part of start-up: the statistics, then every split to the device."""
    run = trainer.run
    parts = [p for p in run.splits.values() if isinstance(p, MappedSplit)]
    if not parts:
        return
    if run.standardizer is None:
        d = trainer.cfg.data
        run.standardizer = fit_standardizer(world, run.splits["train"], d.standardize, d.missing == "mean")
    for part in parts:
        part.finish(run.standardizer)
