"""One training step as a function of device state alone, and its capture as a CUDA graph.

    (select)   vectors, first, (step, offset) = tables[pos]     what this step reads: selected by the
               previous step's advance (ahead) or, a chunk's first step, by the upload (ensure)
    gather     x, y = rows perm[offset : offset + n]                 (gather_windows; y: labels only)
    forward    loss, grads = model.forward_backward(x, y)            into preallocated buffers (targets
               (n, c): the loss reads rows perm[offset : offset + n] of the split's in place;
               where the first layer runs in the layer kernels, x too, and nothing is gathered)
    (fused)    loss, shares = model.forward_backward_rows(split, perm, offset, n): the fused
               MLP reads the rows where they lie, and leaves grads in shares the guard sums
    guard      first_bad, skip, norm, scale = step_guard(loss, |g|^2, step, max_norm)  (step_guard_norm;
               unless fp16, the step's advance in the same launch (step_advance_selecting):
               vectors, first <- tables[pos] (this step's, for the update); running_loss += loss;
               pos += 1; (step, offset) <- where[pos] (the next step's)
    (fp16)     vectors, first <- rates[pos], counts[updates - t0];  updates += !skip
    update     opt.update(scale, skip, low)                          reads vectors, first; bf16/fp16:
               params_low = the updated params in 16 bits (what the next forward reads: no cast)
    (fp16)     advance: running_loss += loss;  pos += 1;  (step, offset) <- where[pos]   (step_advance,
               ahead; else in the guard's launch)

Everything that changes from one step to the next (the learning rate of the schedule,
Adam's bias corrections, SGD's first step, the step index, where the batch starts in
the epoch's order) is read from device memory: per-step tables computed on the host
with the optimizer's own Python-float arithmetic (so the same bits as an eager step),
uploaded once per CHUNK steps, and a device counter `pos` that the step itself
advances. No Python value changes between steps, so the step can be captured once per
batch shape and replayed: a CUDA graph on the GPU (`CupyBackend.graph_capturer`), a
recording of the op calls in the CPU tests (gpubp/backend/recording.py). The host
keeps a mirror of the counter (it knows which step comes next) and only ever writes
the tables, the counter and the epoch's order between steps.

Steps and updates: the schedule's learning rate follows the step; Adam's bias
corrections and SGD's first momentum step follow the optimizer's updates. They are the
same count unless a step is skipped and the run goes on, which only fp16's loss scaling
does (a non-finite scaled gradient: no update, the scale halved, as torch.amp.GradScaler
skips optimizer.step() while the LR scheduler still steps). So an fp16 run counts the
updates on the device (`StepState.count_updates`): a counter `updates` that the step
advances when its guard did not skip, per-step rates (lr, 1 - lr wd) by `pos`, and per-update
corrections (1 - b1^t, sqrt(1 - b2^t)) by `updates - t0`, from which `update_vectors`
forms the optimizer's numbers after the guard (lr / (1 - b1^t) divided in float64 and
rounded once: the bits of the host's Python floats). Other precisions skip a step only
once the run has diverged (it then stops), and read precomputed vectors by `pos`.
"""

from __future__ import annotations

import numpy as np

CHUNK = 1024  # steps per table upload


def reads_targets_in_place(loss) -> bool:
    """Whether the step's loss reads the batch's targets where they lie in the split (rows
    perm[offset : offset + n]: targets (n, c), as many bytes a row as the outputs, whose
    copy would be a read and a write of them more) rather than gathered with x (labels:
    4 bytes a row, which ride x's launch and spare the loss a dependent load)."""
    return loss.info.target != "labels"


class StepState:
    """The device-side per-step state; see the module docstring.

    opt: a StackOptimizer (the single-model optimizer's `rule_opt`); lr_rows(s, k): the
    models' learning rates at steps s .. s + k - 1 (0-based), (k, M) (rows of Python floats
    or an array: one call per upload); offset(steps): where each step's batch starts in its
    epoch's order (steps: an int64 array; integer arithmetic, one call per upload).
    Tables, K = CHUNK rows (one per step):
        vectors (K, R, M, 1)  opt.step_table     -> opt.vectors
        first   (K,) bool     update number == 1 -> opt.first_step
        where   (K, 2) int64  the step index, the batch's start -> step (the guard's first
                              bad step), offset: 0-d views of one row buffer (one select)"""

    def __init__(self, backend, opt, lr_rows, offset, total_steps: int, chunk: int = CHUNK):
        self.backend, self.opt, self.lr_rows, self.offset_of = backend, opt, lr_rows, offset
        self.total_steps = int(total_steps)
        k = max(1, min(int(chunk), self.total_steps))
        self.vectors = backend.zeros((k, *opt.vectors.shape), opt.vectors.dtype)
        self.first = backend.zeros((k,), np.bool_)
        self.where = backend.zeros((k, 2), np.int64)
        self.pos = backend.zeros((), np.int64)  # the row of the step about to run
        self.where_row = backend.zeros(2, np.int64)
        self.step = self.where_row[0, ...]  # that step's index, for the guard
        self.offset = self.where_row[1, ...]  # where its batch starts in the epoch's order
        self.base, self.rows, self.host_pos = 0, 0, -1  # host mirror: row 0's step, valid rows, pos
        self.counted = False  # count_updates() sets it

    def count_updates(self) -> None:
        """Count the updates taken on the device (fp16: a skipped step takes none and the run
        goes on). Tables, K rows:
            rates  (K, 2, M) float64  opt.rate_table: row r, lr of step base + r   by pos
            counts (K, 2, M) float64  opt.count_table: row r, update t0 + 1 + r  by updates - t0
        and 0-d int64 `updates` (updates taken; the host's opt.steps at the start) and `t0`
        (the updates taken when the tables were written: one device read per upload)."""
        be, k, m = self.backend, self.first.shape[0], self.opt.vectors.shape[1]
        self.rates = be.zeros((k, 2, m), np.float64)
        self.counts = be.zeros((k, 2, m), np.float64)
        self.updates = be.zeros((), np.int64)
        self.updates[...] = int(self.opt.steps)
        self.t0 = be.zeros((), np.int64)
        self.counted, self.host_pos = True, -1  # the next ensure() uploads

    def updates_taken(self) -> int:
        """The optimizer's updates so far; counted: one device read, also kept in opt.steps."""
        if self.counted:
            self.opt.steps = int(self.backend.to_float(self.updates))
        return self.opt.steps

    def ensure(self, step: int, updates: int) -> None:
        """Make step `step` the next one the device reads (host side, between steps):
        nothing when it already is, else tables for steps step.. are uploaded. `updates`:
        the optimizer's updates so far (the next one is number updates + 1); counted, the
        device's count is read instead."""
        if self.host_pos >= 0 and self.base + self.host_pos == step and self.host_pos < self.rows:
            return
        k = min(self.first.shape[0], self.total_steps - step)
        be = self.backend
        lrs = self.lr_rows(step, k)
        if self.counted:  # at most k updates in k steps: counts for t = updates + 1 .. updates + k
            updates = self.updates_taken()
            self.rates[:k] = be.asarray(self.opt.rate_table(lrs))
            self.counts[:k] = be.asarray(self.opt.count_table(updates + 1, k))
            self.t0[...] = updates
        else:
            vectors = self.opt.step_table(updates + 1, lrs)
            self.vectors[:k] = be.asarray(vectors[..., None], dtype=self.vectors.dtype)
            self.first[:k] = be.asarray(np.arange(updates + 1, updates + 1 + k) == 1)
        steps = np.arange(step, step + k, dtype=np.int64)
        where = np.stack([steps, np.asarray(self.offset_of(steps), dtype=np.int64)], axis=1)  # (k, 2)
        self.where[:k] = be.asarray(where)
        self.pos[...] = 0
        self.base, self.rows, self.host_pos = step, k, 0
        tables, outs = zip(*self.pairs())  # the first step's rows (each step's advance selects the next ones)
        be.select_rows(tables, self.pos, outs)

    def pairs(self) -> list:
        """(table, buffer the ops read) of each per-step table (counted: the optimizer's
        numbers come after the guard, from `count`): a step's rows, selected at pos."""
        pairs = []
        if not self.counted:
            pairs.append((self.vectors, self.opt.vectors))
            if self.opt.reads_first_step:  # (Adam's update does not)
                pairs.append((self.first, self.opt.first_step))
        return [*pairs, (self.where, self.where_row)]  # step, offset

    def guard_advance(self, running) -> tuple:
        """The guard's advance (numpy_ops.step_advance_selecting): (running, pos, now, ahead),
        now = this step's optimizer numbers (read by the update, after the guard), ahead =
        where the next step starts (read by its batch and guard first). Not counted: those
        read the optimizer's numbers from `count`, after the guard."""
        assert not self.counted, "a counted step's update reads its numbers from count"
        *now, where = self.pairs()
        return running, self.pos, now, [where]

    def count(self, skip) -> None:
        """On the device, after the guard (counted only): the update's numbers from this
        step's rates and the next update's counts, then updates += 1 unless `skip`."""
        if self.counted:
            self.backend.update_vectors(self.rates, self.pos, self.counts, self.t0, self.updates, skip,
                                        self.opt.vectors, self.opt.first_step, self.opt.bias_corrected)  # fmt: skip

    def advance(self, running, loss) -> None:
        """On the device, one launch, the step's last op: running += loss, pos += 1, and the
        next step's rows of every table (the host mirror follows in Step.run)."""
        self.backend.step_advance(running, loss, self.pos, ahead=self.pairs())


class ShapeGraphs:
    """The device part of a step, `self._body(n)` for a batch of n rows, run plainly or,
    with a capturer, once per batch shape: the shape's first call runs plainly (it
    allocates the shape's buffers and compiles the kernels; `workspace(n)` is then kept
    for the graph, whoever evicts it later), the second is captured, later calls replay
    the graph. Shared by Step and sweep_step.SweepStep."""

    def _init_shapes(self, capturer) -> None:
        self.capturer = capturer
        self.graphs: dict = {}  # rows -> replay()
        self.warmed: dict = {}  # rows -> the workspace its graph uses (kept: its owner may evict it)
        self.captures = 0  # graphs captured (tests)

    def _run_shape(self, n: int, workspace) -> None:
        graphs, warmed = self.graphs, self.warmed
        replay = graphs.get(n)
        if replay is not None:
            replay()
        elif self.capturer is None:
            self._body(n)
        elif n not in warmed:
            self.capturer.warmup(n, lambda: self._body(n))
            warmed[n] = workspace(n)
        else:
            replay = graphs[n] = self.capturer.capture(n, lambda: self._body(n))
            self.captures += 1
            replay()  # capturing records the step; this runs it


class Step(ShapeGraphs):
    """The trainer's step (see the module docstring). `run(step)` runs step `step`:
    captured and replayed when a capturer is given (once per batch shape: the first call
    of a shape runs it plainly, which also allocates its buffers, the second captures it),
    else plainly. With `host_batch` (data-parallel ranks, memory-mapped splits) the batch
    is gathered from host indices and the step is never captured.

    model, opt (the single-model Optimizer), guard (trainer.FiniteGuard), running_loss
    (0-d float64 device sum), train (the training split), batch_size, n_train, clip
    (max norm, 0: none), state (StepState), buffer(name, like, rows) -> a cached array,
    dist (distributed.LOCAL or a world), interrupted() (Ctrl-C came?), capturer (None, or
    one with warmup(key, fn) and capture(key, fn) -> replay; the key is the batch's rows)."""

    def __init__(self, model, opt, guard, running_loss, train, batch_size: int, n_train: int, clip: float, state,
                 buffer, dist, interrupted, capturer=None, host_batch: bool = False):  # fmt: skip
        self.model, self.opt, self.guard, self.running = model, opt, guard, running_loss
        self.train, self.batch_size, self.n_train, self.clip = train, int(batch_size), int(n_train), float(clip)
        self.state, self.buffer, self.dist, self.interrupted = state, buffer, dist, interrupted
        self.backend = be = model.backend
        if guard.loss_scale is not None:  # fp16: a skipped step is no update (see the module docstring)
            state.count_updates()
        # the guard's launch advances the step (nothing after it reads pos), except in fp16,
        # whose update's numbers come after the guard, from pos
        self.folds = not state.counted and guard.loss_scale is None
        self._init_shapes(None if host_batch else capturer)
        self.host_batch = host_batch
        # bf16/fp16: the update writes params_low (the parameters in 16 bits) as it goes, so
        # the next step's forward pass needs no cast; the first step casts once, on the host
        # side of the step (a data-parallel rank's forward pass keeps its own cast)
        self.fold_cast = model.flat_params_low is not None and not host_batch
        self.low_current = False
        self.steps_per_epoch = -(-self.n_train // self.batch_size)
        self.loss = be.zeros((), model.dtype)
        self.grad_sq = be.zeros((), model.dtype)
        self.streamed = getattr(train, "streams", False)  # stream.StreamSplit: the order is applied on the host
        self.perm = None if host_batch else be.zeros((self.n_train,), np.int64)  # the epoch's order
        if self.streamed and not host_batch:
            self.perm = train.ring_index  # fixed: positions in its ring of two chunks (gpubp/stream.py)
        self.perm_host = None

    def new_epoch(self, perm: np.ndarray, epoch: int | None = None) -> None:
        """The epoch's order (host int64 (n_train,)) into the fixed buffer the step reads
        (a streamed split: to the split, which gathers its chunks on the host)."""
        if self.streamed and not self.host_batch:
            self.train.new_epoch(epoch, perm)
        elif self.host_batch:
            self.perm_host = self.train.order(perm)
        else:
            self.perm[...] = self.backend.asarray(perm.astype(np.int64, copy=False))

    def run(self, step: int) -> bool:
        """Run step `step` (0-based); returns whether Ctrl-C came (on any rank)."""
        b = step % self.steps_per_epoch
        n = min(self.batch_size, self.n_train - b * self.batch_size)  # this batch's rows
        self.state.ensure(step, self.opt.steps)
        stop = False
        if self.host_batch:
            batch = self.perm_host[b * self.batch_size : b * self.batch_size + n]
            idx = self.dist.rows(batch)  # this rank's slice of the global batch
            xb, yb = self.train.batch(idx, self.buffer)
            loss, stop = self.dist.forward_backward(self.model, xb, yb, n, self.interrupted)
            self._finish(loss)
        else:
            if self.streamed:
                self.train.ready(step)  # its batch's chunks resident, the next one on its way
            if self.fold_cast and not self.low_current:
                self.model._round_params()  # from here on each update writes it
                self.low_current = True
            self._run_shape(n, self.model.step_workspace)
            stop = self.interrupted()
        if not self.state.counted:  # host mirrors of the device counters (counted: read at uploads, sync_updates)
            self.opt.steps += 1
        self.state.host_pos += 1
        return stop

    def sync_updates(self) -> int:
        """The optimizer's updates so far into opt.steps (an fp16 run: one device read), e.g.
        before a checkpoint records them."""
        return self.state.updates_taken()

    def _body(self, n: int) -> None:
        """The whole step on the device, `n` rows; everything it touches is a fixed buffer."""
        st = self.state  # (its rows at pos: selected by the previous step's advance, or the upload)
        # the fused MLP reads rows perm[offset : offset + n] where they lie; else they are gathered
        train, loss = self.train, None
        if self.model.fused_mlp:  # (None where it does not run: runs_fused_mlp)
            loss = self.model.forward_backward_rows(train.x, train.target, self.perm, st.offset, n, self.loss)
        if loss is None and self.model.takes_input_window():
            # rows perm[offset : offset + n] read where they lie by the first layer's kernels
            # and the loss: no gather at all
            window = (self.perm, st.offset)
            loss = self.model.forward_backward(train.x, train.target, loss_out=self.loss, params_rounded=self.fold_cast,
                                               target_window=window, x_window=(*window, n), keep_shares=True)  # fmt: skip
        if loss is None:
            # rows perm[offset : offset + n]: x gathered (bf16, fp16: rounded to the model's
            # storage as it moves, no cast after); targets (n, c) read where they lie by the
            # loss (no copy of them first); labels (4 bytes a row) ride x's gather
            in_place = reads_targets_in_place(self.model.loss)
            xb, yb = train.batch_window(self.perm, st.offset, n, self.buffer, target=not in_place,
                                        x_dtype=self.model.store_dtype)  # fmt: skip
            loss = self.model.forward_backward(xb, train.target if in_place else yb, loss_out=self.loss,
                                               params_rounded=self.fold_cast, keep_shares=True,
                                               target_window=(self.perm, st.offset) if in_place else None)  # fmt: skip
        self._finish(loss)

    def _finish(self, loss) -> None:
        """guard + clip, update, running loss, advance. The guard's launch advances too
        (`folds`), except in fp16 (the scaled guard; its update's numbers come after it,
        from pos)."""
        st = self.state
        self.guard.check(st.step, loss, self.model.flat_grads, self.grad_sq, self.clip, self.model.grad_shares,
                         advance=st.guard_advance(self.running) if self.folds else None)  # fmt: skip
        st.count(self.guard.skip)
        self.opt.update(self.guard.scale, self.guard.skip, low=self.model.flat_params_low if self.fold_cast else None)
        if not self.folds:
            st.advance(self.running, loss)
