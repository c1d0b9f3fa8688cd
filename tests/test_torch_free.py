"""Config modules and the command line's parsing are torch-free: names and specs are checked before torch loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_TORCH = textwrap.dedent(
    """
    import sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "accelerate", "timm"):
                raise ImportError(f"{name} imported by a module that must be torch-free")
            return None

    sys.meta_path.insert(0, Blocked())
    """
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=60)


def test_config_modules_import_with_torch_blocked() -> None:
    result = _run(
        "import dmlkd.config, dmlkd.teacher.config, dmlkd.transfer.config, dmlkd.pipelines.config\n"
        "import dmlkd.models.spec, dmlkd.cli.options, dmlkd.engine.rundir, dmlkd.pipelines.state\n"
        "import dmlkd.engine.stage_run  # the lock check of a run folder comes before torch\n"
        "from dmlkd.teacher.config import resolve_teacher_config\n"
        "config, given, notes = resolve_teacher_config('pa-cub-resnet50', None, ['optim.lr=0.001'])\n"
        "assert config.optim.lr == 0.001 and config.model.arch == 'resnet50'\n"
    )
    assert result.returncode == 0, result.stderr


def test_the_cli_parses_and_rejects_bad_names_with_torch_blocked(tmp_path) -> None:
    result = _run(
        "from dmlkd.cli import main\n"
        f"main(['teacher', 'train', '--recipe', 'nope', '--out', {str(tmp_path / 'x')!r}])\n"
    )
    assert result.returncode == 2 and "unknown recipe 'nope'" in result.stderr, result.stderr
    assert "must be torch-free" not in result.stderr
