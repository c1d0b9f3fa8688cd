"""The ``dmlkd`` command line: every click command of the project lives in this package.

Commands are thin: they parse options into a typed config and call one library function. The library never
imports click (a test checks it). Torch and torchvision are imported inside command bodies only, so
``dmlkd --help`` and ``dmlkd --version`` stay fast and torch-free: that laziness belongs here and nowhere else.

Each module registers its commands on ``main`` with ``@main.command`` / ``@main.group``; importing this
package imports them all.
"""

from __future__ import annotations

from dmlkd.cli import (  # noqa: F401  (registration)
    cache,
    catalog,
    evaluate,
    hub,
    inference,
    pipeline,
    teacher,
    transfer,
)
from dmlkd.cli.app import main

__all__ = ["main"]
