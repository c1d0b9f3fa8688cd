"""The command line is a layer of its own: only ``dmlkd/cli/`` knows click, and no library module imports it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_LIBRARY = {"tests", "bench", "build", "docs", "cli"}


def _library_files() -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*.py")):
        top = path.relative_to(ROOT).parts[0]
        if top not in NOT_LIBRARY and not top.startswith(".") and path.name != "__main__.py":
            files.append(path)
    return files


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_library_modules_never_import_click_or_the_cli() -> None:
    offenders = {}
    for path in _library_files():
        bad = {
            name for name in _imported_modules(path) if name.split(".")[0] == "click" or name.startswith("dmlkd.cli")
        }
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"library modules importing the command line layer: {offenders}"


def test_every_click_command_lives_in_the_cli_package() -> None:
    commands = [path for path in (ROOT / "cli").glob("*.py") if "import click" in path.read_text(encoding="utf-8")]
    assert len(commands) >= 8  # app, options and the command modules
    assert len(_library_files()) > 50  # the walk really covers the library
