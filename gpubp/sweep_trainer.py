"""Training a sweep: each group of members as one MLPStack, groups one after another.

Model i of a group sees what a single run with its config would see: its seed's split,
standardisation, initial weights and epoch order (per-model index arrays, one batched
gather), its learning-rate schedule and optimizer settings (per-model vectors). On the
CPU its parameters are therefore bitwise those of the single run (tests/test_sweep.py).

One step (M models):
    idx (M, B) or shared (B,)  ->  gather_rows  ->  x (M, B, F) or shared (B, F)
    losses (M,) = stack.forward_backward(x, y)               batched GEMMs
    norms (M,) -> per-model clip scales; guard: a model whose loss or gradient is not
    finite is frozen from that step on (its update is skipped), the others go on
    opt.update(scales, skip)                                 one fused update over (M, P), its per-step
                                                             numbers from device tables (gpubp/step.py)
    (on the CPU guard and update run per block of models, in the block's task right after
    its backward pass: gpubp/sweep_step.py)

Run directory:
    config.toml            the sweep's config, [sweep] table included
    metrics.jsonl          evaluation rows, each with "model" (and "group")
    sweep.csv              a row per model: swept values, status, best step, best and final metrics
    summary.json           the sweep's summary (best model and its metric)
    best.npz               a copy of the best model's best checkpoint
    models/mNNN/           per model: config.toml, last.npz, best.npz, summary.json, as a single run writes them
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import sys
import time

import numpy as np

from .checkpoint import atomic_write, atomic_write_text, remove_temporaries, save_checkpoint
from .config import dump_toml, format_size
from .errors import CheckpointError, DeviceRuntimeError, Interrupted, UsageError
from .step import StepState
from .sweep import Sweep, dump_sweep_toml
from .sweep_group import Group
from .sweep_step import SweepStep, capture_note
from .trainer import (
    RUN_FILES,
    catch_sigint,
    config_for_checkpoint,
    data_meta,
    memory_estimate,
    prepare_out_dir,
)

STATE_FILE = "sweep_state.json"
SWEEP_FILES = ("sweep.csv", "models", STATE_FILE)


def read_state(run_dir: str) -> dict:
    """The state file of a sweep run, or UsageError saying what RUN_DIR should be."""
    path = os.path.join(run_dir, STATE_FILE)
    try:
        with open(path) as f:
            state = json.load(f)
        state["done"], state["step"], state["diverged"], state["stopped"]  # noqa: B018 - the keys must be there
        return state
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"--resume {run_dir}: no readable {STATE_FILE}; give the directory of a sweep run "
            "(or a model's checkpoint, RUN/models/mNNN/last.npz)"
        ) from None


def model_dir(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, "models", f"m{index:03d}")


class SweepTrainer:
    """Trains every member of cfg.sweep; see the module docstring."""

    def __init__(self, cfg, out_dir: str, device: str | None = None, quiet: bool = False, overwrite: bool = False,
                 log=None, resume: bool = False):  # fmt: skip
        self.cfg = cfg
        self.sweep: Sweep = cfg.sweep
        self.out_dir = out_dir
        self.device = device or cfg.train.device
        self.quiet = quiet
        self.log = log or (lambda msg: None if quiet else print(msg, file=sys.stderr))
        self.rows: dict[int, dict] = {}
        self.start = time.perf_counter()
        self.state = {"done": [], "step": {}, "diverged": {}, "stopped": []}
        self.graph_note, self.step_fn = None, None  # the last group's: why its step ran uncaptured, its SweepStep
        self.created_dir, self.saved = not resume, False  # a new sweep failing before its first checkpoint removes it
        if resume:  # continue the sweep run in out_dir where its state file says it stopped
            self.state = read_state(out_dir)
            self._trim_log()
            return
        if overwrite and os.path.isdir(out_dir):
            for name in SWEEP_FILES:
                path = os.path.join(out_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.unlink(path)
        prepare_out_dir(out_dir, overwrite)
        atomic_write_text(os.path.join(out_dir, "config.toml"), dump_toml(cfg) + "\n" + dump_sweep_toml(self.sweep))
        self._write_state()

    def _write_state(self) -> None:
        """sweep_state.json: groups finished, each group's step of its last checkpoints, the
        models diverged (with their step) and stopped early; what --resume RUN_DIR reads."""
        atomic_write_text(os.path.join(self.out_dir, STATE_FILE), json.dumps(self.state, indent=1) + "\n")

    def _trim_log(self) -> None:
        """Drop metrics rows past each group's last checkpoint (they will be written again)."""
        path = os.path.join(self.out_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn by a crash
                g = str(row.get("group"))
                if line.endswith("\n") and (
                    int(g) in self.state["done"] or row["step"] <= self.state["step"].get(g, 0)
                ):
                    keep.append(line)
        atomic_write_text(path, "".join(keep))

    def train(self) -> dict:
        try:
            with np.errstate(all="ignore"):  # a diverging model's overflow is reported once, by the guard
                return self._train()
        except Interrupted:
            raise  # its message names the run directory to resume: it stays
        except BaseException:
            self._remove_if_empty()
            raise

    def _remove_if_empty(self) -> None:
        """As a single run (Trainer._remove_if_empty): a new sweep that fails before its
        first checkpoint leaves no run directory; only its own files go."""
        if not self.created_dir or self.saved:
            return
        for name in (*RUN_FILES, *SWEEP_FILES):
            path = os.path.join(self.out_dir, name)
            with contextlib.suppress(OSError):
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        with contextlib.suppress(OSError):
            remove_temporaries(self.out_dir)
            os.rmdir(self.out_dir)

    def _train(self) -> dict:
        groups = self.sweep.groups()
        for number, members in enumerate(groups):
            try:
                group = Group(number, members, self.device, self.log)
            except MemoryError:
                raise _stack_oom(members, None) from None
            except Exception as e:  # CuPy's OutOfMemoryError, without importing CuPy here
                if type(e).__name__ != "OutOfMemoryError":
                    raise
                raise _stack_oom(members, None) from None
            self.log(
                f"group {number + 1}/{len(groups)}: {len(members)} models {group.stack.sizes} on "
                f"{group.backend.describe()}, {group.total_steps} steps"
            )
            for m in members:
                os.makedirs(model_dir(self.out_dir, m.index), exist_ok=True)
                cfg_i = group.member_cfgs[members.index(m)]
                atomic_write_text(os.path.join(model_dir(self.out_dir, m.index), "config.toml"), dump_toml(cfg_i))
            if str(number) in self.state["step"] or number in self.state["done"]:
                self._restore(group)
            try:
                if number not in self.state["done"]:
                    self._train_group(group)
            except group.backend.out_of_memory_errors:
                raise _stack_oom(members, group) from None
            self._finish_group(group)
            self.state["done"].append(number)
            self._write_state()
        return self._finish()

    def _restore(self, g: Group) -> None:
        """Each model of group g from its models/mNNN checkpoints (last.npz: parameters,
        optimizer state, running loss; best.npz: the best parameters), and the group's
        step, diverged and stopped models from the state file."""
        from .checkpoint import best_for_resume, check_params, load_checkpoint

        step = self.state["step"].get(str(g.number), 0)
        params = g.backend.to_numpy(g.stack.flat_params).copy()
        g.best_params = params.copy()
        running = np.zeros(len(g.members))
        steps = set()
        for i, m in enumerate(g.members):
            folder = model_dir(self.out_dir, m.index)
            if str(m.index) in self.state["diverged"]:
                g.diverged[i] = int(self.state["diverged"][str(m.index)])
            g.stopped[i] = m.index in self.state["stopped"]
            if not os.path.exists(os.path.join(folder, "last.npz")):
                if g.diverged[i] is None and step > 0:
                    raise CheckpointError(f"--resume {self.out_dir}: {folder} has no last.npz; the run cannot go on")
                continue
            last = os.path.join(folder, "last.npz")
            meta, arrays = load_checkpoint(last)
            params[i] = g.last_saved[i] = check_params(arrays, last, g.stack.n_params, g.stack.sizes)
            g.opt.load_state_dict({"steps": meta["optimizer_steps"],
                                   **{k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}}, i)  # fmt: skip
            g.best_value[i], g.best_step[i], g.bad_evals[i] = meta["best_value"], meta["best_step"], meta["bad_evals"]
            running[i] = float(arrays.get("train.running_loss", 0.0))
            if g.diverged[i] is None and not g.stopped[i]:
                g.n_running = int(meta["running_steps"])
                steps.add((int(meta["step"]), int(meta["optimizer_steps"])))
            # the best.npz that last.npz records, as a single run's resume (checkpoint.best_for_resume);
            # without one (none yet, or a crash between the two writes) the last weights stand in
            best = best_for_resume(last, meta, g.stack.n_params, g.stack.sizes)
            g.best_params[i] = params[i] if best is None else best[1]["params"]
        if len(steps) > 1:
            raise CheckpointError(
                f"--resume {self.out_dir}: the checkpoints of group {g.number + 1} are at different steps "
                f"({sorted(s for s, _ in steps)}); continue its models one by one (--resume RUN/models/mNNN/last.npz)"
            )
        if steps:  # the models' own record wins over the state file (written after them)
            step, g.opt.steps = steps.pop()
        be = g.backend
        g.stack.flat_params[...] = be.asarray(params, dtype=g.stack.dtype)
        g.running[...] = be.asarray(running)
        g.first_bad[...] = be.asarray(np.array([-1 if d is None else d for d in g.diverged], dtype=np.int64))
        g.start_step = g.final_step = step

    # ---- the loop

    def _train_group(self, g: Group) -> None:
        from tqdm import tqdm

        be, stack, opt = g.backend, g.stack, g.opt
        t = g.cfg.train
        eval_every = t.eval_every or g.steps_per_epoch
        step = g.start_step
        frozen_dev = be.asarray(g.stopped | np.array([d is not None for d in g.diverged]))  # rewritten in place
        bar = tqdm(total=g.total_steps, initial=step, unit="step", dynamic_ncols=True,
                   disable=self.quiet or not sys.stderr.isatty())  # fmt: skip
        scope = contextlib.ExitStack()
        interrupted = scope.enter_context(catch_sigint())
        scope.enter_context(np.errstate(all="ignore"))
        # the per-step numbers (each model's learning rate, Adam's bias corrections, the step
        # index) as device tables, as the single-run trainer's step reads them (gpubp/step.py)
        state = StepState(be, opt, g.lr_rows, lambda s: (s % g.steps_per_epoch) * t.batch_size,
                          g.total_steps)  # fmt: skip
        # the whole step as one function of device state (gpubp/sweep_step.py), captured as a
        # CUDA graph per batch shape on the GPU unless train.cuda_graph is false (graph_note says why not)
        self.graph_note = g.graph_note = capture_note(g.cfg, be, g.data["train"])
        if self.graph_note is not None and t.cuda_graph and be.name == "gpu":
            self.log(f"CUDA graph off: {self.graph_note}")
        capturer = be.graph_capturer() if self.graph_note is None else None
        self.step_fn = step_fn = SweepStep(g, state, frozen_dev, capturer)
        try:
            while step < g.total_steps:
                step_fn.run(step)
                g.n_running += 1
                step += 1
                bar.update(1)
                if step % eval_every == 0 or step == g.total_steps:
                    self._log_eval(g, step)
                    frozen = g.stopped | np.array([d is not None for d in g.diverged])
                    frozen_dev[...] = be.asarray(frozen)  # in place: a captured step reads this buffer
                    if frozen.all():
                        break
                if interrupted():
                    self._note_divergence(g, be.to_numpy(g.first_bad))  # a diverged model keeps its old checkpoint
                    params, running = be.to_numpy(stack.flat_params), be.to_numpy(g.running)
                    for i in range(len(g.members)):
                        if g.diverged[i] is None and not g.stopped[i]:
                            self._save(g, i, "last.npz", step, params, running=running)
                    self._record(g, step)
                    raise Interrupted(
                        f"interrupted at step {step} of group {g.number + 1}; each model's last.npz is saved "
                        f"under {os.path.join(self.out_dir, 'models')}; continue the sweep with --resume {self.out_dir}",
                        step,
                        os.path.join(self.out_dir, "models"),
                    )
        finally:
            scope.close()
            bar.close()
        g.final_step = step

    def _log_eval(self, g: Group, step: int) -> None:
        be = g.backend
        g.opt.lr[:] = g.lr_rows(step - 1, 1)[0]  # the rates of the step just taken
        epoch = (step - 1) // g.steps_per_epoch
        first_bad = be.to_numpy(g.first_bad)
        self._note_divergence(g, first_bad)
        running = be.to_numpy(g.running) / max(g.n_running, 1)
        g.running[...] = 0.0
        g.n_running = 0
        val = g.evaluate("val")
        params = be.to_numpy(g.stack.flat_params)
        if g.best_params is None:
            g.best_params = params.copy()
        rows = []
        for i, m in enumerate(g.members):
            if g.stopped[i] or g.diverged[i] is not None:
                continue
            record = {"model": m.index, "group": g.number, "step": step, "epoch": epoch + 1, "lr": float(g.opt.lr[i]),
                      "train_loss": float(running[i])}  # fmt: skip
            record.update(val[i])
            record["elapsed_s"] = round(time.perf_counter() - self.start, 4)
            rows.append(json.dumps(record) + "\n")
            monitor = _monitor(g.cfg, record)  # None without a validation split: no best.npz, no early stopping
            best = g.best_value[i]
            improved = monitor is not None and (
                best is None or (monitor[1] > best if monitor[2] else monitor[1] < best)
            )
            if improved:
                value = monitor[1]
                g.best_value[i], g.best_step[i], g.bad_evals[i] = value, step, 0
                g.best_params[i] = params[i]
                self._save(g, i, "best.npz", step, params)
            elif monitor is not None:
                g.bad_evals[i] += 1
            self._save(g, i, "last.npz", step, params)
            patience = g.cfg.train.early_stopping_patience
            if patience > 0 and g.bad_evals[i] >= patience:
                g.stopped[i] = True
                self.log(f"model {m.index}: early stopping at step {step}")
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.writelines(rows)
        self._record(g, step)

    def _record(self, g: Group, step: int) -> None:
        """The group's checkpoints are at `step`: say so in the state file."""
        self.state["step"][str(g.number)] = step
        self.state["diverged"].update({str(m.index): d for m, d in zip(g.members, g.diverged) if d is not None})
        self.state["stopped"] = sorted(
            set(self.state["stopped"]) | {m.index for m, s in zip(g.members, g.stopped) if s}
        )
        self._write_state()

    def _note_divergence(self, g: Group, first_bad: np.ndarray) -> None:
        """Mark and report the models whose first non-finite step is new."""
        for i, m in enumerate(g.members):
            if first_bad[i] >= 0 and g.diverged[i] is None and not g.stopped[i]:
                g.diverged[i] = int(first_bad[i])
                e, b = divmod(g.diverged[i], g.steps_per_epoch)
                self.log(
                    f"model {m.index} ({m.label()}) diverged: non-finite loss or gradient at step {g.diverged[i] + 1} "
                    f"(epoch {e + 1}, batch {b + 1}); frozen, its last good checkpoint kept; the other models go on"
                )

    def _save(self, g: Group, i: int, name: str, step: int, params: np.ndarray, running=None) -> None:
        """Model i's checkpoint, as a single run with its config would write it; `running`:
        the training losses summed since the last evaluation (M,), when saved between two."""
        m = g.members[i]
        run = g.runs[g.seed_index[i]]
        epoch, batch = divmod(step, g.steps_per_epoch)
        arrays = {"params": np.ascontiguousarray(params[i])}
        for key, value in g.opt.state_dict(i).items():
            if key != "steps":
                arrays[f"opt.{key}"] = value
        arrays["std.mean"], arrays["std.std"] = run.standardizer.mean, run.standardizer.std
        if run.standardizer.fill is not None:  # data.missing = "mean": the training means
            arrays["missing.mean"] = run.standardizer.fill
        if run.target_scaler is not None:  # regression: targets trained as (y - mean) / std
            arrays.update(run.target_scaler.arrays())
        arrays["train.running_loss"] = np.asarray(0.0 if running is None else float(running[i]))
        meta = {
            "step": step, "epoch": epoch,
            "rng": {"scheme": "per-epoch permutation of (seed, epoch)", "seed": m.cfg.train.seed, "epoch": epoch,
                    "batch": batch},
            "optimizer_steps": g.opt.steps, "running_steps": 0 if running is None else g.n_running,
            "best_value": g.best_value[i],
            "best_step": g.best_step[i], "bad_evals": g.bad_evals[i], "model": g.model_cfg[i],
            "config": config_for_checkpoint(g.member_cfgs[i]), "n_features": run.n_features, "n_classes": run.n_classes,
            **data_meta(g.member_cfgs[i], run), "sweep": {"model": m.index, "values": m.values},
        }  # fmt: skip
        save_checkpoint(os.path.join(model_dir(self.out_dir, m.index), name), meta, arrays)
        self.saved = True
        if name == "last.npz":
            g.last_saved[i] = arrays["params"].copy()

    # ---- results

    def _finish_group(self, g: Group) -> None:
        """Rows of sweep.csv and each model's summary.json: final metrics (a diverged
        model's from its last good checkpoint, none without one) and best ones."""
        be = g.backend
        current = be.to_numpy(g.stack.flat_params).copy()
        final_params = current.copy()
        for i, d in enumerate(g.diverged):
            if d is not None and g.last_saved[i] is not None:
                final_params[i] = g.last_saved[i]
        g.stack.flat_params[...] = be.asarray(final_params, dtype=g.stack.dtype)
        final = {n: g.evaluate(n) for n in ("train", "val", "test")}
        g.stack.flat_params[...] = be.asarray(g.best_params, dtype=g.stack.dtype)
        best = {n: g.evaluate(n) for n in ("train", "val", "test")}
        g.stack.flat_params[...] = be.asarray(current, dtype=g.stack.dtype)
        for i in range(len(g.members)):
            if g.diverged[i] is not None and g.last_saved[i] is None:  # no good checkpoint: nothing to report
                for split in final:
                    final[split][i] = {k: None for k in final[split][i]}
            if g.best_step[i] is None:
                for split in best:
                    best[split][i] = {k: None for k in best[split][i]}
        metric = _monitor_name(g.cfg, g.data["val"] is not None)
        for i, m in enumerate(g.members):
            if g.diverged[i] is not None:
                status = f"diverged at step {g.diverged[i] + 1}"
            elif g.stopped[i]:
                status = "stopped early"
            else:
                status = "ok"
            row = {"model": m.index, "group": g.number, **{k: _csv_value(v) for k, v in m.values.items()},
                   "status": status, "best_metric": metric, "best_value": g.best_value[i], "best_step": g.best_step[i]}  # fmt: skip
            for split in ("train", "val", "test"):
                row.update({f"best_{k}": v for k, v in best[split][i].items()})
            for split in ("train", "val", "test"):
                row.update({f"final_{k}": v for k, v in final[split][i].items()})
            self.rows[m.index] = row
            summary = {"steps": g.final_step, "best_step": g.best_step[i], "best_metric": metric,
                       "best_value": g.best_value[i], "status": status, "device": g.backend.describe()}  # fmt: skip
            # as a single run: with train.restore_best it ends with (and describes) its best weights
            ends_best = g.cfg.train.restore_best and g.best_step[i] is not None
            for split in ("train", "val", "test"):
                summary.update((best if ends_best else final)[split][i])
            atomic_write_text(os.path.join(model_dir(self.out_dir, m.index), "summary.json"),
                              json.dumps(summary, indent=2) + "\n")  # fmt: skip

    def _finish(self) -> dict:
        rows = [self.rows[i] for i in sorted(self.rows)]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(os.path.join(self.out_dir, "sweep.csv"), buf.getvalue())
        candidates = [r for r in rows if r["best_value"] is not None and not r["status"].startswith("diverged")]
        best, src = None, None
        if candidates:
            higher = candidates[0]["best_metric"].endswith("accuracy")
            best = (max if higher else min)(candidates, key=lambda r: r["best_value"])
            src = os.path.join(model_dir(self.out_dir, best["model"]), "best.npz")
        else:  # no validation split: the lowest final training loss, its last checkpoint
            finite = [
                r
                for r in rows
                if isinstance(r.get("final_train_loss"), float) and r["final_train_loss"] == r["final_train_loss"]
            ]
            if finite:
                best = min(finite, key=lambda r: r["final_train_loss"])
                best = dict(best, best_metric="final_train_loss", best_value=best["final_train_loss"])
                src = os.path.join(model_dir(self.out_dir, best["model"]), "last.npz")
        if src is not None and os.path.exists(src):
            with open(src, "rb") as f:
                data = f.read()
            atomic_write(os.path.join(self.out_dir, "best.npz"), lambda out: out.write(data))
        summary = {
            "models": len(rows), "groups": len({r["group"] for r in rows}),
            "diverged": [r["model"] for r in rows if r["status"].startswith("diverged")],
            "best_model": None if best is None else best["model"],
            "best_metric": None if best is None else best["best_metric"],
            "best_value": None if best is None else best["best_value"],
            "seconds": round(time.perf_counter() - self.start, 3),
        }  # fmt: skip
        atomic_write_text(os.path.join(self.out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
        summary["table"] = format_results(rows, list(self.sweep.keys))
        return summary


def _stack_oom(members: list, g) -> DeviceRuntimeError:
    """Out of memory with a stack of M models: what they need together, and what to change."""
    cfg, count = members[0].cfg, len(members)
    fix = "train fewer models at once (split a swept list over two runs) or use a smaller train.batch_size"
    if g is None:
        return DeviceRuntimeError(
            f"out of memory while setting up a stack of {count} models (model.hidden = {cfg.model.hidden}) "
            f"and its data; {fix}"
        )
    rows = sum(p.n for p in g.data.values() if p is not None)
    est = memory_estimate(cfg, g.stack.sizes, min(cfg.train.batch_size, g.n_train), rows, g.backend)
    total = count * (est["params"] + est["batch"] + est["eval"]) + len(g.unique_seeds) * est["data"]
    return DeviceRuntimeError(
        f"out of memory on {g.backend.describe()} training {count} models {g.stack.sizes} as one stack with "
        f"train.batch_size = {cfg.train.batch_size}: they need about {format_size(total)} together "
        f"({format_size(count * est['params'])} for parameters, gradients and optimizer state, "
        f"{format_size(count * est['batch'])} for one batch's activations); {fix}"
    )


def _csv_value(v):
    return json.dumps(v) if isinstance(v, list) else v


def _monitor_name(cfg, has_val: bool) -> str | None:
    return cfg.train.early_stopping_metric if has_val else None


def _monitor(cfg, record: dict):
    """(name, value, higher is better) of the metric that picks the best checkpoint, as
    Trainer._monitor; None without a validation split."""
    metric = cfg.train.early_stopping_metric
    if metric in record:
        return metric, record[metric], metric.endswith("accuracy")
    return None


def format_results(rows: list[dict], keys: list[str]) -> str:
    """The sweep's results as an aligned text table (what `gpubp train` prints)."""
    metrics = [c for c in ("best_step", "final_train_loss", "final_val_loss", "final_val_accuracy",
                           "final_test_loss", "final_test_accuracy") if any(c in r for r in rows)]  # fmt: skip
    header = ["model", *keys, *metrics, "status"]

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [header] + [[cell(r.get(c)) for c in header] for r in rows]
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table) + "\n"
