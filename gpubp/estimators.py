"""scikit-learn estimators: `MLPClassifier`, `MLPRegressor` and `load`.

A thin front over the trainer: `fit` turns the constructor's keywords into a gpubp
Config (`make_config`) and runs the same loop as `gpubp train` in memory
(`trainer.train_in_memory`: no run directory, no files), so the command line and the
Python interface cannot drift apart. The same config and seed give the same
parameters as `gpubp train` on the same arrays (tests/test_estimators.py checks it).

    est = gpubp.MLPClassifier(hidden_layer_sizes=(64,), max_iter=100, random_state=0)
    est.fit(X, y).predict_proba(X_new)        # (n, n_classes), rows sum to 1
    est.save("model.npz")                      # `gpubp predict --checkpoint model.npz` reads it
    gpubp.load("runs/digits/best.npz")         # any gpubp checkpoint -> a fitted estimator

scikit-learn is optional (`pip install 'gpubp[sklearn]'`). When it is importable the
estimators derive from its BaseEstimator and ClassifierMixin / RegressorMixin and
validate input with its `validate_data` (its exact errors, `feature_names_in_`
checks), so they pass `check_estimator` and work in Pipeline, GridSearchCV and
cross_val_score. Without it, the small stand-ins below give the same public surface
(get_params, set_params, score, input checks) for plain NumPy use.

Fitted state is host data only (the checkpoint's meta record and arrays), so an
estimator pickles small and unpickles on any machine; the model on the device is a
cache rebuilt on first use.
"""

from __future__ import annotations

import inspect
import os

import numpy as np

from . import data as D
from .checkpoint import load_checkpoint, save_checkpoint
from .config import validate
from .errors import ConfigError, DataError, DeviceError, UsageError

try:  # scikit-learn is optional: the estimators use its base classes when it is there
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, column_or_1d

    try:
        from sklearn.utils.validation import validate_data  # scikit-learn >= 1.6
    except ImportError:  # pragma: no cover - scikit-learn 1.3 .. 1.5

        def validate_data(est, *args, **kwargs):
            return est._validate_data(*args, **kwargs)

    HAVE_SKLEARN = True
except ImportError:
    HAVE_SKLEARN = False

IN_MEMORY = "(arrays given to fit)"  # data.path of an estimator's config: the data came in memory
PREDICT_BLOCK = (4096, 256)  # rows per forward pass when predicting, on the GPU and the CPU (fixed: see _forward)
# constructor keyword -> the config key it sets (error messages name both)
PARAM_KEYS = {
    "hidden_layer_sizes": "model.hidden",
    "activation": "model.activation",
    "solver": "optimizer.name",
    "learning_rate_init": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "batch_size": "train.batch_size",
    "max_iter": "train.epochs",
    "random_state": "train.seed",
    "validation_fraction": "data.val_fraction",
    "n_iter_no_change": "train.early_stopping_patience",
    "device": "train.device",
}
SKLEARN_ACTIVATIONS = {"logistic": "sigmoid"}  # scikit-learn's names that gpubp spells otherwise


# --------------------------------------------------------------------------- without scikit-learn

if not HAVE_SKLEARN:

    class BaseEstimator:
        """get_params / set_params as scikit-learn's: the constructor's keywords."""

        @classmethod
        def _get_param_names(cls):
            sig = inspect.signature(cls.__init__)
            return sorted(p.name for p in sig.parameters.values() if p.name != "self")

        def get_params(self, deep=True):
            return {name: getattr(self, name) for name in self._get_param_names()}

        def set_params(self, **params):
            valid = self._get_param_names()
            for key, value in params.items():
                if key not in valid:
                    raise ValueError(f"invalid parameter {key!r} for {type(self).__name__}; valid: {valid}")
                setattr(self, key, value)
            return self

        def __repr__(self):
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
            return f"{type(self).__name__}({args})"

    class ClassifierMixin:
        _estimator_type = "classifier"

        def score(self, X, y, sample_weight=None):
            """Mean accuracy."""
            return float(np.average(self.predict(X) == np.asarray(y), weights=sample_weight))

    class RegressorMixin:
        _estimator_type = "regressor"

        def score(self, X, y, sample_weight=None):
            """R^2 = 1 - sum (y - f)^2 / sum (y - mean y)^2, averaged over the outputs."""
            return _r2(np.asarray(y, dtype=np.float64), np.asarray(self.predict(X), dtype=np.float64), sample_weight)

    def check_is_fitted(est):
        if not hasattr(est, "_state"):
            raise AttributeError(f"this {type(est).__name__} is not fitted yet; call fit first")


def _r2(y, pred, weights=None) -> float:
    y, pred = y.reshape(len(y), -1), pred.reshape(len(pred), -1)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    mean = np.average(y, axis=0, weights=w)
    ss_res = (w[:, None] * (y - pred) ** 2).sum(axis=0)
    ss_tot = (w[:, None] * (y - mean) ** 2).sum(axis=0)
    r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.where(ss_res > 0, 0.0, 1.0))
    return float(r2.mean())


def _check_array(est, X, reset: bool) -> np.ndarray:
    """Without scikit-learn: X as a finite float64 (n, F) array; records or checks n_features_in_."""
    columns = getattr(X, "columns", None)
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D array of shape (n_samples, n_features), got shape {X.shape}")
    if X.dtype == object or not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise ValueError(f"features must be real numbers, got dtype {X.dtype}")
    X = X.astype(np.float64)
    if not np.all(np.isfinite(X)):
        raise ValueError("Input X contains NaN or infinity; remove or impute those values")
    if reset:
        est.n_features_in_ = X.shape[1]
        if columns is not None and all(isinstance(c, str) for c in columns):
            est.feature_names_in_ = np.asarray(list(columns), dtype=object)
        elif hasattr(est, "feature_names_in_"):  # refitted on unnamed columns
            del est.feature_names_in_
    elif X.shape[1] != est.n_features_in_:
        raise ValueError(f"X has {X.shape[1]} features, but {type(est).__name__} is expecting {est.n_features_in_}")
    return X


# --------------------------------------------------------------------------- shared by both estimators


def _seed(random_state) -> int:
    """random_state -> train.seed: an int is used as is; None draws from NumPy's global
    RandomState, a RandomState or Generator from itself (as scikit-learn's check_random_state)."""
    if random_state is None:
        return int(np.random.randint(np.iinfo(np.int32).max))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(np.iinfo(np.int32).max))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(np.iinfo(np.int32).max))
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        return int(random_state)
    raise ValueError(f"random_state must be None, an int or a numpy RandomState, got {random_state!r}")


def _softmax(z: np.ndarray) -> np.ndarray:
    """softmax(z)_c = exp(z_c - max z) / sum_j exp(z_j - max z), row by row (float64)."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow


class _MLPBase(BaseEstimator):
    """What both estimators share: config, training, the stored state, the device model."""

    _loss = "mse"  # the loss and task the estimator trains with (a subclass sets them)
    _task = "regression"

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", learning_rate_init=1e-3,
                 weight_decay=0.0, batch_size="auto", max_iter=200, early_stopping=False, validation_fraction=0.1,
                 n_iter_no_change=10, random_state=None, device="auto", verbose=False, config=None):  # fmt: skip
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.learning_rate_init = learning_rate_init
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.device = device
        self.verbose = verbose
        self.config = config

    # ---- config

    def make_config(self, n_samples: int, partial: bool = False):
        """The gpubp Config that `fit` trains with on n_samples rows (`partial`: one epoch,
        no validation split, as partial_fit). ValueError for a bad parameter, naming it."""
        hidden = self.hidden_layer_sizes
        hidden = [hidden] if isinstance(hidden, (int, np.integer)) else hidden
        hidden = hidden.tolist() if isinstance(hidden, np.ndarray) else hidden
        if not isinstance(hidden, (list, tuple)):
            raise ValueError(f"hidden_layer_sizes must be a tuple of ints such as (100,), got {hidden!r}")
        batch = self.batch_size
        if isinstance(batch, str) and batch == "auto":
            batch = min(200, n_samples)  # scikit-learn's rule
        early = bool(self.early_stopping) and not partial
        raw = {
            # the regressor standardises y itself (kept across partial_fit, folded into the
            # saved model): the trainer must not scale it a second time
            "data": {"dataset": "npz", "path": IN_MEMORY, "test_fraction": 0.0, "task": self._task,
                     "val_fraction": self.validation_fraction if early else 0.0, "standardize_targets": False},
            "model": {"hidden": [_plain(h) for h in hidden],
                      "activation": SKLEARN_ACTIVATIONS.get(self.activation, self.activation)},
            "loss": {"name": self._loss},
            "optimizer": {"name": self.solver, "lr": _plain(self.learning_rate_init),
                          "weight_decay": _plain(self.weight_decay)},
            "train": {"epochs": 1 if partial else _plain(self.max_iter), "batch_size": _plain(batch),
                      "early_stopping_patience": _plain(self.n_iter_no_change) if early else 0,
                      "seed": _seed(self.random_state), "device": self.device},
        }  # fmt: skip
        for key, value in (self.config or {}).items():
            section, _, name = str(key).partition(".")
            if section == "data" or (key == "loss.name" and self._loss == "softmax_cross_entropy") or not name:
                raise ValueError(
                    f"config key {key!r}: give 'section.key' of [model], [loss], [optimizer], [schedule] or [train]; "
                    "the data and the classifier's loss are set by the estimator"
                )
            raw.setdefault(section, {})[name] = _plain(value)
        try:
            return validate(raw, f"{type(self).__name__} parameters")
        except ConfigError as e:
            message = str(e)
            for param, key in PARAM_KEYS.items():
                message = message.replace(f" {key}:", f" {param} ({key}):").replace(f" {key} ", f" {param} ({key}) ")
            raise ValueError(message) from None

    # ---- training

    def _train(self, X, y_dataset, partial: bool, n_classes, class_names):
        """Run the trainer in memory on (X, y_dataset); continue from the stored state
        when `partial` and fitted. Stores the new state."""
        from .trainer import train_in_memory

        cfg = self.make_config(len(X), partial)
        warm = std = None
        if partial and hasattr(self, "_state"):
            meta, arrays = self._state
            warm = (arrays["params"], {"steps": meta["optimizer_steps"],
                                       **{k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}})  # fmt: skip
            std = D.Standardizer(arrays["std.mean"], arrays["std.std"])
        ds = D.Dataset(X, y_dataset, n_classes, IN_MEMORY, class_names=class_names)
        log = (lambda m: print(m, flush=True)) if self.verbose else None
        try:
            trainer = train_in_memory(cfg, ds, self.device, log=log, standardizer=std, warm_start=warm)
        except (ConfigError, DataError, UsageError) as e:
            raise ValueError(str(e)) from None
        except DeviceError as e:
            raise _device_error(e) from None
        except ValueError as e:  # a warm start that does not fit (set_params changed the architecture)
            if warm is None:
                raise
            raise ValueError(f"partial_fit cannot continue this model: {e}; call fit to start again") from None
        meta, arrays = trainer.checkpoint()
        if hasattr(self, "feature_names_in_"):
            meta["feature_names"] = [str(c) for c in self.feature_names_in_]
        self._state = (meta, arrays)
        self._model = (trainer.model, self.device)  # the trained model, already on its device
        curve = [r["train_loss"] for r in trainer.history]
        self.loss_curve_ = (getattr(self, "loss_curve_", []) if partial else []) + curve
        self.n_iter_ = (getattr(self, "n_iter_", 0) if partial else 0) + int(round(trainer.summary["epochs"]))
        return self

    # ---- the model on the device

    def _device_model(self):
        model, device = getattr(self, "_model", (None, None))
        if model is None or device != self.device:  # not built yet, or set_params changed the device
            from .backend import resolve_device
            from .model import MLP

            meta, arrays = self._state
            m = meta["model"]
            try:
                backend, _ = resolve_device(self.device)
            except DeviceError as e:
                raise _device_error(e) from None
            model = MLP(m["sizes"], m["activation"], m["output_activation"], m["loss"], dtype=m["dtype"],
                        seed=m["seed"], init=m["init"], leaky_relu_slope=m["leaky_relu_slope"],
                        label_smoothing=m["label_smoothing"], huber_delta=m["huber_delta"],
                        residual=m["residual"], backend=backend)  # fmt: skip
            model.set_flat_params(arrays["params"])
            self._model = (model, self.device)
        return model

    def _forward(self, X) -> np.ndarray:
        """Network outputs (n, n_out) in float64 for validated features X (n, F). Rows go
        through the network in blocks of a fixed size per device (the last one padded with
        zeros): a GEMM's rounding can depend on its row count, and a fixed shape makes each
        row's output independent of the other rows predicted with it, where the BLAS rounds
        a row the same wherever it stands in the block (OpenBLAS 0.3.31's float32 products
        on an AMD EPYC do not: there the last bits follow the row's place)."""
        meta, arrays = self._state
        model = self._device_model()
        be = model.backend
        rows = PREDICT_BLOCK[model.xp is np]
        x = (X - arrays["std.mean"]) / arrays["std.std"]
        out = []
        for i in range(0, len(x), rows):
            part = x[i : i + rows]
            block = np.zeros((rows, x.shape[1]))
            block[: len(part)] = part
            out.append(be.to_numpy(model.forward(be.asarray(block, dtype=model.dtype)))[: len(part)])
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, model.sizes[-1]))

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_model", None)  # device arrays: rebuilt from _state after unpickling
        return state

    # ---- input

    def _validate_X(self, X, reset: bool) -> np.ndarray:
        if HAVE_SKLEARN:
            return validate_data(self, X, reset=reset, dtype=np.float64)
        return _check_array(self, X, reset)

    def _checkpoint_for_save(self) -> tuple[dict, dict]:
        return self._state

    # ---- files

    def save(self, path: str, overwrite: bool = False) -> None:
        """Write the fitted model as a gpubp checkpoint (`gpubp predict --checkpoint`,
        `gpubp.load` read it). An existing file is replaced only with overwrite=True."""
        check_is_fitted(self)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it")
        meta, arrays = self._checkpoint_for_save()
        save_checkpoint(path, meta, arrays)


def _device_error(e: DeviceError) -> DeviceError:
    """The backend's message in the estimator's words (device=..., not --device)."""
    text = str(e).replace("--device cpu or auto", "device='cpu' or 'auto'").replace("--device gpu", "device='gpu'")
    return DeviceError(text)


def _plain(value):
    """NumPy scalars as Python ones (the config checks Python types)."""
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- the classifier


class MLPClassifier(ClassifierMixin, _MLPBase):
    """A multilayer perceptron classifier trained by gpubp (softmax cross-entropy).

    Parameters mirror scikit-learn's MLPClassifier where gpubp has the same thing, and
    each sets one config key: hidden_layer_sizes -> model.hidden, activation ->
    model.activation (any gpubp activation; 'logistic' means sigmoid), solver ->
    optimizer.name ('adam', 'adamw', 'sgd'), learning_rate_init -> optimizer.lr,
    weight_decay -> optimizer.weight_decay (gpubp's L2 term; scikit-learn's alpha is
    scaled differently), batch_size -> train.batch_size ('auto': min(200, n_samples)),
    max_iter -> train.epochs, early_stopping with validation_fraction and
    n_iter_no_change -> data.val_fraction and train.early_stopping_patience,
    random_state -> train.seed, device -> train.device ('auto', 'cpu', 'gpu'), verbose
    prints the trainer's notes. `config`: any other key, {"section.key": value}, e.g.
    {"schedule.name": "cosine", "model.dtype": "float64"} ([data] is the estimator's).
    Features are standardised with the training statistics (data.standardize).

    Fitted attributes: classes_, n_features_in_, feature_names_in_ (named columns),
    n_iter_ (epochs), loss_curve_ (training loss per epoch).
    """

    _loss = "softmax_cross_entropy"
    _task = "classification"

    def fit(self, X, y):
        """Train from scratch on X (n, F) and labels y (n,) of any sortable kind."""
        X, y = self._validate_fit(X, y, reset=True)
        self.classes_, idx = np.unique(y, return_inverse=True)
        self._check_two_classes()
        return self._train(X, idx.astype(np.int64), False, len(self.classes_), self.classes_.tolist())

    def partial_fit(self, X, y, classes=None):
        """One epoch over (X, y), continuing the current model and optimizer state. The
        first call needs `classes` (every label that will ever appear); the feature
        statistics are those of the first call's X."""
        first = not hasattr(self, "_state")
        if first and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit")
        X, y = self._validate_fit(X, y, reset=first)
        if first:
            self.classes_ = np.unique(np.asarray(classes))
            self._check_two_classes()
        elif classes is not None and not np.array_equal(np.unique(np.asarray(classes)), self.classes_):
            raise ValueError(f"classes={classes!r} is not the same as on the first call ({self.classes_.tolist()})")
        unknown = np.setdiff1d(y, self.classes_)
        if unknown.size:
            raise ValueError(f"y holds labels {unknown.tolist()} that are not in classes {self.classes_.tolist()}")
        idx = np.searchsorted(self.classes_, y).astype(np.int64)
        return self._train(X, idx, True, len(self.classes_), self.classes_.tolist())

    def predict(self, X):
        """The most probable class of each row."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_proba(self, X):
        """(n, n_classes) class probabilities, each row summing to 1."""
        check_is_fitted(self)
        out = self._forward(self._validate_X(X, reset=False))
        loss = self._state[0]["model"]["loss"]
        if loss == "softmax_cross_entropy":
            return _softmax(out)
        if loss == "binary_cross_entropy" and self._state[0]["model"]["output_activation"] == "identity":
            if out.shape[1] == 1:  # one logit: P(class 1) = sigmoid(z)
                p = _sigmoid(out[:, 0])
                return np.stack([1.0 - p, p], axis=1)
            p = _sigmoid(out)  # one logit per class (one-hot targets): normalised
            return p / p.sum(axis=1, keepdims=True)
        raise ValueError(f"predict_proba needs a model trained with a cross-entropy loss; this one used {loss!r}")

    def predict_log_proba(self, X):
        """log predict_proba; for softmax outputs computed as z - logsumexp(z), finite
        where a probability rounds to 0."""
        check_is_fitted(self)
        if self._state[0]["model"]["loss"] != "softmax_cross_entropy":
            return np.log(self.predict_proba(X))
        z = self._forward(self._validate_X(X, reset=False))
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def _validate_fit(self, X, y, reset: bool):
        if HAVE_SKLEARN:
            X, y = validate_data(self, X, y, reset=reset, dtype=np.float64)
            check_classification_targets(y)
            return X, column_or_1d(y, warn=True)
        X = _check_array(self, X, reset)
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or len(y) != len(X):
            raise ValueError(f"y must hold one label per row of X ({len(X)}), got shape {y.shape}")
        return X, y

    def _check_two_classes(self):
        if len(self.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least two classes in y; got 1 class: {self.classes_.tolist()}"
            )


# --------------------------------------------------------------------------- the regressor


class MLPRegressor(RegressorMixin, _MLPBase):
    """A multilayer perceptron regressor trained by gpubp (mean squared error).

    The parameters are MLPClassifier's (see there); `config` may also pick another
    regression loss ({"loss.name": "huber"}). Targets y (n,) or (n, T) are
    standardised with the training statistics while training (so the learning rate
    does not depend on their units); predictions come back in the original units, and
    `save` folds the scaling into the last layer, so the checkpoint predicts them too.

    Fitted attributes: n_features_in_, feature_names_in_, n_outputs_, n_iter_, loss_curve_.
    """

    _loss = "mse"

    def fit(self, X, y):
        X, y = self._validate_fit(X, y, reset=True)
        self._y_mean, self._y_scale = target_scaler(y)
        return self._train(X, (y - self._y_mean) / self._y_scale, False, None, [])

    def partial_fit(self, X, y):
        """One epoch over (X, y), continuing the current model and optimizer state; the
        feature and target statistics are those of the first call."""
        first = not hasattr(self, "_state")
        X, y = self._validate_fit(X, y, reset=first)
        if first:
            self._y_mean, self._y_scale = target_scaler(y)
        elif y.shape[1] != self.n_outputs_:
            raise ValueError(f"y has {y.shape[1]} target columns, but the model predicts {self.n_outputs_}")
        return self._train(X, (y - self._y_mean) / self._y_scale, True, None, [])

    def predict(self, X):
        """Predictions in the units of y: (n,) for a 1-D y, else (n, T)."""
        check_is_fitted(self)
        out = self._forward(self._validate_X(X, reset=False))
        arrays = self._state[1]
        if "target.mean" in arrays:  # a checkpoint whose trainer standardised the targets itself
            out = out * arrays["target.std"] + arrays["target.mean"]
        out = out * self._y_scale + self._y_mean
        return out[:, 0] if self._y_1d else out

    def _validate_fit(self, X, y, reset: bool):
        if HAVE_SKLEARN:
            X, y = validate_data(self, X, y, reset=reset, dtype=np.float64, multi_output=True, y_numeric=True)
        else:
            X = _check_array(self, X, reset)
            y = np.asarray(y, dtype=np.float64)
            if len(y) != len(X) or not np.all(np.isfinite(y)):
                raise ValueError(f"y must hold finite targets for each of the {len(X)} rows of X")
        if reset:
            self._y_1d = y.ndim == 1
        y = y.reshape(len(y), -1).astype(np.float64)
        if reset:
            self.n_outputs_ = y.shape[1]
        return X, y

    def _checkpoint_for_save(self) -> tuple[dict, dict]:
        """The checkpoint with the target scaling folded into the last layer:
        s (x W + b) + m = x (W s) + (b s + m), exact for the identity output."""
        meta, arrays = self._state
        arrays = dict(arrays)
        arrays["params"] = fold_affine(arrays["params"], meta["model"]["sizes"], self._y_scale, self._y_mean)
        return meta, arrays

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"multioutput": True}


def target_scaler(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per target column of y (n, T); a constant column keeps scale 1.
    Training sees (y - mean) / scale."""
    mean = y.mean(axis=0)
    scale = y.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return mean, scale


def fold_affine(params: np.ndarray, sizes: list, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Flat parameters of the same network followed by y -> y * scale + shift: the last
    layer's W (fan_in, T) times scale per column, its b times scale plus shift."""
    out = params.astype(np.float64)
    fan_in, n_out = sizes[-2], sizes[-1]
    b_off = len(out) - n_out
    w_off = b_off - fan_in * n_out
    out[w_off:b_off] = (out[w_off:b_off].reshape(fan_in, n_out) * scale).ravel()
    out[b_off:] = out[b_off:] * scale + shift
    return out.astype(params.dtype)


# --------------------------------------------------------------------------- load


def load(path: str, device: str = "auto"):
    """A fitted MLPClassifier or MLPRegressor from any gpubp checkpoint (`gpubp train`'s
    last.npz / best.npz, or an estimator's `save`). Its parameters are the checkpoint's
    config, so `fit` would train the same way again; classes_ are the stored class
    names (0..C-1 when there are none). Raises gpubp's CheckpointError for a file that
    is not a gpubp checkpoint."""
    meta, arrays = load_checkpoint(path)
    cfg = meta["config"]
    m, t, o, d = cfg["model"], cfg["train"], cfg["optimizer"], cfg["data"]
    classify = meta.get("n_classes") is not None
    cls = MLPClassifier if classify else MLPRegressor
    est = cls(hidden_layer_sizes=tuple(m["hidden"]), activation=m["activation"], solver=o["name"],
              learning_rate_init=o["lr"], weight_decay=o["weight_decay"], batch_size=t["batch_size"],
              max_iter=t["epochs"], early_stopping=t["early_stopping_patience"] > 0,
              validation_fraction=d["val_fraction"] if d["val_fraction"] > 0 else 0.1,
              n_iter_no_change=t["early_stopping_patience"] or 10, random_state=t["seed"], device=device)  # fmt: skip
    mapped = {key for key in PARAM_KEYS.values() if not key.startswith("data.")}
    default = validate({}, "<defaults>").to_dict()
    extra = {f"{s}.{k}": v for s in ("model", "loss", "optimizer", "schedule", "train") for k, v in cfg[s].items()
             if f"{s}.{k}" not in mapped and v != default[s][k] and f"{s}.{k}" != "loss.name"}  # fmt: skip
    if not classify and cfg["loss"]["name"] != "mse":
        extra["loss.name"] = cfg["loss"]["name"]
    est.config = extra or None
    sizes = meta["model"]["sizes"]
    est.n_features_in_ = int(meta["n_features"])
    if meta.get("feature_names"):
        est.feature_names_in_ = np.asarray(meta["feature_names"], dtype=object)
    if classify:
        n = int(meta["n_classes"])
        names = meta.get("class_names") or []
        # integer labels 0..C-1 (stored as nothing, or as their decimal strings) come back as ints
        est.classes_ = np.arange(n) if names in ([], [str(c) for c in range(n)]) else np.asarray(names)
    else:
        est.n_outputs_ = sizes[-1]
        est._y_1d = sizes[-1] == 1
        est._y_mean, est._y_scale = np.zeros(sizes[-1]), np.ones(sizes[-1])  # a checkpoint predicts y's units
    est._state = (meta, arrays)
    est.n_iter_ = int(meta.get("epoch", 0))
    est.loss_curve_ = []
    return est
