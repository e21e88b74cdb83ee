"""Config loading and validation: the promised messages, JSON, --set, defaults."""

import json

import pytest

from gpubp.config import SCHEMA, dump_toml, load_config, parse_override
from gpubp.errors import ConfigError


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_fill_every_key(tmp_path):
    cfg = load_config(write(tmp_path, "[model]\nhidden = [32]\n"))
    for section, fields in SCHEMA.items():
        for key, f in fields.items():
            expected = [32] if (section, key) == ("model", "hidden") else f.default
            assert cfg.sections[section][key] == expected
    assert cfg.model.hidden == [32] and cfg.train.epochs == 200


@pytest.mark.parametrize(
    "text,message",
    [
        ("[optimizer]\nlrr = 0.1\n", "unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?"),
        ("[trian]\nepochs = 1\n", "unknown section [trian]; did you mean 'train'?"),
        ("[train]\nepochs = 2.5\n", "train.epochs: expected an integer, got 2.5 (float)"),
        ("[train]\nbatch_size = 0\n", "train.batch_size: must be >= 1, got 0"),
        ("[optimizer]\nlr = -0.1\n", "optimizer.lr: must be > 0, got -0.1"),
        ('[optimizer]\nlr = "fast"\n', "optimizer.lr: expected a number, got 'fast' (str)"),
        ('[model]\nactivation = "rleu"\n', "model.activation: unknown value 'rleu'; did you mean 'relu'?"),
        ("[model]\nhidden = [64, 0]\n", "model.hidden[1]: must be >= 1, got 0"),
        ("[model]\nhidden = 64\n", "model.hidden: expected a list of integers"),
        ("[train]\nshuffle = true\n", "unknown key 'train.shuffle'"),
        ("[data]\nval_fraction = 0.5\ntest_fraction = 0.5\n", "leaves no training data"),
        ("[optimizer]\nnesterov = true\n", "optimizer.nesterov needs"),
        ("[data]\nval_fraction = 0.0\n[train]\nearly_stopping_patience = 3\n", "needs a validation split"),
        ('[data]\ndataset = "csv"\n', "needs data.path"),
        ("[optimizer\nlr = 1\n", "invalid TOML"),
    ],
)
def test_errors_name_file_key_and_fix(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)
    assert str(e.value).startswith(path)
    assert "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file 'nope.toml' not found"):
        load_config("nope.toml")


def test_json_config_and_error(tmp_path):
    cfg = load_config(write(tmp_path, json.dumps({"optimizer": {"lr": 0.5}}), "c.json"))
    assert cfg.optimizer.lr == 0.5
    with pytest.raises(ConfigError, match=r"c2.json:1: invalid JSON"):
        load_config(write(tmp_path, "{oops", "c2.json"))


def test_overrides(tmp_path):
    path = write(tmp_path, "[optimizer]\nlr = 0.1\n")
    cfg = load_config(path, ["optimizer.lr=0.02", "model.hidden=[8, 4]", "model.activation=tanh",
                             "optimizer.nesterov=false"])  # fmt: skip
    assert cfg.optimizer.lr == 0.02 and cfg.model.hidden == [8, 4] and cfg.model.activation == "tanh"
    assert parse_override('data.path="a b.csv"') == ("data", "path", "a b.csv")
    with pytest.raises(ConfigError, match="unknown key 'optimizer.lrate'; did you mean 'optimizer.lr'"):
        load_config(path, ["optimizer.lrate=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(path, ["train.epochs=ten"])


def test_relative_data_path_resolves_against_config_folder(tmp_path):
    sub = tmp_path / "cfgs"
    sub.mkdir()
    cfg = load_config(write(sub, '[data]\ndataset = "npz"\npath = "../d.npz"\n'))
    assert cfg.data_path() == str(tmp_path / "d.npz")


def test_dump_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, '[model]\nhidden = [3]\n[data]\npath = "a\\"b"\n'))
    again = load_config(write(tmp_path, dump_toml(cfg), "d.toml"))
    assert again.to_dict() == cfg.to_dict()


def test_readme_config_reference_is_current():
    import os

    from gpubp.config import reference_markdown

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert reference_markdown() in readme, "README.md's config reference is stale: paste reference_markdown()"
