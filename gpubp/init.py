"""Weight initialisation, drawn on the host in float64 from one seeded generator so
that a CPU and a GPU model with the same seed start from the same numbers.

| name           | distribution of W (fan_in, fan_out)        | PyTorch equivalent                          |
|----------------|--------------------------------------------|---------------------------------------------|
| he_normal      | N(0, 2 / fan_in)                           | kaiming_normal_(nonlinearity='relu')        |
| he_uniform     | U(-sqrt(6 / fan_in), +)                    | kaiming_uniform_(nonlinearity='relu')       |
| xavier_normal  | N(0, 2 / (fan_in + fan_out))               | xavier_normal_                              |
| xavier_uniform | U(-sqrt(6 / (fan_in + fan_out)), +)        | xavier_uniform_                             |
| lecun_normal   | N(0, 1 / fan_in)                           | kaiming_normal_(nonlinearity='linear')      |
| lecun_uniform  | U(-sqrt(3 / fan_in), +)                    | kaiming_uniform_(nonlinearity='linear')     |

Biases start at zero.
"""

from __future__ import annotations

import math

import numpy as np

INITS = ("he_normal", "he_uniform", "xavier_normal", "xavier_uniform", "lecun_normal", "lecun_uniform")


def init_weight(rng: np.random.Generator, fan_in: int, fan_out: int, scheme: str) -> np.ndarray:
    """A (fan_in, fan_out) float64 weight matrix drawn by `scheme`."""
    family, _, dist = scheme.rpartition("_")
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(INITS)}")
    variance = {"he": 2.0 / fan_in, "xavier": 2.0 / (fan_in + fan_out), "lecun": 1.0 / fan_in}[family]
    if dist == "normal":
        return rng.normal(0.0, math.sqrt(variance), size=(fan_in, fan_out))
    limit = math.sqrt(3.0 * variance)  # U(-a, a) has variance a^2 / 3
    return rng.uniform(-limit, limit, size=(fan_in, fan_out))
