"""gpubp: multilayer perceptrons trained by explicit backpropagation, on the GPU
(CuPy, hand-written CUDA kernels, cuBLAS) or the CPU (NumPy).

    import gpubp
    model = gpubp.MLP([64, 128, 10], loss="softmax_cross_entropy")
    opt = gpubp.Adam(model, lr=1e-3)
    loss, grads = model.loss_and_grads(x, y)
    opt.step(grads)
"""

__version__ = "0.1.0"

from .jacobians import jacobian  # noqa: E402
from .model import MLP  # noqa: E402
from .optim import SGD, Adam, AdamW, clip_grad_norm  # noqa: E402

__all__ = ["MLP", "jacobian", "SGD", "Adam", "AdamW", "clip_grad_norm", "__version__"]
