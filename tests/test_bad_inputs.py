"""The bad-input corpus (tests/bad_inputs/cases.toml): every case through a real
subprocess; one clear line, the right exit code, nothing left behind."""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from .conftest import has_gpu, run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bad_inputs")
with open(os.path.join(HERE, "cases.toml"), "rb") as _f:
    CORPUS = tomllib.load(_f)
CASES = CORPUS["case"]


def _array(spec):
    """A TOML list, or {values, dtype, shape}, as a NumPy array."""
    if not isinstance(spec, dict):
        return np.array(spec)
    a = np.array(spec.get("values", []), dtype=spec.get("dtype"))
    return a.reshape(spec["shape"]) if "shape" in spec else a


def _write_arrays(folder, tables):
    for name, arrays in tables.items():
        path = os.path.join(folder, name)
        if name.endswith(".npy"):
            (only,) = arrays.values()
            np.save(path, _array(only))
        else:
            np.savez(path, **{k: _array(v) for k, v in arrays.items()})


def _write_files(folder, files, binary=False):
    for name, content in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(bytes.fromhex(content) if binary else content.encode())


def _train(folder, name, spec):
    from gpubp.config import load_config
    from gpubp.trainer import Trainer

    cfg = load_config(os.path.join(folder, spec["config"]), spec.get("set", []))
    Trainer(cfg, os.path.join(folder, name), device="cpu", quiet=True).train()


def _damage(folder, name, spec):
    with open(os.path.join(folder, spec["from"]), "rb") as f:
        data = bytearray(f.read())
    if "truncate" in spec:
        data = data[: spec["truncate"]]
    if "flip" in spec:
        data[spec["flip"]] ^= 0xFF
    if "tamper" in spec:  # a well-formed archive with one array changed and the old checksum kept
        with np.load(os.path.join(folder, spec["from"]), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays[spec["tamper"]] = arrays[spec["tamper"]] + 1
        np.savez(os.path.join(folder, name), **arrays)
        return
    with open(os.path.join(folder, name), "wb") as f:
        f.write(bytes(data))


def build_case(case, folder):
    """Make the case's folder from its keys (README.md gives the order)."""
    _write_files(folder, CORPUS["shared"]["files"])
    _write_files(folder, case.get("files", {}))
    _write_files(folder, case.get("binary", {}), binary=True)
    _write_arrays(folder, case.get("arrays", {}))
    for name, spec in case.get("runs", {}).items():
        _train(folder, name, spec)
    for name, spec in case.get("damage", {}).items():
        _damage(folder, name, spec)
    _write_files(folder, case.get("after", {}))
    _write_arrays(folder, case.get("after_arrays", {}))


def snapshot(folder) -> dict:
    """{relative path: sha256} of every file and folder below `folder`."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder) + "/"] = "dir"
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_corpus_is_well_formed():
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(CASES) >= 40
    known = {"id", "args", "code", "message", "when", "files", "binary", "arrays", "runs", "damage", "after",
             "after_arrays"}  # fmt: skip
    for c in CASES:
        assert {"id", "args", "code", "message"} <= c.keys() and c.keys() <= known, c["id"]
        assert c["code"] in (1, 2), c["id"]


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Builds the folders of the selected cases and runs their commands, a few at a
    time (each is a subprocess of ~0.2 s, mostly Python and NumPy starting up):
    {case id: future of (folder, snapshot before, CompletedProcess)}."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input"]  # fmt: skip
    gpu = has_gpu()

    def launch(case, folder):
        build_case(case, folder)
        before = snapshot(folder)
        return folder, before, run_cli(*shlex.split(case["args"]), cwd=folder)

    runnable = [c for c in selected if not (c.get("when") == "no_gpu" and gpu)]
    # in-process training (case.runs) happens in launch(), on the worker threads
    with ThreadPoolExecutor(max_workers=4) as pool:
        # folders made here, in this thread: tmp_path_factory is not thread-safe
        futures = {c["id"]: pool.submit(launch, c, str(tmp_path_factory.mktemp(c["id"]))) for c in runnable}
        yield futures


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case, outcomes):
    if case.get("when") == "no_gpu" and has_gpu():
        pytest.skip("this machine has a GPU")
    folder, before, r = outcomes[case["id"]].result()
    lines = r.stderr.splitlines()
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("gpubp: error: "), r.stderr
    assert case["message"] in lines[0], f"expected {case['message']!r} in\n{lines[0]}"
    assert r.returncode == case["code"], r.stderr
    assert r.stdout == ""
    assert snapshot(folder) == before, "the command left files behind or changed them"


def test_damaged_checkpoints_really_are_damaged(tmp_path):
    """The corpus's damage recipes do what they say: a cut zip, a bad member CRC, a
    valid archive whose checksum no longer matches."""
    case = next(c for c in CASES if c["id"] == "checkpoint-tampered-predict")
    build_case(case, str(tmp_path))
    good, bad = tmp_path / "ck" / "last.npz", tmp_path / "bad.npz"
    with zipfile.ZipFile(bad) as z:
        assert z.testzip() is None  # a well-formed archive...
    with np.load(good) as a, np.load(bad) as b:
        assert str(a["checksum"]) == str(b["checksum"])  # ...with the old checksum
        assert not np.array_equal(a["params"], b["params"])  # ...over different parameters
