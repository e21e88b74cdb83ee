"""The scikit-learn estimators: parity with `gpubp train`, probabilities, checkpoints
through the CLI, pickling, and scikit-learn's own estimator checks (when installed)."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

import gpubp
from gpubp.checkpoint import load_checkpoint

from .conftest import ROOT, assert_close, run_cli


def blobs(n=120, n_features=4, n_classes=3, seed=0):
    """Gaussian blobs, one per class, in raw (unstandardised) units."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 3.0, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=n)
    x = centers[y] * [1.0, 10.0, 0.1, 5.0][:n_features] + rng.normal(size=(n, n_features)) + 50.0
    return x, y


def numpy_logits(meta, arrays, x):
    """Independent reference of the forward pass of a relu MLP (float64): standardise,
    then z_k = a_k W_k + b_k, a_{k+1} = relu(z_k), the last layer linear."""
    sizes = meta["model"]["sizes"]
    p = arrays["params"].astype(np.float64)
    a = (x - arrays["std.mean"]) / arrays["std.std"]
    off = 0
    for k, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = p[off : off + fan_in * fan_out].reshape(fan_in, fan_out)
        b = p[off + fan_in * fan_out : off + fan_in * fan_out + fan_out]
        off += fan_in * fan_out + fan_out
        a = a @ w + b
        if k < len(sizes) - 2:
            a = np.maximum(a, 0.0)
    return a


def cli_train(tmp_path, x, y, hidden, epochs, batch, lr, seed, loss="softmax_cross_entropy"):
    """`gpubp train` on arrays written to an .npz, all of it for training (no test split)."""
    np.savez(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "c.toml").write_text(
        f'[data]\ndataset = "npz"\npath = "d.npz"\ntest_fraction = 0.0\nval_fraction = 0.0\ntask = '
        f'"{"classification" if loss == "softmax_cross_entropy" else "regression"}"\n'
        f"[model]\nhidden = {list(hidden)}\n[loss]\nname = {loss!r}\n"
        f"[optimizer]\nlr = {lr}\n[train]\nepochs = {epochs}\nbatch_size = {batch}\nseed = {seed}\n"
    )
    r = run_cli("train", "--config", str(tmp_path / "c.toml"), "--device", "cpu", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    return load_checkpoint(str(tmp_path / "run" / "last.npz"))


# --------------------------------------------------------------------------- parity with the CLI


def test_classifier_same_parameters_as_gpubp_train(tmp_path):
    x, y = blobs()
    meta, arrays = cli_train(tmp_path, x, y, hidden=(16, 8), epochs=7, batch=32, lr=0.01, seed=5)
    est = gpubp.MLPClassifier(hidden_layer_sizes=(16, 8), max_iter=7, batch_size=32, learning_rate_init=0.01,
                              random_state=5, device="cpu").fit(x, y)  # fmt: skip
    est_meta, est_arrays = est._state
    # the same config, seed, data and loop on the CPU: the same bits
    np.testing.assert_array_equal(est_arrays["params"], arrays["params"])
    np.testing.assert_array_equal(est_arrays["std.mean"], arrays["std.mean"])
    assert est_meta["optimizer_steps"] == meta["optimizer_steps"] == 7 * 4  # 120 rows / 32 -> 4 steps an epoch
    assert est.n_iter_ == 7 and len(est.loss_curve_) == 7


def test_regressor_same_parameters_as_gpubp_train(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 3)) * [1.0, 100.0, 0.01]
    y = 300.0 + 50.0 * np.sin(x[:, 0]) + 0.2 * x[:, 1]
    # the regressor trains on standardised targets: gpubp train gets those
    ys = (y - y.mean()) / y.std()
    meta, arrays = cli_train(tmp_path, x, ys, hidden=(12,), epochs=5, batch=16, lr=0.005, seed=2, loss="mse")
    est = gpubp.MLPRegressor(hidden_layer_sizes=(12,), max_iter=5, batch_size=16, learning_rate_init=0.005,
                             random_state=2, device="cpu").fit(x, y)  # fmt: skip
    np.testing.assert_array_equal(est._state[1]["params"], arrays["params"])
    # predictions in y's units: the network's output scaled back (float32 network: rtol 1e-5)
    ref = numpy_logits(meta, arrays, x)[:, 0] * y.std() + y.mean()
    assert est.predict(x).shape == (90,)
    assert_close(est.predict(x), ref, np.float32, scale=10, what="regressor predictions")


# --------------------------------------------------------------------------- predictions


def test_predict_proba_is_softmax_of_the_network_and_sums_to_1():
    x, y = blobs(n=150, seed=3)
    labels = np.array(["cat", "dog", "emu"])[y]  # any labels, not only 0..C-1
    est = gpubp.MLPClassifier(
        hidden_layer_sizes=(20,), learning_rate_init=0.01, max_iter=50, random_state=0, device="cpu"
    )
    est.fit(x, labels)
    assert est.classes_.tolist() == ["cat", "dog", "emu"] and est.n_features_in_ == 4
    proba = est.predict_proba(x)
    assert proba.shape == (150, 3) and np.all(proba >= 0)
    assert_close(proba.sum(axis=1), np.ones(150), what="row sums")  # float64 softmax: ~1e-16
    z = numpy_logits(*est._state, x)
    ref = np.exp(z - z.max(axis=1, keepdims=True))
    ref /= ref.sum(axis=1, keepdims=True)
    assert_close(proba, ref, np.float32, scale=10, what="predict_proba vs NumPy softmax")
    assert np.array_equal(est.predict(x), est.classes_[np.argmax(ref, axis=1)])
    assert_close(est.predict_log_proba(x), np.log(ref), np.float32, scale=10, what="predict_log_proba")
    assert est.score(x, labels) >= 0.95  # well separated blobs


def blas_rows_independent(dtype) -> bool:
    """Whether this NumPy's BLAS gives a product's row the same bits wherever the row
    stands in its matrix (a fixed shape, the rows rolled). OpenBLAS 0.3.31's float32
    products on an AMD EPYC (its Haswell kernels) do not: a row's last bits follow its
    place modulo 64."""
    rng = np.random.default_rng(0)
    a, w = rng.normal(size=(256, 18)).astype(dtype), rng.normal(size=(18, 27)).astype(dtype)
    return all(np.array_equal(np.roll(a @ w, s, axis=0), np.roll(a, s, axis=0) @ w) for s in (1, 5, 17, 64))


def test_predictions_do_not_depend_on_the_other_rows():
    """predict(X)[rows] == predict(X[rows]) exactly where the BLAS allows it: the forward
    pass runs in blocks of a fixed row count, so BLAS picks the same kernel (and rounding)
    for every block, and a row's output depends on its place in the block alone; where the
    BLAS's rounding follows a row's place too (blas_rows_independent), within the rounding
    of the two float32 evaluations: each of the two layers' sums (f and width terms) off by
    at most (f + width) eps of its terms, so 4 (f + width) eps of the outputs' scale."""
    rng = np.random.default_rng(11)
    exact = blas_rows_independent(np.float32)
    for trial in range(5):
        n, f = int(rng.integers(20, 600)), int(rng.integers(1, 30))
        x, y = rng.normal(size=(n, f)), rng.normal(size=n)
        width = int(rng.integers(5, 300))
        est = gpubp.MLPRegressor(hidden_layer_sizes=(width,), max_iter=2, random_state=trial, device="cpu").fit(x, y)
        full = est.predict(x)
        tol = 4 * (f + width) * float(np.finfo(np.float32).eps) * (np.abs(full).max() + 1.0)
        for _ in range(3):
            rows = np.sort(rng.choice(n, int(rng.integers(1, n)), replace=False))
            part = est.predict(x[rows])
            if exact:
                np.testing.assert_array_equal(part, full[rows])
            else:
                assert np.abs(part - full[rows]).max() <= tol, (trial, np.abs(part - full[rows]).max(), tol)
                assert np.array_equal(est.predict(x[rows]), part)  # the same rows again: the same bits


def test_partial_fit_continues_the_model():
    x, y = blobs(n=100, seed=4)
    kw = dict(hidden_layer_sizes=(16,), batch_size=25, random_state=1, device="cpu")
    once = gpubp.MLPClassifier(max_iter=1, **kw).fit(x, y)
    part = gpubp.MLPClassifier(**kw)
    with pytest.raises(ValueError, match="classes must be passed"):
        part.partial_fit(x, y)
    part.partial_fit(x, y, classes=[0, 1, 2])
    # the first call is one epoch of fit
    np.testing.assert_array_equal(part._state[1]["params"], once._state[1]["params"])
    before = part._state[1]["params"].copy()
    part.partial_fit(x, y)
    meta, arrays = part._state
    assert meta["optimizer_steps"] == 8 and part.n_iter_ == 2 and len(part.loss_curve_) == 2
    assert not np.array_equal(arrays["params"], before)
    assert part.loss_curve_[1] < part.loss_curve_[0]
    with pytest.raises(ValueError, match="features"):
        part.partial_fit(x[:, :3], y)
    with pytest.raises(ValueError, match="not the same"):
        part.partial_fit(x, y, classes=[0, 1])


def test_early_stopping_holds_out_a_validation_share():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 5)), rng.integers(0, 2, size=200)  # labels are noise: val loss only rises
    est = gpubp.MLPClassifier(hidden_layer_sizes=(64,), learning_rate_init=0.01, max_iter=300, early_stopping=True,
                              n_iter_no_change=3, batch_size=20, random_state=0, device="cpu").fit(x, y)  # fmt: skip
    assert est.n_iter_ < 300 and len(est.loss_curve_) == est.n_iter_
    meta = est._state[0]
    assert meta["config"]["data"]["val_fraction"] == 0.1 and meta["bad_evals"] == 3
    # 180 training rows (90% of 200, stratified) in batches of 20: 9 steps an epoch
    assert meta["optimizer_steps"] == 9 * est.n_iter_


def test_regressor_partial_fit():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(120, 3))
    y = np.stack([10.0 * x[:, 0], x[:, 1] - x[:, 2]], axis=1)
    kw = dict(hidden_layer_sizes=(16,), batch_size=30, learning_rate_init=0.01, random_state=0, device="cpu")
    once = gpubp.MLPRegressor(max_iter=1, **kw).fit(x, y)
    part = gpubp.MLPRegressor(**kw).partial_fit(x, y)
    np.testing.assert_array_equal(part._state[1]["params"], once._state[1]["params"])
    for _ in range(20):
        part.partial_fit(x, y)
    assert part.n_iter_ == 21 and part._state[0]["optimizer_steps"] == 21 * 4
    assert part.loss_curve_[-1] < 0.5 * part.loss_curve_[0] and part.score(x, y) > 0.5
    with pytest.raises(ValueError, match="target columns"):
        part.partial_fit(x, y[:, 0])


def test_bad_parameters_name_the_keyword():
    x, y = blobs(n=30)
    with pytest.raises(ValueError, match=r"learning_rate_init \(optimizer.lr\): must be > 0"):
        gpubp.MLPClassifier(learning_rate_init=-1.0, device="cpu").fit(x, y)
    with pytest.raises(ValueError, match=r"solver \(optimizer.name\): unknown value 'lbfgs'"):
        gpubp.MLPClassifier(solver="lbfgs", device="cpu").fit(x, y)
    with pytest.raises(ValueError, match="data and the classifier's loss are set by the estimator"):
        gpubp.MLPClassifier(config={"data.test_fraction": 0.5}, device="cpu").fit(x, y)
    with pytest.raises(ValueError, match=r"device \(train.device\): unknown value 'tpu'"):
        gpubp.MLPClassifier(device="tpu").fit(x, y)
    from gpubp.backend import gpu_unavailable_reason
    from gpubp.errors import DeviceError

    if gpu_unavailable_reason() is not None:
        with pytest.raises(DeviceError, match=r"^device='gpu': no usable GPU .*; use device='cpu' or 'auto'$"):
            gpubp.MLPClassifier(device="gpu").fit(x, y)
    with pytest.raises(ValueError, match="at least two classes"):
        gpubp.MLPClassifier(device="cpu").fit(x, np.zeros(30))


# --------------------------------------------------------------------------- checkpoints


def test_save_is_read_by_gpubp_predict_and_load(tmp_path):
    x, y = blobs(n=90, seed=6)
    labels = np.array(["a", "b", "c"])[y]
    est = gpubp.MLPClassifier(hidden_layer_sizes=(10,), max_iter=20, random_state=0, device="cpu").fit(x, labels)
    est.save(str(tmp_path / "c.npz"))
    with pytest.raises(FileExistsError):
        est.save(str(tmp_path / "c.npz"))
    np.save(tmp_path / "x.npy", x)
    r = run_cli("predict", "--checkpoint", str(tmp_path / "c.npz"), "--input", str(tmp_path / "x.npy"),
                "--output", str(tmp_path / "p.csv"), "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [line.split(",") for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == est.predict(x).tolist()
    loaded = gpubp.load(str(tmp_path / "c.npz"), device="cpu")
    assert type(loaded) is gpubp.MLPClassifier and loaded.classes_.tolist() == ["a", "b", "c"]
    assert loaded.get_params()["hidden_layer_sizes"] == (10,) and loaded.max_iter == 20
    np.testing.assert_array_equal(loaded.predict_proba(x), est.predict_proba(x))


def test_regressor_checkpoint_predicts_in_target_units(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 2))
    y = np.stack([1000.0 + 200.0 * x[:, 0], -5.0 + 0.1 * x[:, 1]], axis=1)  # two targets, far apart in scale
    est = gpubp.MLPRegressor(hidden_layer_sizes=(8,), max_iter=40, random_state=0, device="cpu").fit(x, y)
    assert est.n_outputs_ == 2 and est.predict(x).shape == (80, 2)
    est.save(str(tmp_path / "r.npz"))
    np.save(tmp_path / "x.npy", x)
    r = run_cli("predict", "--checkpoint", str(tmp_path / "r.npz"), "--input", str(tmp_path / "x.npy"),
                "--output", str(tmp_path / "p.npy"), "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr
    # the scaling folded into the last layer: the CLI gives y's units (float32 weights)
    assert_close(np.load(tmp_path / "p.npy"), est.predict(x), np.float32, scale=100, what="CLI vs estimator")
    loaded = gpubp.load(str(tmp_path / "r.npz"), device="cpu")
    assert type(loaded) is gpubp.MLPRegressor
    assert_close(loaded.predict(x), est.predict(x), np.float32, scale=100, what="loaded vs estimator")


def test_load_a_checkpoint_written_by_gpubp_train(tmp_path):
    x, y = blobs(n=60, seed=7)
    meta, arrays = cli_train(tmp_path, x, y, hidden=(6,), epochs=3, batch=20, lr=0.01, seed=0)
    est = gpubp.load(str(tmp_path / "run" / "last.npz"), device="cpu")
    assert est.classes_.tolist() == [0, 1, 2] and est.n_features_in_ == 4 and est.random_state == 0
    z = numpy_logits(meta, arrays, x)
    assert np.array_equal(est.predict(x), np.argmax(z, axis=1))
    # its parameters retrain the same model
    refit = gpubp.MLPClassifier(**est.get_params()).fit(x, y)
    np.testing.assert_array_equal(refit._state[1]["params"], arrays["params"])


def test_pickle_and_clone():
    x, y = blobs(n=60, seed=8)
    est = gpubp.MLPClassifier(hidden_layer_sizes=(8,), max_iter=10, random_state=0, device="cpu").fit(x, y)
    back = pickle.loads(pickle.dumps(est))
    assert "_model" not in back.__dict__  # device arrays are not pickled; rebuilt on first use
    np.testing.assert_array_equal(back.predict_proba(x), est.predict_proba(x))
    sklearn_base = pytest.importorskip("sklearn.base")
    fresh = sklearn_base.clone(est)
    assert fresh.get_params() == est.get_params() and not hasattr(fresh, "classes_")


# --------------------------------------------------------------------------- without scikit-learn


def test_import_and_fit_without_sklearn(tmp_path):
    """`import gpubp` and the estimators work when scikit-learn cannot be imported."""
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "import numpy as np, gpubp\n"
        "rng = np.random.default_rng(0); x = rng.normal(size=(80, 3)); y = (x[:, 0] > 0).astype(int)\n"
        "c = gpubp.MLPClassifier(hidden_layer_sizes=(8,), max_iter=30, learning_rate_init=0.05, random_state=0, device='cpu').fit(x, y)\n"
        "assert c.score(x, y) > 0.9 and c.get_params()['max_iter'] == 30\n"
        "assert c.set_params(max_iter=5) is c and c.max_iter == 5\n"
        "r = gpubp.MLPRegressor(max_iter=30, learning_rate_init=0.05, random_state=0, device='cpu').fit(x, x[:, 1])\n"
        "assert r.score(x, x[:, 1]) > 0.9\n"
        "try:\n    c.predict(x[:, :2])\nexcept ValueError as e:\n    print(e)\n"
        "assert 'sklearn' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        # a table with named columns (as a DataFrame): the names are kept and saved
        "class Table:\n    columns = ['a', 'b', 'c']\n    def __init__(self, x): self.x = x\n"
        "    def __array__(self, dtype=None, copy=None): return self.x\n"
        "c.fit(Table(x), y); assert list(c.feature_names_in_) == ['a', 'b', 'c']\n"
        "c.save(sys.argv[1]); assert list(gpubp.load(sys.argv[1]).feature_names_in_) == ['a', 'b', 'c']\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.npz")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "X has 2 features, but MLPClassifier is expecting 3" in r.stdout


# --------------------------------------------------------------------------- scikit-learn's tools


def test_dataframe_feature_names(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("sklearn")
    x, y = blobs(n=60, seed=9)
    frame = pd.DataFrame(x, columns=["w", "x", "y", "z"])
    est = gpubp.MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, random_state=0, device="cpu").fit(frame, y)
    assert est.feature_names_in_.tolist() == ["w", "x", "y", "z"]
    with pytest.raises(ValueError, match="feature names"):
        est.predict(frame[["z", "y", "x", "w"]])
    est.save(str(tmp_path / "f.npz"))
    assert gpubp.load(str(tmp_path / "f.npz")).feature_names_in_.tolist() == ["w", "x", "y", "z"]


def test_pipeline_gridsearch_cross_val_score():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_wine
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_wine(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), gpubp.MLPClassifier(max_iter=60, random_state=0, device="cpu"))
    scores = cross_val_score(pipe, x, y, cv=3)
    assert scores.shape == (3,) and scores.mean() >= 0.9
    grid = GridSearchCV(
        gpubp.MLPClassifier(max_iter=60, random_state=0, device="cpu"),
        {"hidden_layer_sizes": [(8,), (32,)], "learning_rate_init": [1e-3, 1e-2]},
        cv=3,
    ).fit(x, y)
    assert set(grid.cv_results_["params"][0]) == {"hidden_layer_sizes", "learning_rate_init"}
    assert grid.best_score_ >= 0.9 and grid.best_estimator_.n_features_in_ == 13


@pytest.mark.parametrize("name", ["MLPClassifier", "MLPRegressor"])
def test_check_estimator(name):
    """scikit-learn's own estimator test suite; every check applies (none expected to fail)."""
    pytest.importorskip("sklearn")
    from sklearn.utils.estimator_checks import check_estimator

    est = getattr(gpubp, name)(max_iter=50, random_state=0, device="cpu")
    check_estimator(est, on_skip=None)


def test_readme_from_python_block_runs(tmp_path, monkeypatch):
    """README.md's "From Python" example, run as written (in a scratch folder)."""
    pytest.importorskip("sklearn")
    lines = open(f"{ROOT}/README.md").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("<!-- from-python"))
    end = next(i for i in range(start + 2, len(lines)) if lines[i].startswith("```"))
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec("\n".join(lines[start + 2 : end]), scope)
    assert scope["search"].best_score_ >= 0.9 and scope["same"].score(scope["X_test"], scope["y_test"]) >= 0.9
    assert (tmp_path / "wine.npz").exists()


@pytest.mark.gpu
def test_gpu_fit_matches_cpu_and_pickles():
    """device='gpu' trains the same model as the CPU (float64: the backends agree to
    rounding; GEMM order differs, so ~1e-10 after 20 epochs, not bits) and pickles
    without device arrays."""
    x, y = blobs(n=200, seed=10)
    kw = dict(hidden_layer_sizes=(32,), max_iter=20, batch_size=50, random_state=0, config={"model.dtype": "float64"})
    gpu = gpubp.MLPClassifier(device="gpu", **kw).fit(x, y)
    cpu = gpubp.MLPClassifier(device="cpu", **kw).fit(x, y)
    assert_close(gpu._state[1]["params"], cpu._state[1]["params"], np.float64, scale=1e4, what="gpu vs cpu params")
    back = pickle.loads(pickle.dumps(gpu))
    assert_close(back.predict_proba(x), cpu.predict_proba(x), np.float64, scale=1e4, what="unpickled gpu model")


def test_regressor_scales_targets_once_across_save_and_partial_fit(tmp_path):
    """The regressor standardises y itself; the trainer must not scale it again: a saved and
    reloaded model predicts what the fitted one does (float32 model: rtol 1e-5, a few ulps
    of the folded last layer), and partial_fit on shifted data keeps the first call's scale."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = x @ [1.0, 2.0, 3.0] + 5 + rng.normal(size=400) * 0.1
    est = gpubp.MLPRegressor(hidden_layer_sizes=(16,), max_iter=30, early_stopping=True, random_state=0,
                             device="cpu").fit(x, y)  # fmt: skip
    path = str(tmp_path / "r.npz")
    est.save(path)
    np.testing.assert_allclose(
        gpubp.load(path, device="cpu").predict(x[:20]), est.predict(x[:20]), rtol=1e-5, atol=1e-5
    )
    part = gpubp.MLPRegressor(hidden_layer_sizes=(16,), random_state=0, device="cpu")
    part.partial_fit(x[:200], y[:200])
    part.partial_fit(x[200:210] + 3, y[200:210] + 20)
    arrays = part._state[1]
    for key in ("target.mean", "target.std"):  # the trainer's own scaler stays the identity, if stored
        if key in arrays:
            assert np.all(arrays[key] == (0.0 if key == "target.mean" else 1.0)), (key, arrays[key])
