"""Learning-rate schedules: the rate for step t (0-based), with linear warmup. (A step is
an iteration of the loop: an fp16 step skipped for an overflowing gradient still moves
the schedule on, as a torch LR scheduler stepped every iteration does.)

| name     | lr(t) after warmup (s = t - warmup_steps, T = total_steps - warmup_steps)  |
|----------|-----------------------------------------------------------------------------|
| constant | lr                                                                          |
| step     | lr * gamma ** floor(s / step_size)                                          |
| cosine   | min_lr + (lr - min_lr) (1 + cos(pi s / T)) / 2                              |

During warmup (t < warmup_steps): lr * (t + 1) / warmup_steps.
"""

from __future__ import annotations

import functools
import math

import numpy as np

SCHEDULES = ("constant", "step", "cosine")


def lr_table(t, lr: float, name: str = "constant", total_steps: int = 1, warmup_steps: int = 0,
             step_size: int = 1000, gamma: float = 0.1, min_lr: float = 0.0) -> np.ndarray:  # fmt: skip
    """The rates of steps t (0-based; an int array), float64 of t's shape: each one the
    Python-float arithmetic of the formula above, so the bits of a step computed alone.
    NumPy's float64 +, -, *, / round as Python's do (IEEE; an int step converts exactly);
    cos and the powers are Python's own (libm), one call per step or exponent: NumPy's
    may differ from libm's in the last bit."""
    t = np.asarray(t, dtype=np.int64)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    out = np.empty(t.shape, np.float64)
    warm = t < warmup_steps
    out[warm] = lr * (t[warm] + 1) / warmup_steps
    s = t[~warm] - warmup_steps
    if name == "constant":
        out[~warm] = lr
    elif name == "step":
        exponents, at = np.unique(s // step_size, return_inverse=True)
        out[~warm] = lr * np.array([gamma ** int(e) for e in exponents.tolist()])[at]
    else:  # cosine
        span = max(total_steps - warmup_steps, 1)
        cos = np.array([math.cos(a) for a in (math.pi * np.minimum(s, span) / span).tolist()])
        out[~warm] = min_lr + (lr - min_lr) * 0.5 * (1.0 + cos)
    return out


def lr_at(t: int, *schedule, **named) -> float:
    """The rate of step t (0-based): lr_table's (same arguments after t), as a Python float."""
    return float(lr_table(np.array([t]), *schedule, **named)[0])


def lr_schedule(optimizer, schedule, total_steps: int):
    """steps (int array) -> their rates, lr_table over a config's [optimizer] and [schedule]
    sections, read once: the step tables (gpubp/step.py) take a chunk of steps at a time."""
    return functools.partial(lr_table, lr=optimizer.lr, name=schedule.name, total_steps=int(total_steps),
                             warmup_steps=schedule.warmup_steps, step_size=schedule.step_size, gamma=schedule.gamma,
                             min_lr=schedule.min_lr)  # fmt: skip
