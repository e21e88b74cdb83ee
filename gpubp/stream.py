"""A training split larger than the device's memory budget (`data.device_memory`),
streamed from host memory: the same batches, the same rows in the same order, as
when it is resident.

The split stays on the host, standardised and in the model's dtype. Each epoch's
order `perm` is cut into chunks of C rows (positions jC .. (j+1)C of the order; the
last one shorter); chunk j is gathered on the host, x[perm[jC : jC + C]], into a
staging buffer (pinned on the GPU) and copied into one of two device slots, the
"ring" of 2C rows. Chunks are numbered through the run, g = epoch * chunks_per_epoch
+ j, and chunk g lives in slot g % 2:

    ring rows [ (g % 2) C, (g % 2 + 1) C )  <-  x[perm[jC : jC + C]]
    batch at positions [o, o + n) of the epoch (n <= C):
        ring positions r + i (mod 2C), i < n,  r = (g % 2) C + (o - jC),  j = o // C

A batch may straddle chunks j and j + 1 (C need not be a multiple of the batch): both
are resident then, in the two slots, and the positions wrap around the ring. So the
step's gather needs no new code: its "epoch order" is the fixed ring index
ring_index[i] = i mod 2C, i < 3C (a window of n <= C positions starting below 2C
never needs the modulo), and its per-step offset is r (`ring_offset`, uploaded with
the step's other tables). Everything the step reads is a fixed device buffer, so the
CUDA graph captures and replays as for a resident split.

Double buffering (`ready`, before each step): the chunks the batch touches are made
resident (loaded now if they are not: the first chunk, a resumed run); when the batch
lies in one chunk g, the other slot is done with chunk g - 1, and chunk g + 1 (the
next epoch's first, at an epoch's end) is gathered and copied into it on the copy
stream while chunk g is trained on. The copy waits for the steps already enqueued
(they read the slot's old rows); the first step reading it waits for the copy
(gpubp/backend/transfer.py: events on the GPU, plain copies on the CPU).

Evaluation of the split (the final summary's train metrics) copies its rows in order,
one evaluation batch at a time, into a buffer of its own, with the same ops as
MLP.evaluate: the same numbers as a resident evaluation.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backend.transfer import free_memory, make_transfer
from .config import format_size, parse_size
from .errors import ConfigError

GATHER_THREADS = min(8, os.cpu_count() or 1)
_POOL = []  # the gather's thread pool, made when first needed


def gather(src: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[i] = src[rows[i]] on the host: np.take, in GATHER_THREADS slices of the rows
    when out is large (np.take releases the GIL; one thread copies a few GB/s, short of
    what a GPU step consumes on a wide model)."""
    parts = min(GATHER_THREADS, out.nbytes // (16 << 20))
    if parts <= 1:
        np.take(src, rows, axis=0, out=out)
        return
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(GATHER_THREADS, thread_name_prefix="gpubp-gather"))
    bounds = np.linspace(0, rows.shape[0], parts + 1).astype(np.int64)
    jobs = [_POOL[0].submit(np.take, src, rows[a:b], 0, out[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    for job in jobs:
        job.result()


def budget(value, backend) -> int | None:
    """data.device_memory in bytes: the given size, or ("free") the device's free memory;
    None (no limit) for "free" on the CPU."""
    return free_memory(backend) if value == "free" else parse_size(value)


def plan(est: dict, n_rows: int, n_train: int, row_bytes: int, batch: int, eval_rows: int, limit: int | None,
         where: str) -> tuple[int | None, str]:  # fmt: skip
    """(C, note): the chunk rows of a streamed training split, or None when everything
    fits `limit` bytes (None: no limit). est: trainer.memory_estimate of the whole run
    (its "data" covers n_rows rows, n_train of them the training split); row_bytes: one
    training row on the device (features and target). Streamed, the device holds
    everything but the training split, two chunks (2C rows), the ring index (3C int64)
    and an evaluation buffer of eval_rows rows: C is the largest multiple of the batch
    that fits, at most n_train. Raises ConfigError (`where`: the key and value) when not even two chunks
    of one batch fit."""
    total = sum(est.values())
    if limit is None or total <= limit:
        return None, ""
    per_data_row = est["data"] / max(n_rows, 1)
    fixed = est["params"] + est["batch"] + est["eval"] + per_data_row * (n_rows - n_train) + eval_rows * row_bytes
    per_chunk_row = 2 * row_bytes + 3 * 8
    chunk = int((limit - fixed) // per_chunk_row)
    need = fixed + per_chunk_row * batch
    if chunk < batch:
        raise ConfigError(
            f"{where}: {format_size(limit)} is too small even to stream the training split: the run needs about "
            f"{format_size(need)} (parameters, optimizer state, one batch, the other splits, two chunks of one batch); "
            "raise it, or lower train.batch_size or the model's widths"
        )
    # a multiple of the batch: no batch straddles two chunks, so the next chunk is always on its way
    # while one is trained on (a straddling batch needs both slots, and the chunk after it waits)
    chunk = min(chunk - chunk % batch, n_train)
    note = (
        f"data: the training split streams from host memory ({n_train} rows, {format_size(n_train * row_bytes)}): the run "
        f"needs about {format_size(total)} on the device, over {where} ({format_size(limit)}); two chunks of {chunk} rows "
        f"({format_size(chunk * row_bytes)} each) on the device, one copied while the other is trained on"
    )
    return chunk, note


class StreamSplit:
    """The training split on the host, streamed to the device (module docstring). It has
    `data.DeviceSplit`'s interface for the step (n, x, target, batch) and evaluation
    (evaluate), plus what the step calls to stream: ring_index, ring_offset(step),
    new_epoch(perm), ready(step).

    model; ds (data.Dataset); standardizer; targets (host, the loss's form); chunk: C
    rows; batch_size; order_of(epoch) -> that epoch's order (host int64 (n,)), for the
    next epoch's first chunk."""

    streams = True

    def __init__(self, model, ds, standardizer, targets, chunk: int, batch_size: int, order_of):
        self.model, self.backend = model, model.backend
        be = self.backend
        self.n = n = len(ds)
        x = ds.x if standardizer is None else standardizer(ds.x)  # None: ds.x is the model's input as it is
        self.x_host = np.ascontiguousarray(x, dtype=model.dtype)  # (n, F): the same bits as a resident split
        self.target_host = np.ascontiguousarray(be.to_numpy(model.as_target(targets, n)))  # (n,) int32 or (n, T)
        self.labels_host = np.asarray(ds.y, dtype=np.int32) if ds.is_classification else None
        self.chunk = c = int(chunk)
        self.batch_size = int(batch_size)
        if not self.batch_size <= c <= n and not c == n < self.batch_size:
            raise AssertionError(f"chunk {c} rows for batches of {self.batch_size} from {n} rows")
        self.order_of = order_of
        self.steps_per_epoch = -(-n // self.batch_size)
        self.chunks_per_epoch = -(-n // c)
        self.x = be.zeros((2 * c, self.x_host.shape[1]), self.x_host.dtype)  # the ring: two slots of C rows
        self.target = be.zeros((2 * c, *self.target_host.shape[1:]), self.target_host.dtype)
        self.ring_index = be.asarray(np.arange(3 * c, dtype=np.int64) % (2 * c))  # the step's fixed "order"
        self.transfer = make_transfer(be)
        self.stage_x = [self.transfer.staging((c, self.x_host.shape[1]), self.x_host.dtype) for _ in range(2)]
        self.stage_t = [self.transfer.staging((c, *self.target_host.shape[1:]), self.target_host.dtype)
                        for _ in range(2)]  # fmt: skip
        self.held = [-1, -1]  # the chunk (run-wide number g) each slot holds or is receiving
        self.orders = {}  # epoch -> its order (host), the current and the next
        self.loads = self.waits = 0  # chunks copied, and those copied only when a step needed them (tests)
        self.eval_x = self.eval_t = None  # evaluation's own buffers, made when first needed

    # ---- the step's view

    def ring_offset(self, step: int) -> int:
        """r: where step `step`'s batch starts in the ring (module docstring)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        o = b * self.batch_size
        j = o // self.chunk
        g = epoch * self.chunks_per_epoch + j
        return (g % 2) * self.chunk + (o - j * self.chunk)

    def batch_window(self, perm, start, n: int, buffer, target: bool = True, x_dtype=None):
        """(x, target) of ring rows perm[start : start + n], gathered on the device (as
        DeviceSplit.batch_window)."""
        from .data import window_batch

        return window_batch(self, perm, start, n, buffer, target, x_dtype)

    def new_epoch(self, epoch: int, perm: np.ndarray) -> None:
        """Epoch `epoch`'s order (host int64 (n,)); older epochs' orders are dropped."""
        self.orders = {e: p for e, p in self.orders.items() if e > epoch}
        self.orders[epoch] = np.asarray(perm, dtype=np.int64)

    def ready(self, step: int) -> None:
        """Before step `step` (host side): the chunks its batch reads resident (the compute
        stream waits for their copies), and the next chunk on its way when the other slot
        is free (module docstring)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        o = b * self.batch_size
        n = min(self.batch_size, self.n - o)
        base = epoch * self.chunks_per_epoch
        first, last = base + o // self.chunk, base + (o + n - 1) // self.chunk
        for g in range(first, last + 1):
            if self.held[g % 2] != g:
                self._load(g)
                self.waits += 1  # the step waits for this copy: nothing to overlap it with
            self.transfer.ready(g % 2)
        if first == last and self.held[(first + 1) % 2] != first + 1:
            self._load(first + 1)  # into the slot chunk first - 1 is done with

    def _order(self, epoch: int) -> np.ndarray:
        order = self.orders.get(epoch)
        if order is None:
            order = self.orders[epoch] = np.asarray(self.order_of(epoch), dtype=np.int64)
        return order

    def _load(self, g: int) -> None:
        """Chunk g (run-wide): gathered on the host into slot g % 2's staging buffer, copied
        to the slot's ring rows on the copy stream."""
        epoch, j = divmod(g, self.chunks_per_epoch)
        rows = self._order(epoch)[j * self.chunk : (j + 1) * self.chunk]  # (k,) k <= C
        k, slot = rows.shape[0], g % 2
        t = self.transfer
        t.wait_staging(slot)  # its previous copy has read the staging buffer
        sx, st = self.stage_x[slot][:k], self.stage_t[slot][:k]
        gather(self.x_host, rows, sx)
        gather(self.target_host, rows, st)
        lo = slot * self.chunk
        t.copy(self.x[lo : lo + k], sx, slot)
        t.copy(self.target[lo : lo + k], st, slot)
        self.held[slot] = g
        self.loads += 1

    # ---- evaluation

    def evaluate(self, model, batch_size: int, outputs=None):
        """(mean loss, correct count or None) over the split, as MLP.evaluate computes it
        for a resident split (the same ops, batches and sums), each batch's rows copied
        in order into evaluation buffers of batch_size rows."""
        be, n = self.backend, self.n
        rows = min(batch_size, n)
        if self.eval_x is None or self.eval_x.shape[0] != rows:
            self.eval_x = be.zeros((rows, self.x_host.shape[1]), self.x_host.dtype)
            self.eval_t = be.zeros((rows, *self.target_host.shape[1:]), self.target_host.dtype)
        xp = model.xp
        total = xp.zeros((), dtype=np.float64)
        correct = xp.zeros((), dtype=np.int64) if self.labels_host is not None else None
        model._round_params()
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            k = stop - start
            xb, tb = self.eval_x[:k], self.eval_t[:k]
            xb[...] = be.asarray(self.x_host[start:stop])  # stream-ordered after the steps
            tb[...] = be.asarray(self.target_host[start:stop])
            ws = model._workspace(k)
            out = model._forward(xb, ws)
            value = be.loss_forward_backward(out, tb, model.loss, grad=None)
            total += value.astype(np.float64) * k
            if outputs is not None:
                outputs[start:stop] = be.to_numpy(out)
            if correct is not None:
                labels = be.asarray(self.labels_host[start:stop])
                correct += be.accuracy_count(out, labels, model.decision_threshold)
        loss = be.to_float(total) / max(n, 1)
        return loss, (int(be.to_float(correct)) if correct is not None else None)
