"""Configuration as plain, typed data.

Configs are nested dataclasses built from JSON-compatible dictionaries. Nothing in a config is ever
executed or imported: values are parsed as data only (``json``), checked against the dataclass field types
and rejected with the dotted path of the bad key. ``--set a.b=value`` overrides are applied to the
dictionary before conversion, so a config file, a recipe and the command line all go through one strict
path. The package is torch-free.

Modules: ``convert`` (the strict converter: ``from_dict``, ``to_dict``, ``convert_options``), ``overrides``
(``--set`` items), ``trees`` (dotted keys, deep merge), ``files`` (``--config`` files, ``--print-config``),
``sections`` (the sections shared by the stages) and ``resolve`` (dataset defaults, the from-scratch rule).
This facade re-exports the names of the documented API and the tests; library code imports the modules.
"""

from __future__ import annotations

from dmlkd.config.convert import convert_options, from_dict, to_dict
from dmlkd.config.files import read_config_file
from dmlkd.config.overrides import apply_overrides, load_config, parse_value
from dmlkd.config.sections import DataConfig, EvalCommandConfig, EvalConfig, OptimConfig, TrainConfig
from dmlkd.config.trees import merge

__all__ = [
    "DataConfig",
    "EvalCommandConfig",
    "EvalConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "convert_options",
    "from_dict",
    "load_config",
    "merge",
    "parse_value",
    "read_config_file",
    "to_dict",
]
