"""dmlkd.pipelines."""

from typing import Any

from dmlkd.lazy import submodule


def __getattr__(name: str) -> Any:
    return submodule(__name__, name)  # e.g. dmlkd.pipelines.<module> without importing it first
