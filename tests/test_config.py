"""Strict config parsing: overrides, types, unknown keys, round trips."""

from __future__ import annotations

import pytest

from dmlkd.config import (
    DataConfig,
    EvalCommandConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_value,
    to_dict,
)
from dmlkd.errors import ConfigError


def test_parse_value_types() -> None:
    assert parse_value("3") == 3
    assert parse_value("1e-4") == pytest.approx(1e-4)
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("resnet50") == "resnet50"


def test_overrides_nested_and_typed() -> None:
    config = load_config(
        EvalCommandConfig,
        {"checkpoint": "x"},
        ["eval.metric=euclidean", "data.options.verify_counts=false", "eval.ks=[1,10]"],
    )
    assert config.eval.metric == "euclidean"
    assert config.data.options == {"verify_counts": False}
    assert config.eval.ks == [1, 10]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.metrc=cosine", "unknown config key eval.metrc"),
        ("eval.metric=manhattan", "'manhattan' is not valid; choose from: cosine, euclidean"),
        ("eval.batch_size=abc", "eval.batch_size: expected an integer"),
        ("eval.batch_size=0", "eval.batch_size must be a positive integer"),
        ("nokey", "--set expects KEY=VALUE"),
        ("eval..metric=x", "malformed key"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(EvalCommandConfig, {}, [override])


def test_round_trip() -> None:
    config = EvalCommandConfig(checkpoint="runs/x", data=DataConfig(name="cub", root="/data"))
    assert from_dict(EvalCommandConfig, to_dict(config)) == config


def test_apply_overrides_does_not_mutate() -> None:
    base = {"a": {"b": 1}}
    result = apply_overrides(base, ["a.b=2"])
    assert base == {"a": {"b": 1}} and result == {"a": {"b": 2}}


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (OptimConfig, {"lr": 0.0}, "learning rate must be positive"),
        (OptimConfig, {"lr": -1.0}, "learning rate must be positive"),
        (TrainConfig, {"epochs": 0}, "epochs must be a positive integer"),
        (TrainConfig, {"epochs": -3}, "epochs must be a positive integer"),
        (TrainConfig, {"image_size": 0}, "image-size must be a positive integer"),
        (TrainConfig, {"batch_size": 10, "ipc": 4}, "not a multiple of ipc"),
        (TrainConfig, {"crop_scale": [0.5, 0.2]}, "crop_scale"),
    ],
)
def test_section_validation(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cls(**kwargs)
