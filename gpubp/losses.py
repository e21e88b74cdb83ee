"""The loss registry. Each loss equals PyTorch's functional of the same name with
reduction='mean'; its value and its gradient dL/d(output) come from one call
(`backend.loss_forward_backward`).

| name                   | target                         | L (mean over the batch)                                   | PyTorch                                   |
|------------------------|--------------------------------|-----------------------------------------------------------|-------------------------------------------|
| softmax_cross_entropy  | integer class labels (N,)      | -(1/N) sum_i sum_c q_ic log softmax(x_i)_c                | F.cross_entropy(x, y, label_smoothing=e)  |
|                        |                                | q_ic = (1 - e) [c = y_i] + e / C                          |                                           |
| binary_cross_entropy   | values in [0, 1], shaped as x  | mean of max(x, 0) - x t + log(1 + exp(-abs(x)))           | F.binary_cross_entropy_with_logits        |
| mse                    | values shaped as x             | mean of (x - t)^2                                         | F.mse_loss                                |
| huber                  | values shaped as x             | mean of r^2/2 if abs(r) < d else d (abs(r) - d/2), r=x-t  | F.huber_loss(delta=d)                     |

The means of the last three run over every element (N * C), as PyTorch's do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossInfo:
    name: str
    kernel_id: int  # the LOSS_* constant in kernels/loss.cuh
    target: str  # "labels" (integer classes) or "values" (floats shaped like the output)


LOSSES: dict[str, LossInfo] = {
    info.name: info
    for info in [
        LossInfo("softmax_cross_entropy", 0, "labels"),
        LossInfo("binary_cross_entropy", 1, "values"),
        LossInfo("mse", 2, "values"),
        LossInfo("huber", 3, "values"),
    ]
}


@dataclass(frozen=True)
class Loss:
    """A loss with its options: label smoothing for softmax_cross_entropy, delta for huber."""

    name: str
    label_smoothing: float = 0.0
    huber_delta: float = 1.0

    @property
    def info(self) -> LossInfo:
        return LOSSES[self.name]


def make_loss(name: str, label_smoothing: float = 0.0, huber_delta: float = 1.0) -> Loss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not huber_delta > 0.0:
        raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
    return Loss(name, float(label_smoothing), float(huber_delta))
