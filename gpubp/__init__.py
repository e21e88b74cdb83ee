"""gpubp: multilayer perceptrons trained by explicit backpropagation, on the GPU
(CuPy, hand-written CUDA kernels, cuBLAS) or the CPU (NumPy).

    import gpubp
    model = gpubp.MLP([64, 128, 10], loss="softmax_cross_entropy")
    opt = gpubp.Adam(model, lr=1e-3)
    loss, grads = model.loss_and_grads(x, y)
    opt.step(grads)

The names below load on first use, so that `gpubp.kernels` and the CLI's --help do
not pay for importing NumPy.
"""

__version__ = "0.1.0"

_LAZY = {
    "MLPClassifier": ("estimators", "MLPClassifier"),
    "MLPRegressor": ("estimators", "MLPRegressor"),
    "load": ("estimators", "load"),
    "MLP": ("model", "MLP"),
    "SGD": ("optim", "SGD"),
    "Adam": ("optim", "Adam"),
    "AdamW": ("optim", "AdamW"),
    "clip_grad_norm": ("optim", "clip_grad_norm"),
    "jacobian": ("jacobians", "jacobian"),
    "MLPStack": ("stack", "MLPStack"),
    "StackSGD": ("stack", "StackSGD"),
    "StackAdam": ("stack", "StackAdam"),
    "StackAdamW": ("stack", "StackAdamW"),
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gpubp' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
