"""A small MNIST-1D-like dataset (after Greydanus, "Scaling down deep learning", 2020):
ten 1-D template signals, each sample one of them padded, shifted, scaled, sheared,
with correlated and white noise added, sampled at 40 points. Harder than digits for
an MLP (translation is not free), small enough for a CPU test. Seeded: the same
arguments give the same arrays."""

from __future__ import annotations

import numpy as np

from gpubp.data import Dataset

LENGTH = 40  # samples per signal, as MNIST-1D


def templates(rng) -> np.ndarray:
    """(10, 12) smooth random patterns, one per class, unit peak."""
    raw = rng.normal(size=(10, 12)).cumsum(axis=1)
    raw -= raw.mean(axis=1, keepdims=True)
    return raw / np.abs(raw).max(axis=1, keepdims=True)


def make(n: int = 4000, seed: int = 0) -> Dataset:
    """n samples (N, 40) float64 with labels 0..9 (balanced)."""
    rng = np.random.default_rng(seed)
    base = templates(np.random.default_rng(1234))  # the classes are fixed; the samples vary with seed
    y = np.arange(n) % 10
    rng.shuffle(y)
    t = np.linspace(0, 1, LENGTH)
    x = np.empty((n, LENGTH))
    for i, label in enumerate(y):
        signal = np.zeros(LENGTH)
        start = rng.integers(0, LENGTH - 12 * 2 + 1)  # shift: the pattern, stretched 2x, anywhere
        stretched = np.interp(np.linspace(0, 11, 24), np.arange(12), base[label])
        signal[start : start + 24] = stretched * rng.uniform(0.7, 1.3)  # scale
        signal += rng.uniform(-0.5, 0.5) * (t - 0.5)  # shear
        smooth = np.convolve(rng.normal(size=LENGTH + 8), np.ones(9) / 9, mode="valid")  # correlated noise
        x[i] = signal + 0.4 * smooth + 0.2 * rng.normal(size=LENGTH)
    return Dataset(x, y.astype(np.int64), 10, "mnist1d-like")
