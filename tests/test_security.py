"""Files are data: no pickle is ever unpickled, configs name only registry entries,
relative paths start at the config's folder; checkpoints detect any damaged byte."""

from __future__ import annotations

import ast
import json
import os
import pickle
import random

import numpy as np
import pytest

from gpubp.checkpoint import load_checkpoint
from gpubp.config import load_config
from gpubp.data import load_npz
from gpubp.errors import CheckpointError, ConfigError, DataError
from gpubp.trainer import Trainer

from .conftest import ROOT, run_cli


class Payload:
    """Unpickling this runs code: it would create the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def checkpoint(tmp_path):
    cfg = load_config(None, ["data.dataset=spirals", "data.n_samples=60", "model.hidden=[4]", "train.steps=3"])
    Trainer(cfg, str(tmp_path / "run"), device="cpu", quiet=True).train()
    return tmp_path / "run" / "last.npz"


def test_a_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    for name in ("ck.npz", "data.npz", "x.npy"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(Payload(str(marker)), f)
    with pytest.raises(CheckpointError, match="ck.npz: not a readable gpubp checkpoint .it is a Python pickle, which"):
        load_checkpoint(str(tmp_path / "ck.npz"))
    with pytest.raises(DataError, match="data.npz: not a readable .npz file .it is a Python pickle, which gpubp never"):
        load_npz(str(tmp_path / "data.npz"), None)
    assert not marker.exists()


def test_an_object_array_in_an_npz_is_refused_and_never_run(tmp_path, checkpoint):
    marker = tmp_path / "pwned"
    _, arrays = load_checkpoint(str(checkpoint))
    evil = np.empty(1, dtype=object)
    evil[0] = Payload(str(marker))
    np.savez(tmp_path / "ck.npz", **arrays, meta=np.array("{}"), checksum=np.array("0"), extra=evil)
    np.savez(tmp_path / "data.npz", x=np.zeros((2, 2)), y=evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"ck.npz: holds an array of Python objects \(a pickle\), which gpubp"):
        load_checkpoint(str(tmp_path / "ck.npz"))
    with pytest.raises(DataError, match=r"data.npz: holds an array of Python objects \(a pickle\), which gpubp"):
        load_npz(str(tmp_path / "data.npz"), None)
    r = run_cli("predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "data.npz"), "--output",
                str(tmp_path / "p.npy"), "--device", "cpu")  # fmt: skip
    assert r.returncode == 2 and "holds an array of Python objects (a pickle)" in r.stderr
    assert not marker.exists()


def test_every_damaged_byte_is_detected_or_harmless(checkpoint):
    """300 seeded single-byte corruptions of a real checkpoint: each load raises
    CheckpointError, or (a byte the zip format does not read, e.g. a timestamp)
    returns exactly the original contents. Never anything else, never other values."""
    data = checkpoint.read_bytes()
    meta, arrays = load_checkpoint(str(checkpoint))
    rng = random.Random(7)
    detected = 0
    for offset in rng.sample(range(len(data)), 300):
        damaged = bytearray(data)
        damaged[offset] ^= 1 << rng.randrange(8)
        checkpoint.write_bytes(bytes(damaged))
        try:
            m, a = load_checkpoint(str(checkpoint))
        except CheckpointError:
            detected += 1
            continue
        assert m == meta and a.keys() == arrays.keys(), offset
        assert all(np.array_equal(a[k], arrays[k]) for k in a), offset
    assert detected >= 250  # nearly every byte of a checkpoint matters


def test_a_changed_value_with_a_valid_archive_fails_the_checksum(tmp_path, checkpoint):
    with np.load(checkpoint) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["step"] += 1  # e.g. an edited meta record
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez(tmp_path / "edited.npz", **arrays)
    with pytest.raises(CheckpointError, match="edited.npz: checksum mismatch: the file is corrupt"):
        load_checkpoint(str(tmp_path / "edited.npz"))


@pytest.mark.parametrize(
    "key,value",
    [
        ("model.activation", "__import__('os').system('touch pwned')"),
        ("model.init", "os.system"),
        ("loss.name", "gpubp.losses.mse"),
        ("optimizer.name", "torch.optim.SGD"),
        ("schedule.name", "eval"),
        ("data.dataset", "builtins.open"),
    ],
)
def test_config_names_are_registry_keys_not_code(tmp_path, monkeypatch, key, value):
    monkeypatch.chdir(tmp_path)
    section, name = key.split(".")
    (tmp_path / "c.toml").write_text(f"[{section}]\n{name} = {json.dumps(value)}\n")
    with pytest.raises(ConfigError, match=f"{key}: unknown value"):
        load_config("c.toml")
    assert not (tmp_path / "pwned").exists()


def test_the_package_never_evaluates_or_unpickles():
    """The source pins it (by its syntax tree): no call of the builtins eval, exec,
    compile or __import__; no pickle-like module imported; never allow_pickle=True."""
    unsafe_calls = {"eval", "exec", "compile", "__import__"}
    unsafe_modules = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
    hits = []
    for folder, _, files in os.walk(os.path.join(ROOT, "gpubp")):
        for name in (n for n in files if n.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in unsafe_calls:
                    hits.append(f"{name}:{node.lineno}: {node.func.id}()")
                if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                    if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                        hits.append(f"{name}:{node.value.lineno}: allow_pickle not False")
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                    hits += [
                        f"{name}:{node.lineno}: import {n}" for n in names if n and n.split(".")[0] in unsafe_modules
                    ]
    assert hits == []


def test_a_config_value_never_imports_the_module_it_names(tmp_path):
    """Every string key set to the name of a real module that nothing has imported: each
    is refused as an unknown value, and the module is still not imported."""
    import subprocess
    import sys

    code = (
        "import sys, gpubp.config as c\n"
        "from gpubp.errors import ConfigError\n"
        "for s, fields in c.SCHEMA.items():\n"
        "    for k, f in fields.items():\n"
        "        if f.choices:\n"
        "            try:\n"
        "                c.load_config(None, [f'{s}.{k}=colorsys'])\n"
        "            except ConfigError:\n"
        "                pass\n"
        "            else:\n"
        "                raise SystemExit(f'{s}.{k} accepted a module name')\n"
        "print('colorsys' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_relative_paths_start_at_the_config_folder_not_the_working_directory(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3))
    np.savez(project / "data.npz", x=x, y=(x[:, 0] > 0).astype(int))
    np.savez(elsewhere / "data.npz", x=np.zeros((5, 7)), y=np.zeros(5, dtype=int))  # a decoy in the cwd
    (project / "c.toml").write_text('[data]\ndataset = "npz"\npath = "data.npz"\n[model]\nhidden = [4]\n'
                                    "[train]\nsteps = 5\n")  # fmt: skip
    r = run_cli("train", "--config", "../project/c.toml", "--device", "cpu", "--quiet", "--out", "run",
                cwd=str(elsewhere))  # fmt: skip
    assert r.returncode == 0, r.stderr
    meta, _ = load_checkpoint(str(elsewhere / "run" / "last.npz"))
    assert meta["n_features"] == 3
    assert meta["config"]["data"]["path"] == str(project / "data.npz")  # stored absolute
    # so the checkpoint works from any folder
    r = run_cli("eval", "--checkpoint", str(elsewhere / "run" / "last.npz"), "--device", "cpu", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
