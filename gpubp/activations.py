"""The activation registry: names, what each backward pass needs saved, kernel ids.

Every activation f has a local gradient f'. Where f' can be written in terms of the
output y = f(z) we save y alone (it is the next layer's input anyway, so saving it
costs nothing); otherwise we also keep the pre-activation z.

| name        | f(z)                                  | f' from | f'                                   |
|-------------|---------------------------------------|---------|--------------------------------------|
| identity    | z                                     | -       | 1                                    |
| relu        | max(z, 0)                             | y       | [y > 0]                              |
| leaky_relu  | z if z > 0 else a z     (a >= 0)      | y       | 1 if y > 0 else a                    |
| elu         | z if z > 0 else exp(z) - 1            | y       | 1 if y > 0 else y + 1                |
| gelu        | z Phi(z), Phi = normal CDF (erf)      | z       | Phi(z) + z phi(z)                    |
| gelu_tanh   | z/2 (1 + tanh(c (z + 0.044715 z^3)))  | z       | see numpy_ops.gelu_tanh_backward     |
| silu        | z sigmoid(z)                          | z       | s (1 + z (1 - s)), s = sigmoid(z)    |
| tanh        | tanh(z)                               | y       | 1 - y^2                              |
| sigmoid     | 1 / (1 + exp(-z))                     | y       | y (1 - y)                            |
| softplus    | log(1 + exp(z))                       | y       | 1 - exp(-y)   (= sigmoid(z))         |

The same table, as code, is kernels/activations.cuh (GPU and host) and
gpubp/backend/numpy_ops.py (the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

SAVES_NOTHING = "none"
SAVES_OUTPUT = "output"
SAVES_INPUT = "input"


@dataclass(frozen=True)
class ActivationInfo:
    name: str
    kernel_id: int  # the ACT_* constant in kernels/activations.cuh
    saves: str  # what the backward pass reads: SAVES_NOTHING, SAVES_OUTPUT or SAVES_INPUT


ACTIVATIONS: dict[str, ActivationInfo] = {
    info.name: info
    for info in [
        ActivationInfo("identity", 0, SAVES_NOTHING),
        ActivationInfo("relu", 1, SAVES_OUTPUT),
        ActivationInfo("leaky_relu", 2, SAVES_OUTPUT),
        ActivationInfo("elu", 3, SAVES_OUTPUT),
        ActivationInfo("gelu", 4, SAVES_INPUT),
        ActivationInfo("gelu_tanh", 5, SAVES_INPUT),
        ActivationInfo("silu", 6, SAVES_INPUT),
        ActivationInfo("tanh", 7, SAVES_OUTPUT),
        ActivationInfo("sigmoid", 8, SAVES_OUTPUT),
        ActivationInfo("softplus", 9, SAVES_OUTPUT),
    ]
}


@dataclass(frozen=True)
class Activation:
    """An activation with its parameter: `alpha` is leaky_relu's negative slope
    (elu's alpha is fixed at 1, as in PyTorch's default)."""

    name: str
    alpha: float = 0.0

    @property
    def info(self) -> ActivationInfo:
        return ACTIVATIONS[self.name]

    @property
    def saves(self) -> str:
        return self.info.saves


def make_activation(name: str, leaky_relu_slope: float = 0.01) -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    if name == "leaky_relu":
        if not leaky_relu_slope >= 0.0:
            # a negative slope flips the sign of y, so f' could not be read from y
            raise ValueError(f"leaky_relu_slope must be >= 0, got {leaky_relu_slope}")
        return Activation(name, float(leaky_relu_slope))
    return Activation(name)
