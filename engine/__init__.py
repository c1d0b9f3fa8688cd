"""dmlkd.engine."""

from typing import Any


def __getattr__(name: str) -> Any:
    from dmlkd import _submodule

    return _submodule(__name__, name)  # e.g. dmlkd.engine.<module> without importing it first
