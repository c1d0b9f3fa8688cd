"""Divide and conquer: cluster sampler, learner slices and masks, reclustering and resume, CLI wiring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

from dmlkd.cli import main
from dmlkd.config import from_dict
from dmlkd.data.base import ArrayImageCollection, DatasetSplits
from dmlkd.errors import ConfigError
from dmlkd.models.outputs import ModelOutput
from dmlkd.teacher.config import TeacherConfig
from dmlkd.teacher.divide import (
    ClusterBatchSampler,
    DivideCriterion,
    DivideSchedule,
    DivideTeacherModule,
    align_clusters,
    check_divisible,
    divide_param_groups,
    slice_indicator,
)


class Recorder(nn.Module):
    """A loss that remembers its input and returns a differentiable scalar touching every input column."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.seen = embeddings
        return (embeddings * torch.arange(1, embeddings.shape[1] + 1)).sum() + embeddings.pow(2).sum()


class TinyNet(nn.Module):
    """Mean colour -> linear -> D: enough to embed and cluster images in tests."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Identity()
        self.embedding = nn.Linear(3, dim)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        pooled = images.mean(dim=(2, 3))
        return ModelOutput(embedding=self.embedding(pooled), pooled=pooled)


def labels_and_clusters() -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(8), 6)  # 8 classes x 6 images
    assignment = (labels >= 5).astype(np.int64)  # cluster 0: classes 0-4 (30 images), cluster 1: 5-7 (18)
    return labels, assignment


def make_sampler(seed: int = 3, world_size: int = 1, rank: int = 0) -> ClusterBatchSampler:
    labels, assignment = labels_and_clusters()
    sampler = ClusterBatchSampler(labels, 8, 2, num_batches=6, seed=seed, rank=rank, world_size=world_size)
    sampler.set_assignment(assignment)
    return sampler


def test_batches_come_from_one_cluster_and_adapt_p() -> None:
    labels, assignment = labels_and_clusters()
    sampler = make_sampler()
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    for number, batch in enumerate(batches):
        positions = [index for index, _ in batch]
        assert len(positions) == 8
        clusters = set(assignment[positions].tolist())
        assert clusters == {sampler.batch_cluster(number)}
        classes = set(labels[positions].tolist())
        assert len(classes) == (4 if clusters == {0} else 3)  # P = 4, or all 3 classes of cluster 1
    assert {sampler.batch_cluster(b) for b in range(40)} == {0, 1}


def test_cluster_choice_follows_cluster_size() -> None:
    labels = np.repeat(np.arange(8), 4)
    sampler = ClusterBatchSampler(labels, 4, 2, num_batches=2000, seed=0)
    sampler.set_assignment((labels >= 6).astype(np.int64))  # 24 vs 8 images
    share = np.mean([sampler.batch_cluster(b) == 0 for b in range(2000)])
    assert share == pytest.approx(0.75, abs=0.04)


def test_sampler_is_reproducible_and_resumable() -> None:
    first, second = make_sampler(), make_sampler()
    first.set_epoch(2)
    second.set_epoch(2)
    assert list(first) == list(second)
    second.set_epoch(2, start_batch=4)
    assert list(second) == list(first)[4:]
    second.set_epoch(3)
    assert list(second) != list(first)
    halves = [make_sampler(world_size=2, rank=r) for r in (0, 1)]
    for half in halves:
        half.set_epoch(2)
    joined = [a + b for a, b in zip(*(list(h) for h in halves))]
    assert joined == list(first)


def test_constant_batches_per_epoch_whatever_the_clusters() -> None:
    labels, _ = labels_and_clusters()
    sampler = ClusterBatchSampler(labels, 8, 2, num_batches=6, seed=0)
    for assignment in (np.zeros(48, dtype=np.int64), (labels % 3).astype(np.int64), (labels >= 2).astype(np.int64)):
        sampler.set_assignment(assignment)
        assert len(list(sampler)) == 6


def test_align_clusters_undoes_a_renaming() -> None:
    previous = np.array([0, 0, 1, 1, 2, 2, 2])
    current = np.array([2, 2, 0, 0, 1, 1, 0])  # renamed, one point moved
    assert align_clusters(previous, current, 3).tolist() == [0, 0, 1, 1, 2, 2, 1]


def test_fixed_slice_learner_sees_only_its_slice() -> None:
    learners = [Recorder(), Recorder()]
    criterion = DivideCriterion(learners, Recorder(), embedding_dim=6, num_train=10)
    criterion.assignment.copy_(torch.tensor([0] * 5 + [1] * 5))
    embedding = torch.randn(4, 6, requires_grad=True)
    terms = criterion(embedding, torch.tensor([0, 0, 1, 1]), torch.tensor([5, 6, 7, 9]))
    terms["loss"].backward()
    assert torch.equal(learners[1].seen, embedding[:, 3:].detach())
    assert not hasattr(learners[0], "seen")
    assert torch.all(embedding.grad[:, :3] == 0) and torch.all(embedding.grad[:, 3:] != 0)
    assert "learner_1" in terms
    with pytest.raises(RuntimeError, match="mixes clusters"):
        criterion(embedding, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 6, 7, 9]))
    criterion.full_phase.fill_(True)
    criterion(embedding, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 6, 7, 9]))
    assert criterion.full.seen.shape == (4, 6)


def test_masks_get_gradients_and_the_l1_term() -> None:
    criterion = DivideCriterion([Recorder(), Recorder()], Recorder(), 4, 6, masks=True, masking_lambda=0.5)
    assert torch.equal(torch.stack(list(criterion.masks)), slice_indicator(2, 4))
    criterion.masks[0].data[3] = -1.0  # relu: a negative mask entry switches the dimension off
    embedding = torch.randn(3, 4, requires_grad=True)
    terms = criterion(embedding, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    expected_l1 = 0.5 * criterion.masks[0].detach().abs().mean()
    assert terms["mask_l1"] == pytest.approx(float(expected_l1))
    seen = criterion.learners[0].seen
    assert seen.shape == (3, 4) and torch.all(seen[:, 2:] == 0)
    terms["loss"].backward()
    assert criterion.masks[0].grad is not None and criterion.masks[0].grad[:2].abs().sum() > 0
    assert criterion.masks[1].grad is None  # the other learner's mask is not touched
    module = DivideTeacherModule(TinyNet(4), criterion, "recorder")
    config = from_dict(TeacherConfig, {"divide": {"nb_clusters": 2, "masks": True}, "train": {"ipc": 2}})
    groups = {name: (params, mult) for name, params, mult in divide_param_groups(module, config)}
    assert groups["masks"][1] == 100.0 and len(groups["masks"][0]) == 2
    assert not any(p is criterion.masks[0] for p in groups["loss"][0])


def test_dimension_not_divisible_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not divisible") as info:
        from_dict(
            TeacherConfig,
            {"model": {"arch": "resnet18", "embedding_dim": 16}, "divide": {"nb_clusters": 3}, "train": {"ipc": 4}},
        )
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="--ipc"):
        from_dict(TeacherConfig, {"model": {"arch": "resnet18", "embedding_dim": 16}, "divide": {"nb_clusters": 2}})
    assert check_divisible(16, 4) == 4


def schedule_parts(tmp_seed: int = 0) -> tuple[DivideSchedule, DivideCriterion]:
    rng = np.random.default_rng(tmp_seed)
    labels = np.repeat(np.arange(6), 4)
    colours = np.where(labels[:, None] < 3, 40, 210) + rng.integers(0, 30, (24, 3))  # two colour groups
    images = np.broadcast_to(colours[:, None, None, :], (24, 8, 8, 3)).astype(np.uint8).copy()
    collection = ArrayImageCollection(images, [str(i) for i in range(24)], labels)
    splits = DatasetSplits("toy", collection, collection)
    config = from_dict(
        TeacherConfig,
        {
            "model": {"arch": "resnet18", "embedding_dim": 4},
            "divide": {"nb_clusters": 2, "mod_epoch": 2, "force_full_embedding_epoch": 4},
            "train": {"batch_size": 4, "ipc": 2, "epochs": 6, "progress": False},
            "eval": {"image_size": 8},
        },
    )
    torch.manual_seed(0)
    model = TinyNet(4)
    with torch.no_grad():
        model.embedding.weight.copy_(torch.tensor([[1.0, 1, 1], [1, -1, 0], [0, 1, -1], [-1, 0, 1]]))
    criterion = DivideCriterion([Recorder(), Recorder()], Recorder(), 4, 24)
    sampler = ClusterBatchSampler(labels, 4, 2, num_batches=6, seed=1)
    schedule = DivideSchedule(config, criterion, model, splits, lambda e, s: ("normal", e, s), sampler, sampler)
    return schedule, criterion


def test_reclustering_stores_the_assignment_and_resume_keeps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    schedule, criterion = schedule_parts()
    loader = schedule(0, 0)
    assert int(criterion.assignment_epoch) == 0 and not bool(criterion.full_phase)
    assignment = criterion.assignment.clone()
    groups = {tuple(sorted(set(assignment[:12].tolist()))), tuple(sorted(set(assignment[12:].tolist())))}
    assert groups == {(0,), (1,)}  # the two colour groups are the two clusters
    batches = list(loader)
    assert len(batches) == 6
    for batch in batches:
        assert len({int(assignment[i]) for i, _ in batch}) == 1

    # Resume in the middle of epoch 0 (and at the start of epoch 1): the saved assignment is used, unchanged.
    resumed, resumed_criterion = schedule_parts()
    resumed_criterion.load_state_dict(criterion.state_dict())
    resumed_criterion.assignment.copy_(1 - assignment)  # a distinct saved assignment, to see it is kept
    saved = resumed_criterion.assignment.clone()
    calls = []
    monkeypatch.setattr(resumed, "recluster", lambda epoch: calls.append(epoch))
    tail = list(resumed(0, 3))
    assert calls == [] and torch.equal(resumed_criterion.assignment, saved)
    assert tail == list(_with_assignment(saved.numpy()))[3:]  # the rest of epoch 0 from the saved clusters
    resumed(1, 0)
    assert calls == []  # epoch 1 is not a division epoch (mod_epoch 2)
    resumed(2, 0)
    assert calls == [2]
    assert resumed(4, 1) == ("normal", 4, 1) and bool(resumed_criterion.full_phase)  # full embedding from 4


def _with_assignment(assignment: np.ndarray) -> ClusterBatchSampler:
    sampler = ClusterBatchSampler(np.repeat(np.arange(6), 4), 4, 2, num_batches=6, seed=1)
    sampler.set_assignment(assignment)
    sampler.set_epoch(0)
    return sampler


def test_teacher_run_with_divide_and_conquer(tmp_path: Path, tiny_glyph_args: list[str]) -> None:
    out = tmp_path / "run"
    args = ["teacher", "train", "--out", str(out), "--loss", "margin", "--nb-clusters", "2", "--mod-epoch", "1"]
    result = CliRunner().invoke(main, [*args, "--epochs", "1", "--max-steps", "3", *tiny_glyph_args])
    assert result.exit_code == 0, result.output
    assert "R@1" in result.output
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["divide"]["nb_clusters"] == 2 and saved["divide"]["mod_epoch"] == 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= metrics[-1]["recall@1"] <= 1.0
    state = load_file(str(out / "last" / "loss.safetensors"))
    assert int(state["assignment_epoch"]) == 0 and set(state["assignment"].tolist()) == {0, 1}
    assert int(state["learners.0.sampling_step"]) + int(state["learners.1.sampling_step"]) == 3
    assert int(state["full.sampling_step"]) == 0
