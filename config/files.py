"""Reading ``--config`` files (YAML with a safe loader, or JSON) and writing ``--print-config`` YAML.

This module is torch-free; YAML is imported only when a YAML file is read or written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dmlkd.jsondata as jsondata
from dmlkd.errors import ConfigError


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path``; a missing or malformed file is a ``ConfigError`` naming it."""

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {error}") from None
    data = jsondata.loads(text, f"config file {str(path)!r}", ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object")
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``--config`` file: YAML (``.yaml``/``.yml``, read with a safe loader, no tags) or JSON.

    YAML is what the field's configs are written in (timm, OML, torchdistill); JSON is accepted as well,
    and ``--print-config`` writes YAML that reads back to the same values.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {error}") from None
    if path.suffix.lower() == ".json":
        return read_json(path)
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML{line}: {getattr(error, 'problem', error)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (e.g. train: {{epochs: 2}})")
    return json.loads(json.dumps(data))


def dump_config(tree: Mapping[str, Any]) -> str:
    """The config as YAML, in a form ``read_config_file`` reads back to an equal tree."""
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(tree)), sort_keys=False, default_flow_style=False, width=120)
