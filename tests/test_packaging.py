"""Guards for mapping the repository root to the import package ``dmlkd`` (style-and-packaging §3.3)."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"tests", "build", "dist", "bench", "docs", "runs", ".ci", ".git"}


def _listed_packages() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return {line.strip() for line in parser["options"]["packages"].splitlines() if line.strip()}


def _package_folders() -> set[str]:
    found = {"dmlkd"}
    for init in ROOT.rglob("__init__.py"):
        relative = init.parent.relative_to(ROOT)
        if relative.parts and (
            relative.parts[0] in SKIP_DIRS
            or relative.parts[0].startswith(".")
            or relative.parts[0].endswith(".egg-info")
        ):
            continue
        if relative.parts:
            found.add(".".join(("dmlkd", *relative.parts)))
    return found


def test_packages_list_matches_folders() -> None:
    assert _listed_packages() == _package_folders()


def test_no_tests_init_and_importlib_mode() -> None:
    assert not (ROOT / "tests" / "__init__.py").exists()
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    assert "--import-mode=importlib" in parser["tool:pytest"]["addopts"]


def test_root_python_files_are_package_modules() -> None:
    allowed = {
        "__init__.py",
        "__main__.py",
        "devices.py",
        "errors.py",
        "hub_access.py",
        "jsondata.py",
        "numerics.py",
        "lazy.py",
        "paths.py",
        "registry.py",
        "version.py",
    }
    assert {p.name for p in ROOT.glob("*.py")} <= allowed


def test_no_bare_top_level_imports() -> None:
    pattern = re.compile(
        r"^\s*(from|import) (teacher|student|transfer|pipelines|checkpoints|models|data|"
        r"evaluation|engine|registry|config|errors|cli)\b",
        re.MULTILINE,
    )
    offenders = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in SKIP_DIRS or relative.parts[0].startswith("."):
            continue
        if pattern.search(path.read_text()):
            offenders.append(str(relative))
    assert offenders == []


def test_root_init_uses_absolute_imports() -> None:
    text = (ROOT / "__init__.py").read_text()
    assert not re.search(r"^\s*from \.", text, re.MULTILINE)


def test_help_and_version_do_not_import_torch() -> None:
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom dmlkd.cli import main\n"
        "r1 = CliRunner().invoke(main, ['--help'])\nr2 = CliRunner().invoke(main, ['--version'])\n"
        "assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_version_matches_package() -> None:
    import dmlkd

    result = subprocess.run([sys.executable, "-m", "dmlkd", "--version"], capture_output=True, text=True, check=True)
    assert dmlkd.__version__ in result.stdout
