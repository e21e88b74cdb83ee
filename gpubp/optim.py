"""Optimizers with torch.optim's update rules, one fused update over the flat buffers.

    opt = gpubp.SGD(model, lr=0.1, momentum=0.9)
    loss, grads = model.loss_and_grads(x, y)
    opt.step(grads)

State (momentum, Adam's moments) lives in flat buffers shaped like the parameters,
so a step is one op over three or four contiguous arrays (one kernel on the GPU).
The update rules themselves are gpubp/stack.py's, run on the model as a stack of one.
"""

from __future__ import annotations

import numpy as np

from .stack import StackAdam, StackAdamW, StackOptimizer, StackSGD, build_optimizer

OPTIMIZERS = ("sgd", "adam", "adamw")


class _OneModel:
    """A single MLP seen as a stack of one: (1, P) views of its flat buffers (no copies;
    read on each use, as data parallel may move the gradients into a longer buffer)."""

    count = 1

    def __init__(self, model):
        self.model = model
        self.backend, self.dtype, self.n_params = model.backend, model.dtype, model.n_params

    @property
    def flat_params(self):
        return self.model.flat_params.reshape(1, -1)

    @property
    def flat_grads(self):
        return self.model.flat_grads.reshape(1, -1)


class Optimizer:
    """One model's optimizer: the stacked rule of gpubp/stack.py over a stack of one
    (`rule`), so a single run and a sweep member share one piece of code and the same
    bits. State arrays are (P,) views of the rule's (1, P) buffers."""

    rule: type[StackOptimizer] = StackOptimizer
    state_names: tuple[str, ...] = ()

    def __init__(self, model, lr: float, **hyper):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.model = model
        self.backend = model.backend
        self.rule_opt = self.rule(_OneModel(model), float(lr), **hyper)
        for name in self.state_names:
            setattr(self, name, getattr(self.rule_opt, name)[0])

    @property
    def lr(self) -> float:
        return float(self.rule_opt.lr[0])

    @lr.setter
    def lr(self, value: float) -> None:
        self.rule_opt.lr[0] = float(value)

    @property
    def steps(self) -> int:
        """Updates taken so far."""
        return self.rule_opt.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.rule_opt.steps = int(value)

    def _flat_grads(self, grads) -> None:
        """Copy `grads` (a list in params order) into the model's gradient buffer, if given."""
        model = self.model
        if grads is None or grads is model.grads:
            return
        grads = list(grads)
        if len(grads) != len(model.grads):
            raise ValueError(f"step: expected {len(model.grads)} gradient arrays, got {len(grads)}")
        for dst, src in zip(model.grads, grads):
            if src is not dst:
                dst[...] = self.backend.asarray(src, dtype=model.dtype).reshape(dst.shape)

    def step(self, grads=None, grad_scale=1.0, skip=None) -> None:
        """Update model.params in place from `grads` (default: the model's own),
        each gradient first multiplied by `grad_scale` (gradient clipping: a Python float
        or a 0-d backend array). `skip`, a 0-d boolean backend array, makes the update
        change nothing when true (the trainer's guard against a non-finite step; no host
        sync on the GPU, so the update is counted in `steps` either way; the trainer's
        fp16 step counts only the updates taken, on the device: gpubp/step.py)."""
        self._flat_grads(grads)
        if isinstance(grad_scale, (int, float)):
            grad_scale = None if grad_scale == 1.0 else self.backend.asarray(np.full(1, grad_scale), self.model.dtype)
        self.rule_opt.step(None, grad_scale, skip)

    def update(self, grad_scale=None, skip=None, low=None) -> None:
        """The update from the device-side per-step state alone (see StackOptimizer.update);
        low: the model's 16-bit parameter copy (P,), left as the updated parameters rounded."""
        self.rule_opt.update(grad_scale, skip, low=None if low is None else low.reshape(1, -1))

    def state_dict(self) -> dict:
        return self.rule_opt.state_dict(0)

    def load_state_dict(self, state: dict) -> None:
        self.rule_opt.load_state_dict(state, 0)


class SGD(Optimizer):
    """torch.optim.SGD: momentum, dampening, nesterov, L2 weight decay."""

    rule = StackSGD
    state_names = StackSGD.state_names

    def __init__(self, model, lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        if momentum < 0 or weight_decay < 0 or not 0 <= dampening <= 1:
            raise ValueError("momentum and weight_decay must be >= 0, dampening in [0, 1]")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        super().__init__(model, lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                         weight_decay=weight_decay)  # fmt: skip
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.nesterov, self.weight_decay = bool(nesterov), float(weight_decay)


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient)."""

    rule = StackAdam
    state_names = StackAdam.state_names
    decoupled = False

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        beta1, beta2 = (float(b) for b in betas)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")
        if not eps > 0 or weight_decay < 0:
            raise ValueError("eps must be > 0 and weight_decay >= 0")
        super().__init__(model, lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, float(eps), float(weight_decay)


class AdamW(Adam):
    """torch.optim.AdamW: weight decay applied to the parameters, p <- p (1 - lr wd)."""

    rule = StackAdamW
    decoupled = True

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(model, lr, betas, eps, weight_decay)


OPTIMIZER_CLASSES = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def clip_scale(backend, flat_grads, max_norm: float):
    """(global norm, scale) as 0-d backend arrays, scale = min(1, max_norm / (norm + 1e-6)),
    as torch.nn.utils.clip_grad_norm_ computes it (backend.step_guard, which the trainer
    calls with its divergence guard). Nothing is read back to the host."""
    dtype = flat_grads.dtype
    norm, scale = backend.zeros((), dtype), backend.zeros((), dtype)
    first_bad, skip = backend.zeros((), np.int64), backend.zeros((), np.bool_)
    zero = backend.zeros((), dtype)  # a finite loss: only the norm matters here
    backend.step_guard(zero, backend.sum_squares(flat_grads), 0, max_norm, first_bad, skip, norm, scale)
    return norm, scale


def clip_grad_norm(model, max_norm: float) -> float:
    """Scale model.grads in place so their global 2-norm is at most max_norm;
    returns the norm before clipping (torch.nn.utils.clip_grad_norm_)."""
    norm, scale = clip_scale(model.backend, model.flat_grads, float(max_norm))
    model.flat_grads *= scale
    return model.backend.to_float(norm)


def make_optimizer(model, name: str, lr, *hyper, **named):
    """The optimizer `name` (sgd, adam, adamw) for one model; the hyperparameters as stack.build_optimizer."""
    return build_optimizer(OPTIMIZER_CLASSES, model, name, lr, *hyper, **named)
