"""The [sweep] table: expansion (grid, zip), groups, errors naming key and value."""

from __future__ import annotations

import itertools

import pytest

from gpubp.config import load_config
from gpubp.errors import ConfigError
from gpubp.sweep import format_table


def _write(tmp_path, text):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return str(path)


def test_grid_is_the_product_last_key_fastest(tmp_path):
    cfg = load_config(
        _write(
            tmp_path,
            '[sweep]\n"optimizer.lr" = [0.1, 0.2, 0.3]\n"train.seed" = [4, 5]\n"optimizer.weight_decay" = [0, 1e-4]\n',
        )  # fmt: skip
    )
    got = [(m.cfg.optimizer.lr, m.cfg.train.seed, m.cfg.optimizer.weight_decay) for m in cfg.sweep.members]
    assert got == list(itertools.product([0.1, 0.2, 0.3], [4, 5], [0.0, 1e-4]))
    assert [m.index for m in cfg.sweep.members] == list(range(12))
    assert len(cfg.sweep.groups()) == 1  # all batched keys: one stack
    # everything not swept is the base config's
    assert all(m.cfg.model.hidden == cfg.model.hidden for m in cfg.sweep.members)


def test_zip_pairs_the_lists(tmp_path):
    cfg = load_config(_write(tmp_path, '[sweep]\nmode = "zip"\n"optimizer.lr" = [0.1, 0.2]\n"train.seed" = [7, 8]\n'))
    assert [(m.cfg.optimizer.lr, m.cfg.train.seed) for m in cfg.sweep.members] == [(0.1, 7), (0.2, 8)]


def test_nested_table_spelling_is_the_same_sweep(tmp_path):
    a = load_config(_write(tmp_path, '[sweep]\n"optimizer.lr" = [0.1, 0.2]\n'))
    b = load_config(_write(tmp_path, "[sweep]\noptimizer.lr = [0.1, 0.2]\n"))
    assert [m.cfg.optimizer.lr for m in a.sweep.members] == [m.cfg.optimizer.lr for m in b.sweep.members]


def test_shape_changing_keys_split_into_groups(tmp_path):
    cfg = load_config(
        _write(tmp_path, '[sweep]\n"model.hidden" = [[16], [32], [16, 16]]\n"optimizer.lr" = [0.1, 0.2]\n')
    )
    groups = cfg.sweep.groups()
    assert [[m.index for m in g] for g in groups] == [[0, 1], [2, 3], [4, 5]]
    for g in groups:
        assert len({tuple(m.cfg.model.hidden) for m in g}) == 1
    # momentum on/off changes the update's ops: two groups
    cfg = load_config(_write(tmp_path, '[optimizer]\nname = "sgd"\n[sweep]\n"optimizer.momentum" = [0, 0.9, 0.5]\n'))
    assert [[m.index for m in g] for g in cfg.sweep.groups()] == [[0], [1, 2]]


@pytest.mark.parametrize(
    "table, message",
    [
        ('"optimizer.lr" = [0.1, -1]', "[sweep] optimizer.lr[1]: must be > 0, got -1"),
        ('"optimizer.lrr" = [0.1]', "[sweep] unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?"),
        ('"optimizer.lr" = 0.1', "[sweep] optimizer.lr: expected a non-empty list"),
        ('"optimizer.lr" = []', "[sweep] optimizer.lr: expected a non-empty list"),
        ('"model.activation" = ["relu", "rleu"]', "[sweep] model.activation[1]: unknown value 'rleu'"),
        ('"train.device" = ["cpu"]', "[sweep] train.device cannot be swept"),
        ('mode = "grd"\n"optimizer.lr" = [0.1]', "sweep.mode: unknown value 'grd'"),
        ('mode = "zip"\n"optimizer.lr" = [0.1]\n"train.seed" = [1, 2]', "optimizer.lr has 1, train.seed has 2"),
        ("", "[sweep] lists no keys"),
    ],
)
def test_errors_name_key_and_value(tmp_path, table, message):
    path = _write(tmp_path, f"[sweep]\n{table}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value) and path in str(e.value)


def test_member_cross_check_names_the_member(tmp_path):
    path = _write(tmp_path, '[optimizer]\nname = "adam"\n[sweep]\n"optimizer.nesterov" = [false, true]\n')
    with pytest.raises(ConfigError, match=r"sweep member 1: optimizer.nesterov=True\): optimizer.nesterov needs"):
        load_config(path)


def test_config_show_prints_the_grid(tmp_path):
    from click.testing import CliRunner

    from gpubp.cli import main

    path = _write(tmp_path, '[sweep]\n"optimizer.lr" = [0.1, 0.2]\n"model.hidden" = [[8], [9]]\n')
    result = CliRunner().invoke(main, ["config", "show", path])
    assert result.exit_code == 0, result.output
    assert '"optimizer.lr" = [0.1, 0.2]' in result.output
    assert format_table(load_config(path).sweep) in result.output
    assert "4 models in 2 groups" in result.output


def test_a_config_without_sweep_has_none():
    assert load_config(None).sweep is None
