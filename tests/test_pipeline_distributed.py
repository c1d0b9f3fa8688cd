"""``dmlkd pipeline`` under torchrun (2 CPU processes, gloo) gives the single-process run, written once.

Tiny pipelines run once as one process and once under torchrun, with the settings under which training is
comparable (see tests/test_distributed.py): SGD, eval-mode BatchNorm, one view per image for the cached
student. ``compress`` trains its teacher for 3 steps: the two teachers agree to float rounding (gloo sums the
halves' gradients in another order), which can flip the last bit of the fp16 teacher cache, so the students
are compared on a second scenario, ``dim-reduction`` from one shared teacher folder. The student stage is
compared after one step: on this data the relaxed contrastive loss amplifies rounding differences from step
to step (measured: 6e-7 after one step, 2e-4 after two, against a step-two update of 3e-2), while
tests/test_distributed.py checks several exact steps on a well-conditioned batch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import prestarted

pytestmark = pytest.mark.slow

ATOL = RTOL = 1e-5  # gloo sums the two halves' gradients in another order than one process
COMPARABLE = [
    "--device",
    "cpu",
    "--set",
    "data.options.max_classes=16",
    "--max-steps",
    "3",
    "--teacher-epochs",
    "1",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--no-progress",
    *("--set", "teacher.train.ipc=4", "--set", "transfer.train.ipc=4"),
    *("--set", "teacher.eval.nmi=false", "--set", "transfer.eval.nmi=false"),
    *("--set", "teacher.train.eval_at_start=false", "--set", "transfer.teacher.cache_views=2"),
    *("--set", "transfer.train.views=1", "--set", "transfer.train.sampler_mode=cover"),
    *("--set", "transfer.train.max_steps=1", "--set", "transfer.teacher.mode=cached"),
]
for _stage in ("teacher", "transfer"):
    COMPARABLE += [
        *("--set", f"{_stage}.optim.optimizer=sgd", "--set", f"{_stage}.optim.lr=0.01"),
        *("--set", f"{_stage}.optim.momentum=0.9", "--set", f"{_stage}.optim.scheduler=none"),
        *("--set", f"{_stage}.optim.bn_freeze=true", "--set", f"{_stage}.optim.warmup_epochs=0"),
    ]


def _pipeline(out: Path, launcher: list[str], scenario: str = "compress", src: str = "resnet18-16") -> str:
    args = ["pipeline", scenario, "--src", src, "--dst", "resnet18-8", "--out", str(out / "run")]
    args += [*COMPARABLE, "--set", f"transfer.teacher.cache_dir={json.dumps(str(out / 'cache'))}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = prestarted.run(
        [*launcher, "-m", "dmlkd", *args], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("pipeline-distributed")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {
        "single": (root / "single" / "run", _pipeline(root / "single", [sys.executable])),
        "torchrun": (root / "torchrun" / "run", _pipeline(root / "torchrun", torchrun)),
    }
    teacher = str(root / "single" / "run" / "teacher")
    for name, launcher in (("single-dim", [sys.executable]), ("torchrun-dim", torchrun)):
        runs[name] = (root / name / "run", _pipeline(root / name, launcher, "dim-reduction", teacher))
    return runs


def _assert_close(reference: Path, other: Path) -> None:
    expected, actual = load_file(str(reference)), load_file(str(other))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=ATOL, rtol=RTOL, msg=key)


def test_teacher_weights_match_one_process(runs: dict[str, tuple[Path, str]]) -> None:
    single, multi = runs["single"][0], runs["torchrun"][0]
    _assert_close(single / "teacher" / "last" / "model.safetensors", multi / "teacher" / "last" / "model.safetensors")


def test_student_weights_and_metrics_match_one_process(runs: dict[str, tuple[Path, str]]) -> None:
    single, multi = runs["single-dim"][0], runs["torchrun-dim"][0]
    student = Path("students") / "relaxed_contrastive" / "last" / "model.safetensors"
    _assert_close(single / student, multi / student)
    exported = Path("exports") / "relaxed_contrastive" / "model.safetensors"
    _assert_close(single / exported, multi / exported)
    single_results = json.loads((single / "results.json").read_text())
    multi_results = json.loads((multi / "results.json").read_text())
    assert _recalls(multi_results) == pytest.approx(_recalls(single_results), abs=1e-6)


def test_steps_and_report_are_written_once(runs: dict[str, tuple[Path, str]]) -> None:
    single, multi = runs["single"][0], runs["torchrun"][0]
    single_steps = json.loads((single / "pipeline.json").read_text())["steps"]
    multi_steps = json.loads((multi / "pipeline.json").read_text())["steps"]
    assert (
        set(multi_steps)
        == set(single_steps)
        == {
            "teacher",
            "teacher_check",
            "student:relaxed_contrastive",
            "export:relaxed_contrastive",
            "report",
        }
    )
    assert multi_steps["student:relaxed_contrastive"]["teacher_mode"] == "cached"
    assert runs["torchrun"][1].count("report: ") == 1  # one summary, from the main process
    leftovers = [p.name for p in multi.rglob(".*") if "tmp" in p.name or ".old-" in p.name]
    assert leftovers == []


def _recalls(results: dict) -> list[float]:
    """Every Recall@1 in results.json, in document order."""
    found: list[float] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "recall@1" and isinstance(value, float):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(results)
    assert found, "results.json holds no Recall@1"
    return found
