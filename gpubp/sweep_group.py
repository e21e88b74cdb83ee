"""One group of a sweep as it trains: its members' data on the device (per seed), the
MLPStack and its optimizer, and the per-model records the loop keeps (best value and
step, divergence, early stopping). gpubp.sweep_trainer runs the loop and writes files.

Data: the splits of each distinct seed, concatenated (Concat): model i's rows of split
s start at seed_index[i] * n_s. One seed: the split itself, a batch shared by every model.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError
from .schedules import lr_schedule
from .stack import MLPStack, make_stack_optimizer
from .trainer import prepare, resolve_auto


class Group:
    """One stack: its members, data on the device, model, optimizer and per-model records."""

    def __init__(self, number: int, members: list, device: str, log):
        self.number = number
        self.members = members
        cfg = members[0].cfg  # every key but the batched ones is the same in a group
        self.cfg = cfg
        seeds = [m.cfg.train.seed for m in members]
        self.unique_seeds = list(dict.fromkeys(seeds))
        self.seed_index = np.array([self.unique_seeds.index(s) for s in seeds])
        first = {s: next(m for m in members if m.cfg.train.seed == s) for s in self.unique_seeds}
        self.runs = [prepare(first[s].cfg, device, log if k == 0 else None) for k, s in enumerate(self.unique_seeds)]
        run = self.runs[0]
        # each member's config with "auto" resolved as a single run resolves it (what its checkpoints store)
        self.member_cfgs = [resolve_auto(m.cfg, run.data.train) for m in members]
        self.cfg = cfg = self.member_cfgs[0]
        self.backend = be = run.backend
        self.n_train = run.splits["train"].n
        for name in ("train", "val", "test"):  # the stacked buffers need equal split sizes
            sizes_of = [0 if r.splits[name] is None else r.splits[name].n for r in self.runs]
            if len(set(sizes_of)) > 1:
                raise ConfigError(
                    f"{cfg.source}: the {name} split has {sizes_of[0]} rows with train.seed {self.unique_seeds[0]} "
                    f"but {next(v for v in sizes_of if v != sizes_of[0])} with another; sweep seeds whose splits "
                    "are of equal sizes (or data.stratify = true)"
                )
        m, sizes = cfg.model, run.model.sizes
        self.stack = MLPStack(
            sizes, len(members), m.activation, m.output_activation, cfg.loss.name, dtype=m.dtype, seed=seeds,
            init=[x.cfg.model.init for x in members], leaky_relu_slope=m.leaky_relu_slope,
            label_smoothing=cfg.loss.label_smoothing, huber_delta=cfg.loss.huber_delta, residual=m.residual, backend=be,
        )  # fmt: skip
        o = [x.cfg.optimizer for x in members]
        self.opt = make_stack_optimizer(
            self.stack, cfg.optimizer.name, [x.lr for x in o], [x.momentum for x in o], [x.dampening for x in o],
            cfg.optimizer.nesterov, [tuple(x.betas) for x in o], [x.eps for x in o], [x.weight_decay for x in o],
        )  # fmt: skip
        self.max_norm = be.asarray(np.array([x.clip_grad_norm for x in o]), dtype=self.stack.dtype)  # 0: no clipping
        self.skip = be.zeros(len(members), np.bool_)
        self.norm = be.zeros(len(members), self.stack.dtype)
        self.scale = be.zeros(len(members), self.stack.dtype)
        # the splits of every seed one after another: model i's rows start at seed_index[i] * n
        self.data = {}
        for name in ("train", "val", "test"):
            parts = [r.splits[name] for r in self.runs]
            if parts[0] is None:
                self.data[name] = None
            elif len(parts) == 1:
                self.data[name] = parts[0]
            else:
                self.data[name] = Concat(be, parts)
        t = cfg.train
        self.steps_per_epoch = math.ceil(self.n_train / t.batch_size)
        self.total_steps = t.steps if t.steps > 0 else t.epochs * self.steps_per_epoch
        # each member's schedule (steps, 0-based -> learning rates), one per distinct set of
        # arguments: a sweep's seeds share their rate's, and lr_rows calls each once a chunk
        distinct: dict = {}
        self.schedule_of = []  # member -> its index in self.schedules
        for x in members:
            lr = lr_schedule(x.cfg.optimizer, x.cfg.schedule, self.total_steps)
            key = tuple(lr.keywords.items())
            self.schedule_of.append(distinct.setdefault(key, (len(distinct), lr))[0])
        self.schedules = [lr for _, lr in distinct.values()]
        count = len(members)
        self.running = be.zeros(count, np.float64)
        self.n_running = 0
        self.first_bad = be.zeros(count, np.int64) - 1
        self.best_value = [None] * count
        self.best_step = [None] * count
        self.bad_evals = [0] * count
        self.stopped = np.zeros(count, bool)  # early stopping
        self.diverged = [None] * count  # 0-based step of the first non-finite step
        self.last_saved = [None] * count  # host parameters of each model's last.npz
        self.best_params = None
        self.start_step = 0
        self.final_step = 0
        self.model_cfg = [self.stack.member(i).config_dict() if i == 0 else None for i in range(count)]
        for i in range(1, count):
            self.model_cfg[i] = dict(self.model_cfg[0], seed=self.stack.seeds[i], init=self.stack.inits[i])

    def lr_rows(self, step: int, k: int) -> np.ndarray:
        """(k, M) float64: each model's learning rate at steps step .. step + k - 1 (0-based),
        from its own schedule."""
        steps = np.arange(step, step + k)
        return np.stack([lr(steps) for lr in self.schedules], axis=1)[:, self.schedule_of]

    # ---- evaluation

    def evaluate(self, name: str) -> list[dict]:
        """Per model {name_loss, name_accuracy} over its own split `name`."""
        part = self.data.get(name)
        if part is None:
            return [{} for _ in self.members]
        bs = self.cfg.train.eval_batch_size
        if len(self.unique_seeds) == 1:
            loss, correct = self.stack.evaluate(part.x, part.target, part.labels, bs)
        else:
            loss, correct = part.evaluate(self.stack, self.seed_index, bs)
        out = []
        for i in range(len(self.members)):
            row = {f"{name}_loss": float(loss[i])}
            if correct is not None:
                row[f"{name}_accuracy"] = int(correct[i]) / part.n
            out.append(row)
        return out


class Concat:
    """The same split of several seeds, concatenated: rows of seed k at k*n .. (k+1)*n."""

    def __init__(self, be, parts):
        xp = be.xp
        self.backend = be
        self.n = parts[0].n
        self.x = xp.concatenate([p.x for p in parts])
        self.target = xp.concatenate([p.target for p in parts])
        self.labels = xp.concatenate([p.labels for p in parts]) if parts[0].labels is not None else None

    def evaluate(self, stack: MLPStack, seed_index, batch_size: int):
        """As MLPStack.evaluate, model i reading its seed's rows (one gather per chunk)."""
        be = self.backend
        total = np.zeros(stack.count)
        correct = np.zeros(stack.count, dtype=np.int64) if self.labels is not None else None
        for start in range(0, self.n, batch_size):
            stop = min(self.n, start + batch_size)
            rows = (seed_index * self.n)[:, None] + np.arange(start, stop)[None, :]  # (M, rows)
            idx = be.asarray(rows.reshape(-1))
            x = be.gather_rows(self.x, idx, be.empty((idx.shape[0], self.x.shape[1]), self.x.dtype))
            x = x.reshape(stack.count, stop - start, -1)
            y = be.gather_rows(self.target, idx, be.empty((idx.shape[0], *self.target.shape[1:]), self.target.dtype))
            y = y.reshape(stack.count, stop - start, *self.target.shape[1:])
            out = stack._forward(x, stack._workspace(stop - start))
            value = be.to_numpy(be.loss_forward_backward_batched(out, y, stack.loss, grad=None))
            total += value.astype(np.float64) * (stop - start)
            if correct is not None:
                labels = be.gather_rows(self.labels, idx, be.empty(idx.shape[0], self.labels.dtype))
                labels = labels.reshape(stack.count, stop - start)
                correct += be.to_numpy(be.accuracy_count_batched(out, labels, stack.decision_threshold))
        return total / max(self.n, 1), correct
