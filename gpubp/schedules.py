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

import math

SCHEDULES = ("constant", "step", "cosine")


def lr_at(t: int, lr: float, name: str = "constant", total_steps: int = 1, warmup_steps: int = 0,
          step_size: int = 1000, gamma: float = 0.1, min_lr: float = 0.0) -> float:  # fmt: skip
    if t < warmup_steps:
        return lr * (t + 1) / warmup_steps
    s = t - warmup_steps
    if name == "constant":
        return lr
    if name == "step":
        return lr * gamma ** (s // step_size)
    if name == "cosine":
        span = max(total_steps - warmup_steps, 1)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(s, span) / span))
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
