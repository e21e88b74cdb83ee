"""The command line: `gpubp train | eval | predict | config show | plot | ...`.

Every command catches the project's errors once and prints them as one line,
`gpubp: error: ...`, with exit code 2 (usage, config, input) or 1 (run time); click's
own usage errors read the same. Ctrl-C exits 130; an unexpected exception prints one
line `gpubp: internal error: ...` and exits 1 (GPUBP_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import sys

import click
import numpy as np

from . import __version__
from .errors import GpubpError, Interrupted, UsageError


def _fail(message: str, code: int) -> None:
    click.echo(f"gpubp: error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Turn project errors into one line and an exit code; Ctrl-C into exit 130; an
    error of the file system into one line and exit 1; any other exception into one
    line `gpubp: internal error: ...` and exit 1, with the traceback only when the
    environment sets GPUBP_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            click.echo(f"gpubp: {e}", err=True)
            sys.exit(e.exit_code)
        except GpubpError as e:
            if getattr(e, "silent", False):  # another rank of a data-parallel run reports it
                sys.exit(e.exit_code)
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            click.echo("gpubp: interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            if os.environ.get("GPUBP_DEBUG", "0") not in ("", "0"):
                raise
            text = " ".join(str(e).split())
            if isinstance(e, OSError) and e.strerror:
                _fail(f"{e.filename or ''}: {e.strerror}".lstrip(": "), 1)
            click.echo(
                f"gpubp: internal error: {type(e).__name__}: {text} (set GPUBP_DEBUG=1 for the traceback)", err=True
            )
            sys.exit(1)

    return wrapper


@contextlib.contextmanager
def _one_line_usage_errors():
    try:
        yield
    except click.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `gpubp`: click prints the help
            raise
        see = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _fail(" ".join(e.format_message().split()) + see, e.exit_code)


class OneLineErrors(click.Group):
    """A click group whose own usage errors (an unknown option, a bad --device) print
    as one line like ours, `gpubp: error: ...`, exit code 2."""

    group_class = type  # subgroups (config) too

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpubp")
def main():
    """gpubp: train multilayer perceptrons with explicit backpropagation, on the GPU
    (CuPy, our CUDA kernels, cuBLAS) or the CPU (NumPy)."""


# --------------------------------------------------------------------------- train

DEVICE = click.Choice(["auto", "cpu", "gpu"])


def default_out_dir(config_path: str | None) -> str:
    """runs/<config name>, or runs/<name>-2, -3, ... when that exists: never an old run."""
    stem = os.path.splitext(os.path.basename(config_path))[0] if config_path else "run"
    base = os.path.join("runs", stem)
    candidate, n = base, 1
    while os.path.exists(candidate) and (not os.path.isdir(candidate) or os.listdir(candidate)):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


@main.command()
@click.option("--config", "config_path", type=str, help="TOML or JSON config file (see configs/).")
@click.option("--device", type=DEVICE, default=None, help="Where to train (default: train.device, 'auto').")
@click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config value; repeatable."
)
@click.option("--out", "out_dir", type=str, default=None, help="Run directory (default: runs/<config name>[-N]).")
@click.option("--resume", type=str, default=None, help="Continue from a checkpoint (last.npz of a run).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Shortcut for --set train.seed=N.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar or messages; the summary is still printed.")
@handle_errors
def train(config_path, device, overrides, out_dir, resume, seed, overwrite, quiet):
    """Train a model from a config file. Under an MPI launcher (mpirun -n N ...) the N
    ranks train one model, data parallel (see gpubp/distributed.py)."""
    from . import distributed

    distributed.supervise()  # under a launcher: a parent that names this rank if it is killed
    dist = distributed.from_environment()
    try:
        _train(dist, config_path, device, overrides, out_dir, resume, seed, overwrite, quiet)
    except GpubpError as e:
        raise dist.report(e) from None
    finally:
        dist.close()


def _train(dist, config_path, device, overrides, out_dir, resume, seed, overwrite, quiet):
    from .checkpoint import load_checkpoint
    from .config import load_config, validate
    from .trainer import Trainer, config_for_checkpoint, config_from_checkpoint

    overrides = list(overrides) + ([f"train.seed={seed}"] if seed is not None else [])
    if dist.size == 1 and resume is not None and os.path.isdir(resume):  # a sweep run: its own config
        return _train_sweep(load_config(config_path or os.path.join(resume, "config.toml"), overrides),
                            out_dir or resume, device, quiet, overwrite, resume)  # fmt: skip

    def load_config_and_out_dir():
        if config_path is None and resume is None:
            raise UsageError("give --config FILE (e.g. configs/digits.toml), or --resume CHECKPOINT")
        if resume is not None and os.path.isdir(resume):
            raise UsageError(f"--resume {resume}: a sweep trains in one process; start it without the MPI launcher")
        if config_path is not None:
            cfg = load_config(config_path, overrides)
        else:
            meta, _ = load_checkpoint(resume)
            stored = config_from_checkpoint(meta, resume)
            raw = stored.to_dict()
            from .config import parse_override

            for text in overrides:
                section, key, value = parse_override(text)
                raw.setdefault(section, {})[key] = value
            cfg = validate(raw, f"{resume} (stored config)", stored.base_dir)
        if cfg.sweep is not None and dist.size > 1:
            raise UsageError(f"{cfg.source}: a [sweep] trains its models in one process; start it without the "
                             "MPI launcher")  # fmt: skip
        out = out_dir
        if out is None:
            out = os.path.dirname(os.path.abspath(resume)) if resume else default_out_dir(config_path)
        dist.use_device(device or cfg.train.device)
        return cfg, out

    # with N ranks: an error on any rank stops all and is printed once; so do configs that differ
    cfg, out_dir = dist.agree(load_config_and_out_dir)
    if cfg.sweep is not None:  # one process (refused above under a launcher)
        return _train_sweep(cfg, out_dir, device, quiet, overwrite, resume)
    dist.check_same({"config": config_for_checkpoint(cfg), "--out": os.path.abspath(out_dir), "--device": device,
                     "--resume": resume and os.path.abspath(resume), "--overwrite": overwrite,
                     "gpubp version": __version__}, "config")  # fmt: skip
    quiet_here = quiet or not dist.is_root
    trainer = dist.agree(lambda: Trainer(cfg, out_dir, device=device, quiet=quiet_here, overwrite=overwrite,
                                         resume=resume, dist=dist),
                         undo=lambda t: t._remove_if_empty())  # fmt: skip  # another rank failed: no run directory
    try:
        dist.start(trainer)  # with N ranks: statistics from every rank's rows, the check that all agree
    except BaseException:
        trainer._remove_if_empty()  # a run that fails before its first checkpoint leaves no run directory
        raise
    if not quiet_here:
        click.echo(f"training on {trainer.run.backend.describe()}: model {trainer.model.sizes}, "
                   f"{trainer.total_steps} steps, run directory {out_dir}", err=True)  # fmt: skip
    try:
        summary = trainer.train()
    except Interrupted as e:
        again = [*_program(), "--resume", e.checkpoint] + (["--device", device] if device else [])
        again += ["--quiet"] if quiet else []
        launcher = " (under your MPI launcher, on any number of ranks)" if dist.size > 1 else ""
        raise Interrupted(
            f"interrupted at step {e.step}; resume with: {shlex.join(again)}{launcher}", e.step, e.checkpoint
        ) from None
    from .metrics import to_json

    if dist.is_root:
        click.echo(to_json(summary))


def _train_sweep(cfg, out_dir, device, quiet, overwrite, resume) -> None:
    """A config with a [sweep] table: every member trained, groups as stacks (gpubp.sweep_trainer)."""
    from .sweep_trainer import SweepTrainer

    if cfg.sweep is None:
        raise UsageError(f"--resume {resume}: {os.path.join(resume, 'config.toml')} has no [sweep] table; "
                         "give the checkpoint of a single run (RUN/last.npz)")  # fmt: skip
    if resume is not None and not os.path.isdir(resume):
        raise UsageError(
            f"--resume {resume}: a sweep continues from its run directory (--resume RUN_DIR); "
            "a model continues alone from RUN/models/mNNN/last.npz without the sweep config"
        )
    if resume is not None:
        _check_sweep_resume(cfg, resume, out_dir)
    trainer = SweepTrainer(cfg, out_dir, device=device, quiet=quiet, overwrite=overwrite, resume=resume is not None)
    if not quiet:
        n, groups = len(cfg.sweep.members), len(cfg.sweep.groups())
        click.echo(
            f"sweep of {n} models in {groups} group{'s' if groups != 1 else ''}, run directory {out_dir}", err=True
        )
    summary = trainer.train()
    click.echo(summary.pop("table"), nl=False)
    click.echo(json.dumps(summary, indent=2))


def _check_sweep_resume(cfg, run_dir: str, out_dir: str) -> None:
    """A sweep resumes in its own directory, with the members it was started with (the
    [train] keys a single resume may change aside)."""
    from .config import load_config
    from .errors import ConfigError
    from .trainer import _check_resume_compatible

    if os.path.abspath(out_dir) != os.path.abspath(run_dir):
        raise UsageError(f"--resume {run_dir}: a sweep continues in its own directory; leave out --out")
    stored = load_config(os.path.join(run_dir, "config.toml"))
    if stored.sweep is None or len(stored.sweep.members) != len(cfg.sweep.members):
        raise ConfigError(f"--resume {run_dir}: the config's sweep is not the one this run was started with")
    for a, b in zip(stored.sweep.members, cfg.sweep.members):
        _check_resume_compatible(a.cfg, b.cfg, run_dir)


def _program() -> list[str]:
    """The words that started this training command: python train.py, python -m gpubp
    train, or gpubp train."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "train.py":
        return ["python", argv0]
    if os.path.basename(argv0) in ("__main__.py", "cli.py"):
        return ["python", "-m", "gpubp", "train"]
    return ["gpubp", "train"]


# --------------------------------------------------------------------------- eval / predict


_DEVICE_NOTES = set()  # the device notes this command printed (each once, however many checkpoints)


def _device_for_inference(device: str, meta: dict, cfg):
    """(backend, note) for eval and predict, which say nothing about the device unless it
    is news: --device auto found no GPU for a model trained on one (checkpoint meta
    "device") or configured for one (train.device = "gpu"). Then one line, once per
    command. (A GPU asked for with --device gpu and not found is an error; train notes
    the fallback of auto once per run.)"""
    from .backend import resolve_device

    backend, note = resolve_device(device)
    trained = str(meta.get("device") or "")
    expected = trained.startswith("gpu") or (not trained and cfg.train.device == "gpu")  # older checkpoints: config
    if note and expected and note not in _DEVICE_NOTES:
        _DEVICE_NOTES.add(note)
        click.echo(f"{note}; the model was trained on {trained or 'a GPU (train.device = gpu)'}", err=True)
    return backend, note


def _load_for_inference(checkpoint: str, device: str, with_data: bool):
    """(meta, config, model, standardizer, run or None, arrays) rebuilt from a checkpoint."""
    from .checkpoint import load_checkpoint
    from .data import Standardizer
    from .targets import TargetScaler
    from .trainer import build_model, config_from_checkpoint, prepare, restore_params

    meta, arrays = load_checkpoint(checkpoint)
    cfg = config_from_checkpoint(meta, checkpoint)
    std = Standardizer(arrays.get("std.mean"), arrays.get("std.std"), arrays.get("missing.mean"))
    backend, note = _device_for_inference(device, meta, cfg)
    if with_data:  # the data's notes; the device's were the rule's above
        run = prepare(cfg, device, log=lambda m: m == note or click.echo(m, err=True), standardizer=std,
                      checkpoint=(meta, checkpoint), target_scaler=TargetScaler.from_arrays(arrays))  # fmt: skip
        model = run.model
    else:
        sizes = meta["model"]["sizes"]
        model = build_model(cfg, sizes[0], sizes[-1], backend)
        run = None
    restore_params(model, arrays, checkpoint)
    return meta, cfg, model, std, run, arrays


@main.command("eval")
@click.option("--checkpoint", required=True, type=str, help="A checkpoint (.npz) written by gpubp train.")
@click.option("--split", type=click.Choice(["all", "train", "val", "test"]), default=None,
              help="Which split of the run's data (default: all).")  # fmt: skip
@click.option("--data", "data_path", type=str, default=None,
              help="Evaluate on this labelled file instead (.csv with the label column, or .npz with x, y).")  # fmt: skip
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option(
    "--ensemble", is_flag=True, help="--checkpoint is a sweep run: its models' averaged prediction and each model's."
)
@handle_errors
def eval_cmd(checkpoint, split, data_path, device, ensemble):
    """Metrics of a checkpoint on its dataset's splits, or on a new labelled file (--data;
    columns matched by name as in predict) (JSON; per-class tables on stderr): loss,
    accuracy, per-class precision/recall/F1 and the confusion matrix for classes; loss,
    R2, RMSE and MAE (in the targets' units) for regression. With --ensemble, a sweep
    run's averaged prediction beside each of its models."""
    if ensemble:
        if data_path is not None:
            raise UsageError("--data applies to one checkpoint, not to --ensemble")
        from . import ensemble as E

        split = split or "all"
        members = E.load_members(checkpoint, device, _load_for_inference)
        names = ("train", "val", "test") if split == "all" else (split,)
        results = {"run": checkpoint, "models": len(members)}
        results["splits"] = [E.evaluate(members, s) for s in names if split != "all" or _has_split(members, s)]
        click.echo(json.dumps(results, indent=2))
        return
    from .metrics import format_classification, to_json
    from .trainer import evaluate_split

    if data_path is not None:
        if split is not None:
            raise UsageError("give --split (the run's own data) or --data FILE, not both")
        if not os.path.exists(data_path):
            raise UsageError(f"--data {data_path!r} not found; check the path")
        from .data import DeviceSplit
        from .inference import read_labelled
        from .targets import TargetScaler
        from .trainer import loss_targets

        meta, cfg, model, std, _, arrays = _load_for_inference(checkpoint, device, with_data=False)
        ds = read_labelled(data_path, meta, cfg, checkpoint, std.fill, lambda m: click.echo(m, err=True))
        target = loss_targets(ds, cfg.loss.name, model.sizes[-1])
        scaler = None if ds.is_classification else TargetScaler.from_arrays(arrays, model.sizes[-1])
        part = DeviceSplit(model, ds, std, target if scaler is None else scaler.transform(target))
        results = {"checkpoint": checkpoint, "step": meta["step"], "data": data_path, "data_rows": len(ds)}
        results.update(evaluate_split(model, part, "data", cfg.train.eval_batch_size, ds, scaler, report=True))
        if "data_report" in results:
            click.echo(format_classification(results["data_report"], "data"), err=True)
        click.echo(to_json(results))
        return
    split = split or "all"
    meta, cfg, model, _, run, _ = _load_for_inference(checkpoint, device, with_data=True)
    results = {"checkpoint": checkpoint, "step": meta["step"]}
    for name in ("train", "val", "test") if split == "all" else (split,):
        if run.splits[name] is None:
            if split != "all":
                raise UsageError(f"--split {name}: this run has no {name} split (its data.{name}_fraction is 0)")
            continue
        results.update(evaluate_split(model, run.splits[name], name, cfg.train.eval_batch_size,
                                      getattr(run.data, name), run.target_scaler, report=True))  # fmt: skip
        if f"{name}_report" in results:
            click.echo(format_classification(results[f"{name}_report"], name), err=True)
    click.echo(to_json(results))


def _has_split(members, name: str) -> bool:
    d = members[0][2].data
    return name == "train" or (name == "val" and d.val_fraction > 0) or (name == "test" and d.test_fraction > 0)


@main.command()
@click.option("--checkpoint", required=True, type=str, help="A checkpoint (.npz) written by gpubp train.")
@click.option("--input", "input_path", required=True, type=str,
              help="Features: .csv (columns matched by name), .npy or .npz (array x; columns in training order).")  # fmt: skip
@click.option("--output", "output_path", required=True, type=str,
              help="Where to write: .csv (predicted class, then p_<class> per class; or the predicted values) or .npy.")  # fmt: skip
@click.option(
    "--no-header", is_flag=True, help="The CSV has no header row: every row is data, columns in training order."
)
@click.option("--logits", is_flag=True, help="Classes: write the raw network outputs instead of probabilities.")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.option("--ensemble", is_flag=True, help="--checkpoint is a sweep run: average its models' probabilities.")
@handle_errors
def predict(checkpoint, input_path, output_path, no_header, logits, device, overwrite, ensemble):
    """Run a trained model on new data."""
    if not os.path.exists(input_path):
        raise UsageError(f"--input {input_path!r} not found; check the path")
    if not (output_path.endswith(".npy") or output_path.endswith(".csv")):
        raise UsageError(f"--output {output_path!r}: use a .npy or .csv file name")
    if os.path.exists(output_path) and not overwrite:
        raise UsageError(f"--output {output_path!r} exists; pass --overwrite to replace it")
    folder = os.path.dirname(output_path) or "."
    if not os.path.isdir(folder):
        raise UsageError(f"--output {output_path!r}: the folder {folder!r} does not exist; create it or choose another")
    from . import inference as I
    from .checkpoint import atomic_write

    log = lambda m: click.echo(m, err=True)  # noqa: E731
    if ensemble:  # the mean of the models' probabilities (classification) or outputs
        if logits:
            raise UsageError("--logits does not apply to --ensemble, which averages probabilities")
        from . import ensemble as E

        members = E.load_members(checkpoint, device, _load_for_inference)
        path0, meta, cfg, model, std = members[0]
        x = I.read_features(input_path, meta, cfg, path0, std.fill, log, no_header=no_header)
        out = E.predict(members, x)  # (N, n_out): mean probabilities, or values in the targets' units
        if meta["n_classes"] is not None:
            names = meta.get("class_names") or [str(c) for c in range(meta["n_classes"])]
            values = out if out.shape[1] > 1 else np.concatenate([1.0 - out, out], axis=1)  # P(class 1) -> both
            pred, columns = values.argmax(axis=1), [f"p_{c}" for c in names]
        else:
            values = out
    else:
        meta, cfg, model, std, _, arrays = _load_for_inference(checkpoint, device, with_data=False)
        x = I.read_features(input_path, meta, cfg, checkpoint, std.fill, log, no_header=no_header)
        xd = model.backend.asarray(std(x), dtype=model.dtype)
        chunks = [model.backend.to_numpy(model.forward(xd[i : i + 4096])) for i in range(0, len(xd), 4096)]
        out = np.concatenate(chunks)  # (N, n_out) in the model's dtype
        if meta["n_classes"] is not None:
            names = meta.get("class_names") or [str(c) for c in range(meta["n_classes"])]
            pred, columns, values = I.class_outputs(out.astype(np.float64), cfg.loss.name, names,
                                                    model.decision_threshold, logits)  # fmt: skip
        else:
            values = I.to_user_units(out, meta, arrays)
    if meta["n_classes"] is not None:
        first, header = [names[p] for p in pred], ["prediction", *columns]
    else:
        label = meta.get("label_column") or "prediction"
        header = [label] if values.shape[1] == 1 else [f"{label}_{j}" for j in range(values.shape[1])]
        first = [None] * len(values)
    if output_path.endswith(".npy"):
        write = functools.partial(np.save, arr=np.asarray(values, dtype=np.float64))
    else:
        text = I.csv_text(first, header, values.astype(model.dtype))  # digits as the model's precision holds
        write = functools.partial(_write_text, text)
    try:
        atomic_write(output_path, write)
    except OSError as e:
        raise UsageError(f"--output {output_path!r} cannot be written ({e.strerror}); choose another path") from None
    click.echo(f"wrote {len(values)} predictions to {output_path}", err=True)


def _write_text(text: str, f) -> None:
    f.write(text.encode("utf-8"))


# --------------------------------------------------------------------------- bench

B_PRECISIONS = ("float32", "tf32", "bf16", "float64")  # gpubp.bench.PRECISIONS (not imported: startup time)


@main.command()
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option(
    "--case", "case_names", multiple=True, metavar="NAME", help="A case of configs/bench (repeatable; default all)."
)
@click.option("--json", "json_path", type=str, default=None, help="Write the full report as JSON.")
@click.option("--markdown", "md_path", type=str, default=None, help="Write the table as Markdown (docs/benchmarks.md).")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch columns.")
@click.option("--no-compile", is_flag=True, help="Skip torch.compile (it compiles for a while on the first step).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(B_PRECISIONS),
              help="Only these of each case's precisions (repeatable; default all).")  # fmt: skip
@click.option("--compile-precision", "compile_precisions", multiple=True, type=click.Choice(B_PRECISIONS),
              help="torch.compile only in rows of these precisions (repeatable; default all).")  # fmt: skip
@click.option(
    "--no-fused-mlp",
    is_flag=True,
    help="Skip timing the other way of train.fused_mlp beside the default step (the fused MLP, or the separate "
    'ops where "auto" took the fused MLP).',
)
@click.option("--overwrite", is_flag=True, help="Replace existing --json / --markdown files.")
@handle_errors
def bench(device, case_names, json_path, md_path, no_torch, no_compile, precisions, compile_precisions, no_fused_mlp,
          overwrite):  # fmt: skip
    """Training-step throughput of gpubp vs PyTorch, measured in the same run."""
    from . import bench as B
    from .backend import resolve_device

    for path in (json_path, md_path):
        if path and os.path.exists(path) and not overwrite:
            raise UsageError(f"{path!r} exists; pass --overwrite to replace it")
    if "sweep" in case_names:  # M models stacked vs sequential vs torch.func (gpubp.sweep_bench)
        return _bench_sweep(device, [c for c in case_names if c != "sweep"], json_path, md_path, no_torch)
    cases = B.find_cases(case_names)
    backend, note = resolve_device(device)
    if note:
        click.echo(note, err=True)
    click.echo(f"gpubp bench on {B.bench_device(backend)}", err=True)
    click.echo(B.HEADER)
    report = B.run(cases, backend, with_torch=not no_torch, with_compile=not no_compile, log=click.echo,
                   progress=lambda m: click.echo(m, err=True), precisions=precisions,
                   compile_precisions=compile_precisions, with_fused_mlp=not no_fused_mlp,
                   partial=functools.partial(_bench_files, json_path, md_path))  # fmt: skip
    summary = B.ratio_summary(report)
    if summary:
        click.echo(summary)
    _bench_files(json_path, md_path, report)


def _bench_files(json_path, md_path, report) -> None:
    """The report into --json / --markdown (after each row too: a run cut short keeps its rows)."""
    from . import bench as B
    from .checkpoint import atomic_write_text

    if json_path:
        B.write_json(report, json_path)
    if md_path:
        atomic_write_text(md_path, B.markdown(report))


def _bench_sweep(device, other_cases, json_path, md_path, no_torch) -> None:
    from . import bench as B
    from . import sweep_bench as S
    from .backend import resolve_device
    from .checkpoint import atomic_write_text

    if other_cases:
        raise UsageError("--case sweep runs on its own; give the other cases in another gpubp bench call")
    backend, note = resolve_device(device)
    if note:
        click.echo(note, err=True)
    click.echo(f"gpubp bench --case sweep on {B.bench_device(backend)}", err=True)
    click.echo(S.HEADER)
    report = S.run(backend, with_torch=not no_torch, log=click.echo)
    report["command"] = " ".join(["gpubp", *sys.argv[1:]]) if "bench" in sys.argv else "gpubp bench --case sweep"
    report["versions"] = B.versions()
    if json_path:
        B.write_json(report, json_path)
    if md_path:
        atomic_write_text(md_path, S.markdown(report, report["command"]))


# --------------------------------------------------------------------------- config / plot


@main.group()
def config():
    """Inspect configs."""


@config.command("show")
@click.argument("path", type=str)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config value.")
@handle_errors
def config_show(path, overrides):
    """Print the resolved config (every default filled in) as TOML; for a sweep, its
    [sweep] table and the expanded grid."""
    from .config import dump_toml, load_config

    cfg = load_config(path, overrides)
    click.echo(dump_toml(cfg), nl=False)
    if cfg.sweep is not None:
        from .sweep import dump_sweep_toml, format_table

        click.echo(dump_sweep_toml(cfg.sweep) + "\n" + format_table(cfg.sweep), nl=False)


@main.command()
@click.argument("run_dir", type=str)
@click.option("--output", type=str, default=None, help="PNG file (default: RUN_DIR/curves.png).")
@click.option("--overwrite", is_flag=True, help="Replace the PNG if it exists.")
@handle_errors
def plot(run_dir, output, overwrite):
    """A run's curves (loss; accuracy, or R2 and RMSE/MAE) and its confusion matrix, as a PNG."""
    from .plotting import plot_run

    path = plot_run(run_dir, output, overwrite)
    click.echo(f"wrote {path}", err=True)


# --------------------------------------------------------------------------- gradcheck / jacobian


@contextlib.contextmanager
def _progress_bar(total: int, unit: str):
    """Yields progress(n): a tqdm bar on a terminal; otherwise a line every 10 seconds
    (none for a check that ends sooner)."""
    import time

    from tqdm import tqdm

    if sys.stderr.isatty():
        with tqdm(total=total, unit=unit[:-1], dynamic_ncols=True, leave=False) as bar:
            yield bar.update
        return
    state = {"done": 0, "last": time.monotonic()}

    def progress(n: int) -> None:
        state["done"] += n
        if time.monotonic() - state["last"] >= 10.0:
            state["last"] = time.monotonic()
            click.echo(f"{state['done']}/{total} {unit} done", err=True)

    yield progress


@main.command()
@click.option("--config", "config_path", type=str, help="TOML or JSON config file (see configs/).")
@click.option("--device", type=DEVICE, default=None, help="Where to check (default: train.device, 'auto').")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True, help="Training samples to use.")
@click.option("--tol", type=click.FloatRange(min=0.0), default=1e-6, show_default=True, help="Largest relative error.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config value.")
@handle_errors
def gradcheck(config_path, device, samples, tol, overrides):
    """Finite-difference check of the configured model's gradients (float64)."""
    from .config import load_config
    from .errors import GpubpError
    from .gradcheck import check_model, pick_samples, rounding_floor
    from .trainer import prepare

    if config_path is None:
        raise UsageError("give --config FILE (e.g. configs/digits.toml)")
    # the configured model and data at its initial (seeded) parameters, in float64
    cfg = load_config(config_path, [*overrides, "model.dtype=float64"])
    run = prepare(cfg, device or cfg.train.device, log=lambda m: click.echo(m, err=True))
    model, be, train = run.model, run.backend, run.splits["train"]
    x, y = be.to_numpy(train.x), be.to_numpy(train.target)
    rows, margin, seen = pick_samples(model, x, y, samples)
    if not rows:
        raise GpubpError(
            f"gradcheck: none of the {seen} training samples keeps every pre-activation clear of a kink "
            f"({model.hidden_activation.name}/{model.activations[-1].name} at 0, or huber at +-delta): "
            "a finite-difference check is not meaningful here"
        )
    if len(rows) < samples:
        click.echo(f"only {len(rows)} of {seen} training samples are clear of kinks; checking those", err=True)
    floor = rounding_floor(model.loss_and_grads(x[rows], y[rows])[0])
    clear = "no kinks" if margin == float("inf") else f"kink margin {margin:.3g}"
    click.echo(f"gradcheck {config_path}: model {model.sizes}{' residual' if model.residual else ''}, "
               f"float64 on {be.describe()}, {len(rows)} training samples ({clear}), "
               f"{model.n_params} parameters, {4 * model.n_params} loss evaluations, error floor {floor:.2g}")  # fmt: skip
    with _progress_bar(model.n_params, "parameters") as progress:
        reports = check_model(model, x[rows], y[rows], floor=floor, progress=progress)
    click.echo(f"{'layer':>5}  {'W shape':>12}  {'W max rel err':>13}  {'b max rel err':>13}")
    for r in reports:
        W = model.params[2 * (r.layer - 1)]
        click.echo(f"{r.layer:>5}  {str(tuple(W.shape)):>12}  {r.weight_error:>13.3e}  {r.bias_error:>13.3e}")
    worst = max(reports, key=lambda r: max(r.weight_error, r.bias_error))
    error = max(worst.weight_error, worst.bias_error)
    if not error <= tol:
        raise GpubpError(f"gradcheck failed: layer {worst.layer} max relative error {error:.3e} > --tol {tol:g}")
    click.echo(f"ok: max relative error {error:.3e} <= --tol {tol:g}")


@main.command()
@click.option("--config", "config_path", type=str, help="TOML or JSON config file (see configs/).")
@click.option("--mode", type=click.Choice(["forward", "reverse", "both"]), default="both", show_default=True)
@click.option("--device", type=DEVICE, default=None, help="Where to run (default: train.device, 'auto').")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed calls per case.")
@click.option("--max-mb", type=click.FloatRange(min=1), default=2048, show_default=True,
              help="Skip timing a case whose buffers would pass this many MiB.")  # fmt: skip
@click.option("--json", "json_path", type=str, default=None, help="Also write the measurements here.")
@click.option("--plot", "plot_path", type=str, default=None, help="Also draw them into this PNG (needs matplotlib).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config value.")
@click.option("--overwrite", is_flag=True, help="Replace --json / --plot files that exist.")
@handle_errors
def jacobian(config_path, mode, device, repeats, max_mb, json_path, plot_path, overrides, overwrite):
    """Forward- vs reverse-mode Jacobians: FLOPs and time as the output width and
    the parameter count vary around the config's architecture."""
    from . import jacobian_bench
    from .config import load_config
    from .plotting import pyplot

    if config_path is None:
        raise UsageError("give --config FILE (e.g. configs/digits.toml)")
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None and os.path.exists(path) and not overwrite:
            raise UsageError(f"{option} {path!r} exists; pass --overwrite to replace it")
    plt = pyplot("gpubp jacobian --plot") if plot_path is not None else None
    cfg = load_config(config_path, overrides)
    modes = ("forward", "reverse") if mode == "both" else (mode,)
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    result = jacobian_bench.run_sweeps(cfg, device or cfg.train.device, modes, repeats, max_mb * 2**20, log)
    click.echo(jacobian_bench.format_table(result, modes))
    if json_path is not None:
        with open(json_path, "w") as f:
            json.dump(jacobian_bench.as_json(result), f, indent=1)
        log(f"wrote {json_path}")
    if plt is not None:
        jacobian_bench.plot(result, modes, plot_path, plt)
        log(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
