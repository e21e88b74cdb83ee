"""A sweep's training step (M stacked models) as one function of device state, captured
once per batch shape as gpubp/step.py's Step is for a single model.

    (select)   vectors (R, M, 1), (first), step, offset = tables[pos]   (StepState: selected by the
               previous step's advance, or the upload)
    gather     idx = perm[:, offset : offset + n]   (M, n)     index_window_batched
               x, y = rows idx                      (M, n, F)  gather_rows
               (one seed: x, y = rows perm[0, offset : offset + n], (n, F), gather_windows)
    forward    loss (M,), grads (M, P) = stack.forward_backward(x, y, loss_out)
    guard      first_bad, skip, norm, scale (M,) = verdicts(loss, |g_i|^2, step, max_norm, frozen)
                                                        (step_guard_norm_batched: |g_i|^2 too, one launch)
    update     opt.update(scale, skip)                                    reads vectors, first
               (guard and update per block of models, inside forward_backward's blocks:
               on the CPU each block's task runs them while its models are in cache)
    advance    running += loss;  pos += 1;  the next step's rows <- tables[pos]   step_advance

Every array it touches is a fixed buffer: the epoch's orders (M, n_train) written by the
host once an epoch, the loss and squared norms (M,), the guard's (M,) outputs of the
Group, the frozen flags (M,) the trainer rewrites in place after each evaluation. No
Python value changes between steps, so the step is captured once per batch shape and
replayed: a CUDA graph on the GPU (CupyBackend.graph_capturer), a recording of the op
calls in the CPU tests (gpubp/backend/recording.py; the stack's CPU blocks of models
are recorded block by block and replayed on the same thread pool, see
RecordingBackend.run_blocks). Uncaptured (capturer None) it runs the same calls each step.
"""

from __future__ import annotations

import numpy as np

from . import data as D
from .step import ShapeGraphs


class SweepStep(ShapeGraphs):
    """The step of group `g` (gpubp.sweep_group.Group) over StepState `state`; `frozen`
    (M,) bool device flags (stopped early, or diverged at an earlier evaluation), written
    in place by the caller; capturer: None, or one with warmup(key, fn) / capture(key, fn)."""

    def __init__(self, g, state, frozen, capturer=None):
        self.g, self.state, self.frozen = g, state, frozen
        self._init_shapes(capturer)
        self.backend = be = g.backend
        self.count = len(g.members)
        self.shared = len(g.unique_seeds) == 1  # one seed: one order, a batch shared by every model
        self.batch_size = int(g.cfg.train.batch_size)
        self.perm = be.zeros((1 if self.shared else self.count, g.n_train), np.int64)  # the epoch's orders
        self.loss = be.zeros((self.count,), g.stack.dtype)
        self.grad_sq = be.zeros((self.count,), g.stack.dtype)
        self.epoch = None  # the epoch whose orders self.perm holds
        self.buffers: dict = {}  # rows -> (idx, idx rows view, x, y, x view, y view)

    def new_epoch(self, epoch: int) -> None:
        """Each model's order of epoch `epoch` into the fixed buffer (host, between steps):
        model i's seed's permutation, offset to its seed's rows of the concatenated splits."""
        g = self.g
        perms = np.stack([D.epoch_permutation(s, epoch, g.n_train) for s in g.unique_seeds]).astype(np.int64)
        if not self.shared:
            perms = perms[g.seed_index] + (g.seed_index * g.n_train)[:, None]  # (M, n) rows of sweep_group.Concat
        self.perm[...] = self.backend.asarray(perms)
        self.epoch = epoch

    def run(self, step: int) -> None:
        """Step `step` (0-based) of every model."""
        g = self.g
        epoch, b = divmod(step, g.steps_per_epoch)
        if epoch != self.epoch:
            self.new_epoch(epoch)
        n = min(self.batch_size, g.n_train - b * self.batch_size)  # this batch's rows
        self.state.ensure(step, g.opt.steps)
        self._run_shape(n, self.g.stack._workspace)
        g.opt.steps += 1  # host mirrors of the device counters
        self.state.host_pos += 1

    def _buffers(self, n: int):
        bufs = self.buffers.get(n)
        if bufs is None:
            be, train, m = self.backend, self.g.data["train"], self.count
            rows = n if self.shared else m * n
            idx = None if self.shared else be.zeros((rows,), np.int64)
            x = be.empty((rows, *train.x.shape[1:]), train.x.dtype)
            y = be.empty((rows, *train.target.shape[1:]), train.target.dtype)
            if self.shared:
                bufs = (idx, idx, x, y, x, y)
            else:  # views (M, n, ...) of the flat gathers: model i's rows i*n .. (i+1)*n
                bufs = (idx, idx.reshape(m, n), x, y, x.reshape(m, n, *x.shape[1:]), y.reshape(m, n, *y.shape[1:]))
            self.buffers[n] = bufs
        return bufs

    def _body(self, n: int) -> None:
        """The whole step on the device, `n` rows per model; every array a fixed buffer."""
        g, be, st = self.g, self.backend, self.state
        stack = g.stack
        idx, idx_rows, x, y, xv, yv = self._buffers(n)
        train = g.data["train"]
        if self.shared:  # one order for every model: rows perm[offset : offset + n], one launch
            be.gather_windows((train.x, train.target), self.perm[0], st.offset, (x, y))
        else:
            be.index_window_batched(self.perm, st.offset, out=idx_rows)
            be.gather_rows(train.x, idx, x)
            be.gather_rows(train.target, idx, y)

        def guard_and_update(sl):  # models sl, right after their backward pass (one block on the GPU)
            # one launch: squared norms, first non-finite step, skip flags, norms and clipping scales
            be.step_guard_norm_batched(self.loss[sl], stack.flat_grads[sl], self.grad_sq[sl], st.step, g.max_norm[sl],
                                       self.frozen[sl], g.first_bad[sl], g.skip[sl], g.norm[sl], g.scale[sl])  # fmt: skip
            g.opt.update(grad_scale=g.scale[sl], skip=g.skip[sl], rows=sl)

        loss = stack.forward_backward(xv, yv, loss_out=self.loss, then=guard_and_update)
        st.advance(g.running, loss)


def capture_note(cfg, backend, train) -> str | None:
    """Why a sweep's step runs uncaptured (None: it is captured), as Trainer.make_step says it."""
    from .sweep_group import Concat

    if not cfg.train.cuda_graph:
        return "train.cuda_graph = false"
    if getattr(backend, "graph_capturer", None) is None:
        return f"the {backend.name} backend runs the step uncaptured"
    if not isinstance(train, (D.DeviceSplit, Concat)):
        return "a mapped split"
    return None
