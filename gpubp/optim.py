"""Optimizers with torch.optim's update rules, one fused update over the flat buffers.

    opt = gpubp.SGD(model, lr=0.1, momentum=0.9)
    loss, grads = model.loss_and_grads(x, y)
    opt.step(grads)

State (momentum, Adam's moments) lives in flat buffers shaped like the parameters,
so a step is one op over three or four contiguous arrays (one kernel on the GPU).
"""

from __future__ import annotations

import numpy as np

OPTIMIZERS = ("sgd", "adam", "adamw")


class Optimizer:
    state_names: tuple[str, ...] = ()

    def __init__(self, model, lr: float):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.model = model
        self.backend = model.backend
        self.lr = float(lr)
        self.steps = 0  # updates taken so far
        for name in self.state_names:
            setattr(self, name, self.backend.zeros(model.n_params, model.dtype))
        # working space of the update: (2, P) on backends that need it (NumPy), else nothing
        rows = self.backend.optimizer_scratch_rows
        self._scratch = self.backend.empty((rows, model.n_params), model.dtype) if rows else None

    def _flat_grads(self, grads):
        """The flat gradient buffer: the model's own, or `grads` copied into it."""
        model = self.model
        if grads is None or grads is model.grads:
            return model.flat_grads
        grads = list(grads)
        if len(grads) != len(model.grads):
            raise ValueError(f"step: expected {len(model.grads)} gradient arrays, got {len(grads)}")
        for dst, src in zip(model.grads, grads):
            if src is not dst:
                dst[...] = self.backend.asarray(src, dtype=model.dtype).reshape(dst.shape)
        return model.flat_grads

    def step(self, grads=None, grad_scale=1.0, skip=None) -> None:
        """Update model.params in place from `grads` (default: the model's own),
        each gradient first multiplied by `grad_scale` (gradient clipping). `skip`, a
        0-d boolean backend array, makes the update change nothing when true (the
        trainer's guard against a non-finite step; no host sync on the GPU)."""
        g = self._flat_grads(grads)
        self.steps += 1
        self._update(self.model.flat_params, g, grad_scale, skip)

    def _update(self, p, g, grad_scale, skip) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        state = {"steps": self.steps}
        for name in self.state_names:
            state[name] = self.backend.to_numpy(getattr(self, name)).copy()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for name in self.state_names:
            arr = np.asarray(state[name])
            if arr.shape != (self.model.n_params,):
                raise ValueError(f"optimizer state {name!r} has shape {arr.shape}, expected ({self.model.n_params},)")
            getattr(self, name)[...] = self.backend.asarray(arr, dtype=self.model.dtype)


class SGD(Optimizer):
    """torch.optim.SGD: momentum, dampening, nesterov, L2 weight decay."""

    state_names = ("momentum_buffer",)

    def __init__(self, model, lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(model, lr)
        if momentum < 0 or weight_decay < 0 or not 0 <= dampening <= 1:
            raise ValueError("momentum and weight_decay must be >= 0, dampening in [0, 1]")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.nesterov, self.weight_decay = bool(nesterov), float(weight_decay)

    def _update(self, p, g, grad_scale, skip):
        self.backend.sgd_step(
            p, g, self.momentum_buffer, self._scratch,
            lr=self.lr, momentum=self.momentum, dampening=self.dampening, nesterov=self.nesterov,
            weight_decay=self.weight_decay, first_step=self.steps == 1, grad_scale=grad_scale, skip=skip,
        )  # fmt: skip


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient)."""

    state_names = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(model, lr)
        beta1, beta2 = (float(b) for b in betas)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")
        if not eps > 0 or weight_decay < 0:
            raise ValueError("eps must be > 0 and weight_decay >= 0")
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, float(eps), float(weight_decay)

    def _update(self, p, g, grad_scale, skip):
        self.backend.adam_step(
            p, g, self.exp_avg, self.exp_avg_sq, self._scratch,
            lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay,
            step=self.steps, decoupled=self.decoupled, grad_scale=grad_scale, skip=skip,
        )  # fmt: skip


class AdamW(Adam):
    """torch.optim.AdamW: weight decay applied to the parameters, p <- p (1 - lr wd)."""

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


def make_optimizer(model, name: str, lr: float, momentum=0.0, dampening=0.0, nesterov=False,
                   betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):  # fmt: skip
    if name == "sgd":
        return SGD(model, lr, momentum, dampening, nesterov, weight_decay)
    if name == "adam":
        return Adam(model, lr, betas, eps, weight_decay)
    if name == "adamw":
        return AdamW(model, lr, betas, eps, weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
