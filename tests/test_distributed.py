"""Multi-process training equals one process with the same global batch (CPU, gloo, 2 real processes).

One module fixture starts ``tests/dist_scripts/equivalence.py`` three times, concurrently: as one plain
process (the reference), under ``torchrun`` with 2 processes, and under ``accelerate launch --multi_gpu`` with 2
processes (teacher case only). Each run trains with the real trainers and ``fit`` for 3 optimiser steps
(ResNet18-8 student/teacher at 32 px, glyph subset, global batch 4 classes x 4 images x 2 views, SGD) and
records what the losses saw. BatchNorm runs with ``bn_freeze`` (eval-mode BN): without SyncBatchNorm, which
needs CUDA, each process would normalise its own sub-batch, so train-mode BN is not batch-independent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dmlkd.data.samplers import ClassBalancedBatchSampler, RandomBatchSampler
from dmlkd.engine.distributed import shard_batches, view_major
from dmlkd.transfer import functional
from tests import prestarted

SCRIPT = Path(__file__).parent / "dist_scripts" / "equivalence.py"
ATOL = RTOL = 1e-5  # gloo's all-reduce sums the two halves' gradients in another order than one process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _teacher_checkpoint(folder: Path) -> Path:
    from dmlkd.checkpoints.folder import save_checkpoint
    from dmlkd.models import create_model

    torch.manual_seed(0)
    return save_checkpoint(folder / "teacher", create_model("resnet18-16"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    teacher = str(_teacher_checkpoint(root))
    env = {**os.environ, "HF_HOME": str(root / "hf"), "PYTHONWARNINGS": "ignore"}
    multi_env = {**env, "OMP_NUM_THREADS": "1"}
    launches = {
        "single": ([sys.executable, str(SCRIPT)], env, []),
        "torchrun": (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)],
            multi_env,
            [],
        ),
        "accelerate": (
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "--main_process_port", str(_free_port()), str(SCRIPT)],
            multi_env,
            ["--cases", "teacher"],
        ),
    }  # fmt: skip
    processes = {
        name: prestarted.popen(
            [*command, str(root / name), teacher, *extra],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, (command, environment, extra) in launches.items()
    }
    for name, process in processes.items():
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"{name} failed:\n{output[-4000:]}"
    return {name: root / name for name in launches}


def _assert_states_match(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    assert reference.keys() == other.keys()
    for name, value in reference.items():
        if value.is_floating_point():
            torch.testing.assert_close(other[name], value, atol=ATOL, rtol=RTOL, msg=name)
        else:
            assert torch.equal(other[name], value), name


def _states(run: Path, case: str, ranks: int) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(run / case / f"rank{r}.state.safetensors")) for r in range(ranks)]


def _check_case(runs: dict[str, Path], case: str, launcher: str = "torchrun") -> None:
    (reference,) = _states(runs["single"], case, 1)
    first, second = _states(runs[launcher], case, 2)
    _assert_states_match(reference, first)
    assert first.keys() == second.keys()
    for name, value in first.items():  # the processes hold the same parameters and buffers
        assert torch.equal(second[name], value), name
    moved = [name for name, value in reference.items() if value.is_floating_point()]
    assert moved, "no floating-point state to compare"


# --- No processes needed.


@pytest.mark.parametrize("mode", ["reference", "cover"])
def test_equal_global_batches_sample_identical_indices_for_any_process_count(mode: str) -> None:
    labels = np.repeat(np.arange(12), 9)
    for epoch, start in ((0, 0), (3, 2)):
        slices = {}
        for world in (1, 2, 4):
            per_rank = []
            for rank in range(world):
                sampler = ClassBalancedBatchSampler(labels, 24, 3, seed=7, mode=mode, rank=rank, world_size=world)
                sampler.set_epoch(epoch, start)
                per_rank.append(list(sampler))
            slices[world] = [[pair for part in parts for pair in part] for parts in zip(*per_rank)]
        assert slices[1] == slices[2] == slices[4]


def test_random_sampler_global_batches_do_not_depend_on_process_count() -> None:
    def batches(world: int) -> list[list[tuple[int, int]]]:
        samplers = [RandomBatchSampler(50, 12, seed=3, rank=r, world_size=world) for r in range(world)]
        for sampler in samplers:
            sampler.set_epoch(2)
        return [[pair for part in parts for pair in part] for parts in zip(*samplers)]

    assert batches(1) == batches(2) == batches(3)


def test_view_major_reorder_gives_the_single_process_row_order() -> None:
    views, processes, local = 3, 2, 4
    batch = processes * local
    global_rows = torch.arange(views * batch)  # row i + v * batch is view v of image i
    gathered = torch.cat(  # each process's rows are view-major over its own images
        [torch.cat([global_rows[v * batch + p * local : v * batch + (p + 1) * local] for v in range(views)])
         for p in range(processes)]
    )  # fmt: skip
    assert torch.equal(view_major(gathered, views, processes), global_rows)
    assert torch.equal(view_major(gathered, 1, 1), gathered)


@pytest.mark.parametrize(("items", "batch", "world"), [(256, 48, 2), (256, 256, 2), (10, 3, 4), (7, 2, 8)])
def test_evaluation_shards_are_the_single_process_batches_dealt_round_robin(items: int, batch: int, world: int) -> None:
    single = shard_batches(items, batch, 0, 1)
    shards = [shard_batches(items, batch, rank, world) for rank in range(world)]
    assert sorted(shards_batch for shard in shards for shards_batch in shard) == single
    assert [index for part in single for index in part] == list(range(items))


def test_per_process_relational_loss_is_not_the_global_one() -> None:
    """The negative control: without gathering, 2 x B/2 optimises another objective than 1 x B."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 8, generator=generator), torch.randn(16, 16, generator=generator)
    whole = functional.relaxed_contrastive(student, teacher)
    halves = (
        functional.relaxed_contrastive(student[:8], teacher[:8])
        + functional.relaxed_contrastive(student[8:], teacher[8:])
    ) / 2
    assert not torch.allclose(whole, halves, atol=1e-3)


# --- Two processes (torchrun, accelerate launch) against one.


def test_teacher_proxy_anchor_matches_one_process(runs: dict[str, Path]) -> None:
    _check_case(runs, "teacher")


def test_accelerate_launch_matches_one_process(runs: dict[str, Path]) -> None:
    _check_case(runs, "teacher", launcher="accelerate")


def test_transfer_relaxed_contrastive_online_teacher_matches_one_process(runs: dict[str, Path]) -> None:
    _check_case(runs, "online")


def test_transfer_relaxed_contrastive_cached_teacher_matches_and_cache_is_built_in_parallel(
    runs: dict[str, Path],
) -> None:
    _check_case(runs, "cached")
    (single,) = (runs["single"] / "cached" / "cache").glob("teacher-*.safetensors")
    (parallel,) = (runs["torchrun"] / "cached" / "cache").glob("teacher-*.safetensors")
    assert single.name == parallel.name
    built_once, built_together = load_file(str(single)), load_file(str(parallel))
    assert built_once.keys() == built_together.keys()
    for name, value in built_once.items():  # the 2-process build is bitwise the 1-process one
        assert torch.equal(built_together[name], value), name


def test_crd_heads_proxies_and_memory_match_one_process(runs: dict[str, Path]) -> None:
    _check_case(runs, "crd")
    (reference,) = _states(runs["single"], "crd", 1)
    assert int(reference["method.draws"]) == 3  # one negative draw per step, on every process alike


@pytest.mark.parametrize("case", ["teacher", "online", "cached", "crd"])
def test_losses_see_the_single_process_global_batch(runs: dict[str, Path], case: str) -> None:
    reference = load_file(str(runs["single"] / case / "rank0.rows.safetensors"))
    assert any(name.endswith(".labels") for name in reference)
    for rank in range(2):
        seen = load_file(str(runs["torchrun"] / case / f"rank{rank}.rows.safetensors"))
        assert seen.keys() == reference.keys()
        for name, value in reference.items():
            if value.is_floating_point():  # embeddings (after 0-2 steps) and loss values
                torch.testing.assert_close(seen[name], value, atol=1e-4, rtol=1e-4, msg=name)
            else:  # dataset indices and labels: same rows in the same order
                assert torch.equal(seen[name], value), name
    first_step = {name: value for name, value in reference.items() if name.startswith("step0.")}
    assert first_step and len(next(iter(first_step.values()))) == (16 if case == "cached" else 32)


def test_distributed_evaluation_gives_exactly_the_single_process_numbers(runs: dict[str, Path]) -> None:
    reference = json.loads((runs["single"] / "eval" / "rank0.metrics.json").read_text())
    embeddings = load_file(str(runs["single"] / "eval" / "rank0.embeddings.safetensors"))
    assert set(reference) == {"48", "256"} and "nmi" in reference["48"]
    for rank in range(2):
        assert json.loads((runs["torchrun"] / "eval" / f"rank{rank}.metrics.json").read_text()) == reference
        gathered = load_file(str(runs["torchrun"] / "eval" / f"rank{rank}.embeddings.safetensors"))
        for name, value in embeddings.items():  # 256 rows each, in dataset order, no padded repeats
            assert value.shape[0] == 256 and torch.equal(gathered[name], value), name


def test_run_folder_is_written_once_by_the_main_process(runs: dict[str, Path]) -> None:
    for case in ("teacher", "online"):
        single, multi = runs["single"] / case / "run", runs["torchrun"] / case / "run"
        lines = (multi / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == len((single / "metrics.jsonl").read_text().splitlines()) == 1
        assert json.loads((multi / "run.json").read_text())["status"] == "finished"
        assert json.loads((multi / "state" / "progress.json").read_text())["progress"]["global_step"] == 3
        assert (multi / "last" / "model.safetensors").is_file()


def test_a_later_process_does_not_refuse_the_folder_its_main_process_has_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline's stages start with the process group up: the main process can lock the stage's folder and
    write its ``run.json`` before a slower process reaches the folder check. That process must take the main
    process's decision, not refuse the run it sees (seen: rank 1 exited with "already holds a transfer run
    (running)" and the torchrun pipeline failed under load)."""
    from dmlkd.engine import distributed
    from dmlkd.engine.rundir import RunFolder
    from dmlkd.engine.stage_run import run_in_folder

    out, tree = tmp_path / "run", {"train": {"epochs": 1}}
    opened_by_main = RunFolder.open(out, "transfer", tree, resume=False, overwrite=False)
    sent_by_main = [(None, None), (tree, None)]  # the folder check passed; the opened folder's config
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, src=0: sent_by_main.pop(0))
    try:
        seen = run_in_folder(
            out,
            "transfer",
            resume=False,
            overwrite=False,
            given={},
            device="cpu",
            prepare_new=lambda: tree,
            body=lambda config_tree, run_dir, saved: (config_tree, run_dir),
        )
    finally:
        opened_by_main.close("finished")
    assert seen == (tree, out) and sent_by_main == []
