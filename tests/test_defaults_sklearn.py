"""With nothing but data.dataset = "csv" and data.path, gpubp reaches scikit-learn's
MLPClassifier() / MLPRegressor() defaults on wine, breast_cancer and diabetes, on the
same seeded 75/25 split (scikit-learn fits the 75% that gpubp splits into training and
validation, and both are scored on the same 25%)."""

import warnings

import numpy as np
import pytest

from gpubp import data as D
from gpubp.config import load_config
from gpubp.trainer import Trainer, load_dataset


def write_csv(path, x, y):
    with open(path, "w") as f:
        f.write(",".join([f"f{j}" for j in range(x.shape[1])] + ["label"]) + "\n")
        for row, t in zip(x, y):
            f.write(",".join(repr(float(v)) for v in row) + f",{float(t)!r}\n")


@pytest.mark.parametrize("name", ["wine", "breast_cancer", "diabetes"])
def test_defaults_reach_sklearn_mlp_defaults(tmp_path, name):
    datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    bunch = getattr(datasets, f"load_{name}")()
    write_csv(tmp_path / "d.csv", bunch.data, bunch.target)  # targets written as floats: 151.0, 1.0
    (tmp_path / "c.toml").write_text('[data]\ndataset = "csv"\npath = "d.csv"\n')
    cfg = load_config(str(tmp_path / "c.toml"))
    trainer = Trainer(cfg, str(tmp_path / "run"), device="cpu", quiet=True)
    summary = trainer.train()
    classes = name != "diabetes"
    assert summary["task"] == ("classification" if classes else "regression")
    assert summary["weights"].startswith("best.npz")  # early stopping on validation restored the best weights
    ours = summary["test_accuracy"] if classes else summary["test_r2"]

    c = trainer.cfg
    splits = D.split_dataset(load_dataset(c), c.data.val_fraction, c.data.test_fraction, c.train.seed, c.data.stratify)
    x = np.concatenate([splits.train.x, splits.val.x])
    y = np.concatenate([splits.train.y, splits.val.y]).ravel()
    Est = MLPClassifier if classes else MLPRegressor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # their default 200 iterations often stop short
        plain = Est(random_state=0).fit(x, y).score(splits.test.x, splits.test.y.ravel())
        scaled = (
            make_pipeline(StandardScaler(), Est(random_state=0)).fit(x, y).score(splits.test.x, splits.test.y.ravel())
        )
    print(f"{name}: gpubp {ours:.4f}, MLP default {plain:.4f}, scaled MLP default {scaled:.4f}")
    assert ours >= plain
    # scikit-learn's default on standardised features too: within one test sample of wine (1/45)
    assert ours >= scaled - 0.025
