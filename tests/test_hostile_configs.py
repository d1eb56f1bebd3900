"""Hostile configs: every value typed and bounded, refused when the config is read (the same line for a YAML
file, --set and an API dict), before any model trains.

The family is generated from the config schema itself: every int/float setting must carry an upper bound
(a resource limit where nothing else bounds it), and a value just past it is refused, naming its key.
"""

from __future__ import annotations

import math
from typing import get_args

import clitools
import pytest
import yaml
from pydantic import BaseModel

from stardomain import api
from stardomain.config import Config, deep_merge, load_config, validate
from stardomain.errors import UserError

TINY = {"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 8}},
        "train": {"epochs": 1, "batch_size": 64},
        "study": {"n_sources": 2, "n_heldouts": 1, "eval": {"points": 3}, "bootstrap": 100}}


def _bounds(field) -> tuple[float | None, float | None, bool]:
    """(lower, upper, upper is strict) from a pydantic field's constraints."""
    lo = hi = None
    strict = False
    for m in field.metadata:
        for name in ("ge", "gt"):
            if getattr(m, name, None) is not None:
                lo = getattr(m, name)
        if getattr(m, "le", None) is not None:
            hi = m.le
        if getattr(m, "lt", None) is not None:
            hi, strict = m.lt, True
    return lo, hi, strict


def numeric_settings(cls: type[BaseModel] = Config, prefix: tuple = ()):
    """(dotted key, int or float, lower, upper, strict) for every scalar number in the schema, recursively."""
    for name, field in cls.model_fields.items():
        ann = field.annotation
        args = (ann, *get_args(ann))
        sub = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            yield from numeric_settings(sub, (*prefix, name))
            continue
        kind = next((a for a in args if a in (int, float)), None)
        if kind is not None:
            yield (".".join((*prefix, name)), kind, *_bounds(field))


SETTINGS = list(numeric_settings())
# Numbers bounded by their type rather than a field constraint (their bounds are tested below by hand).
OTHERWISE_BOUNDED = {"star.align_every"}


def test_every_number_in_the_config_has_an_upper_bound():
    unbounded = [key for key, _, _, hi, _ in SETTINGS if hi is None and key not in OTHERWISE_BOUNDED]
    assert not unbounded, f"settings without an upper bound (a resource limit): {unbounded}"
    assert len(SETTINGS) > 40  # the walk reached every section (train, star.train, study.eval, ...)


def _past(kind, lo, hi, strict):
    """A value just past the upper bound."""
    if kind is int:
        return int(hi) + (0 if strict else 1)
    return float(hi) * 10 if hi > 0 else 1.0


def _nested(key: str, value) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out




HOSTILE = [(key, _past(kind, lo, hi, strict)) for key, kind, lo, hi, strict in SETTINGS if hi is not None]
HOSTILE += [(key, -1 if lo is None or lo > -1 else lo - 1) for key, kind, lo, hi, strict in SETTINGS
            if lo is not None and kind is int]
HOSTILE += [(key, math.nan) for key, kind, *_ in SETTINGS if kind is float]
HOSTILE += [("star.align_every", 10**10), ("star.align_every", 0), ("study.sweeps.n_sources", [0]),
            ("study.sweeps.n_sources", [2000]), ("study.sweeps.width", [0]), ("study.sweeps.width", [10**9]),
            ("study.sweeps.depth", [10**6]), ("study.sweeps.t_sampling", ["sideways"]),
            ("train.schedule.step_epochs", [10**9]), ("train.optimizer.betas", [0.9, 1.5]),
            ("star.beta", [1e300, 2]), ("study.heldout_train", {"epochs": 10**9}),
            ("study.heldout_train", {"epoch": 3}), ("train.optimizer.lr", 1e308), ("train.optimizer.lr", math.inf),
            ("study.cpus_per_task", 10**9), ("study.bootstrap", 10**12), ("study.eval.points", 10**9),
            ("study.bma_k", 10**9), ("study.sweeps.n_sources", list(range(1, 200)))]


@pytest.mark.parametrize("key,value", HOSTILE, ids=[f"{k}={str(v)[:20]}" for k, v in HOSTILE])
def test_a_hostile_value_is_refused_when_read_the_same_three_ways(key, value, tmp_path):
    raw = deep_merge(TINY, _nested(key, value))
    first = key.split(".")[-1] if key != "study.heldout_train" else "heldout_train"
    with pytest.raises(UserError) as api_err:
        validate(Config, raw)
    assert first in str(api_err.value)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as file_err:
        load_config(path)
    with pytest.raises(UserError) as set_err:
        load_config(None, [f"{k}={_yaml(v)}" for k, v in _flat(raw)])
    for e in (file_err, set_err):  # the same complaint, whatever the way in
        assert str(e.value).split(": ", 1)[1] == str(api_err.value).split(": ", 1)[1]


def _yaml(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).split("\n...")[0].strip()


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.fixture
def no_work(monkeypatch):
    """Any study task, training loop or Starlight run started fails the test."""
    import stardomain.study.executors as executors

    why = "work started before the config was refused"

    def refuse(*_a, **_k):
        raise AssertionError(why)

    monkeypatch.setattr(executors, "execute", refuse)
    monkeypatch.setattr(executors, "execute_unit", refuse)
    clitools.refuse_training(monkeypatch, why)


CLI_CASES = [(k, v) for k, v in HOSTILE if k.startswith(("study.", "train.epochs", "train.optimizer.lr", "star."))]


@pytest.mark.parametrize("key,value", CLI_CASES[::3], ids=[f"{k}={str(v)[:20]}" for k, v in CLI_CASES[::3]])
def test_run_refuses_before_any_model_trains(key, value, tmp_path, monkeypatch, capsys, no_work):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(deep_merge(TINY, _nested(key, value))))
    code, _, err = clitools.run_cli(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "study")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "internal error" not in err, err
    assert not (tmp_path / "study").exists()


def test_train_and_star_refuse_before_training(tmp_path, monkeypatch, capsys, no_work):
    for args in (["train", "--out", tmp_path / "m.safetensors", "--set", "train.epochs=1000000000"],
                 ["train", "--out", tmp_path / "m.safetensors", "--set", "train.optimizer.lr=1e308"],
                 ["star", "--sources", tmp_path / "a", "--out", tmp_path / "s.safetensors",
                  "--set", "star.chunks=100000"]):
        code, _, err = clitools.run_cli(monkeypatch, capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "internal error" not in err, err


@pytest.mark.parametrize("text,words", [
    ("data: {name: digits}\ndata: {name: mnist}\n", ["'data' appears twice", "line 2"]),
    ("model:\n  kwargs: {width: 3, width: 4}\n", ["'width' appears twice"]),
    ("train:\n  optimizer:\n    lr: 0.1\n    lr: 0.2\n", ["'lr' appears twice"]),
    ("train: {epochs: " + "9" * 5000 + "}\n", ["cannot be read", "4300 digits"]),
    ("train: {optimizer: {lr: !!float nope}}\n", ["cannot be read", "nope"]),
    ("train: {optimizer: {lr: 1e308}}\n", ["lr", "less than or equal to 100"]),
    ("train: {optimizer: {lr: .nan}}\n", ["lr", "finite"]),
])
def test_yaml_that_cannot_mean_one_thing_is_one_line(tmp_path, monkeypatch, capsys, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    for command in (["config", path], ["train", "--config", path, "--out", tmp_path / "m.safetensors"]):
        code, _, err = clitools.run_cli(monkeypatch, capsys, *command)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        for w in words:
            assert w in err, err


@pytest.mark.parametrize("override,words", [
    ("train.optimizer.lr=!!float nope", ["--set", "cannot be read"]),
    ("train.epochs=" + "9" * 5000, ["--set", "cannot be read"]),
    ("train.optimizer.lr=1e308", ["lr"]),
    ("study.sweeps.n_sources=[0]", ["n_sources", "greater than or equal to 1"]),
    ("data.kwargs.nonsense=1", ["nonsense"]),
])
def test_set_values_that_cannot_be_read_are_one_line(tmp_path, monkeypatch, capsys, override, words, no_work):
    for command in (["train", "--set", "data.name=digits", "--set", override, "--out", tmp_path / "m.safetensors"],
                    ["run", "--set", "data.name=digits", "--set", override, "--out", tmp_path / "s"]):
        code, _, err = clitools.run_cli(monkeypatch, capsys, *command)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "internal error" not in err, err
        for w in words:
            assert w in err, err


def test_a_5000_digit_integer_in_an_api_dict_is_one_line():
    with pytest.raises(UserError, match="train.epochs.*an integer of"):
        validate(Config, {"train": {"epochs": 10**5000}})
    with pytest.raises(UserError, match="train.epochs"):
        api.train({"data": {"name": "digits"}, "train": {"epochs": 10**5000}})


@pytest.mark.parametrize("kwargs,words", [
    ({"nonsense": 1}, ["unknown key 'nonsense'", "test_fraction"]),
    ({"test_fractio": 0.2}, ["did you mean 'test_fraction'"]),
    ({"split_seed": 3}, ["data.split_seed"]),
])
def test_data_kwargs_are_checked_against_the_data_sets_parameters(kwargs, words, no_work):
    with pytest.raises(UserError) as e:
        api.train({"data": {"name": "digits", "kwargs": kwargs}, "train": {"epochs": 1}})
    for w in words:
        assert w in str(e.value)


def test_model_kwargs_are_checked_against_the_architectures_parameters(no_work):
    with pytest.raises(UserError, match="did you mean 'width'"):
        api.train({"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"widht": 8}}})


def test_data_kwargs_of_mnist_which_takes_none(no_work):
    from stardomain.data import get_dataset

    with pytest.raises(UserError, match="it takes no kwargs"):
        get_dataset({"name": "mnist", "kwargs": {"x": 1}})


def test_sweep_n_sources_zero_is_refused_before_training(tmp_path, monkeypatch, capsys, no_work):
    """The issue's case: everything trained, then a message about an option run does not have."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(deep_merge(TINY, {"study": {"sweeps": {"n_sources": [0]}}})))
    code, _, err = clitools.run_cli(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "s")
    assert code == 2 and "study.sweeps.n_sources" in err and "--sources" not in err, err
