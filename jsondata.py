"""Reading JSON written by others (checkpoint configs, run folders, resume states) as bounded data.

``json.loads`` recurses once per nesting level, so a file nested a few thousand levels deep ends in a
``RecursionError`` instead of a readable error. ``loads`` measures the nesting first (without recursion) and
refuses anything deeper than ``MAX_DEPTH``, which is far beyond what dmlkd itself writes. Torch-free.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def nesting_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of JSON ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub('""', text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads(text: str, source: str, error: type[Exception], max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(text)``; malformed or too deeply nested JSON raises ``error`` with one line naming ``source``."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise error(f"{source} is nested {depth:,} levels deep; at most {max_depth} are accepted (a damaged file?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as problem:
        raise error(f"{source} is not valid JSON: {problem}") from None
    except RecursionError:  # pragma: no cover - nesting_depth guards it
        raise error(f"{source} is nested too deeply") from None
