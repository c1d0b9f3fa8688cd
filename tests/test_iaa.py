"""Intra-class adaptive augmentation: statistics, neighbour correction, synthesis, wiring into the trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch.nn import functional as F

from dmlkd.cli import main
from dmlkd.teacher.iaa import IntraClassAugmentation, lambda_schedule


class Recorder(torch.nn.Module):
    """A base loss that remembers what it was given and returns a differentiable scalar."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.seen = (embeddings, labels)
        return embeddings.pow(2).sum(dim=1).mean() + embeddings[:, 0].sum()


def test_statistics_follow_the_weighted_update() -> None:
    iaa = IntraClassAugmentation(Recorder(), num_classes=3, embedding_dim=4, momentum=0.2)
    first = torch.randn(5, 4, dtype=torch.float64)
    iaa.update_statistics(first, torch.zeros(5, dtype=torch.long))
    assert torch.allclose(iaa.class_mean[0].double(), first.mean(0), atol=1e-6)
    assert torch.allclose(iaa.class_var[0].double(), first.var(0, unbiased=False), atol=1e-6)
    second = torch.randn(3, 4, dtype=torch.float64) + 2
    old_mean, old_var = iaa.class_mean[0].double().clone(), iaa.class_var[0].double().clone()
    iaa.update_statistics(second, torch.zeros(3, dtype=torch.long))
    weight = max(3 / 8, 0.8)  # the momentum clamp keeps following the moving embedding
    mean, var = second.mean(0), second.var(0, unbiased=False)
    expected_var = (1 - weight) * old_var + weight * var + weight * (1 - weight) * (old_mean - mean) ** 2
    assert torch.allclose(iaa.class_var[0].double(), expected_var, atol=1e-6)
    assert torch.allclose(iaa.class_mean[0].double(), (1 - weight) * old_mean + weight * mean, atol=1e-6)
    assert iaa.class_count.tolist() == [8, 0, 0]


def test_neighbour_correction_matches_the_formula() -> None:
    torch.manual_seed(0)
    iaa = IntraClassAugmentation(Recorder(), 4, 3, neighbors=2, beta=0.1, gamma=0.1, count_limit=40)
    iaa.class_mean.copy_(torch.randn(4, 3))
    iaa.class_var.copy_(torch.rand(4, 3))
    iaa.class_count.copy_(torch.tensor([2.0, 50.0, 5.0, 10.0]))
    iaa.refresh_correction()
    counts, means, variances = iaa.class_count, iaa.class_mean, iaa.class_var
    global_var = sum(variances[c] * counts[c] for c in range(4)) / counts.sum()
    mean_dist, var_dist = torch.cdist(means, means), torch.cdist(variances, variances)
    for c in range(4):
        others = sorted((k for k in range(4) if k != c), key=lambda k: float(mean_dist[c, k]))[:2]

        def norm(row: torch.Tensor, k: int) -> float:
            return float((row[k] - row.min()) / (row.max() - row.min()))

        weights = [
            math.exp(-(norm(mean_dist[c], k) ** 2) / 2 - norm(var_dist[c], k) ** 2 / 2) * float(counts[k])
            for k in others
        ]
        neighbour = sum(w * variances[k] for w, k in zip(weights, others)) / sum(weights)
        few = 0.0 if counts[c] >= 40 else 1 / (1 + math.log(1 + 0.1 * (float(counts[c]) - 1)))
        expected = (1 - few) * variances[c] + few * (0.1 * global_var + 0.9 * neighbour)
        assert torch.allclose(iaa.corrected_var[c], expected, atol=1e-5), c
    assert torch.equal(iaa.corrected_var[1], variances[1])  # 50 samples: its own estimate is trusted


def test_lambda_schedule() -> None:
    assert [lambda_schedule(0.8, e, 10) for e in (1, 4, 5, 6, 7, 8, 9, 10)] == pytest.approx(
        [0.8, 0.8, 0.72, 0.72, 0.6, 0.6, 0.48, 0.48]
    )


def test_synthesis_before_and_after_start_epoch() -> None:
    base = Recorder()
    iaa = IntraClassAugmentation(base, 2, 4, aug_num=3, start_epoch=1, intra_lambda=0.5).train()
    embeddings = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    iaa.set_epoch(0, 10)
    iaa(embeddings, labels)
    assert base.seen[0].shape == (6, 4)  # before start_epoch: the plain loss on normalised embeddings
    assert torch.allclose(base.seen[0], F.normalize(embeddings.detach(), dim=1))
    iaa.set_epoch(1, 10)
    loss = iaa(embeddings, labels)
    points, seen_labels = base.seen
    assert points.shape == (24, 4) and seen_labels.tolist() == labels.tolist() * 4
    assert torch.allclose(points.norm(dim=1), torch.ones(24), atol=1e-5)
    loss.backward()
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all()


def test_synthetic_offsets_scale_with_the_class_variance() -> None:
    iaa = IntraClassAugmentation(Recorder(), 2, 64, aug_num=200, start_epoch=0, intra_lambda=0.64)
    iaa.corrected_var[0] = 0.25
    iaa.corrected_var[1] = 0.0
    iaa.current_lambda.fill_(0.64)
    embeddings = torch.zeros(2, 64)
    synthetic, labels = iaa.synthesize(embeddings, torch.tensor([0, 1]))
    assert labels.tolist() == [0, 1] * 200
    offsets = synthetic.reshape(200, 2, 64)
    assert offsets[:, 0].std().item() == pytest.approx(0.8 * 0.5, rel=0.05)  # sqrt(lambda) * sqrt(var)
    assert offsets[:, 1].abs().max().item() == 0.0  # a class without spread gets no offset
    again, _ = iaa.synthesize(embeddings, torch.tensor([0, 1]))
    assert not torch.equal(again, synthetic)  # a fresh draw per step, reproducible from the seed


def test_teacher_run_with_iaa(tmp_path: Path, tiny_glyph_args: list[str]) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "teacher",
            "train",
            "--out",
            str(out),
            "--loss",
            "multi_similarity",
            "--intra",
            "--intra-lambda",
            "0.5",
            "--aug-num",
            "2",
            "--epochs",
            "2",
            "--max-steps",
            "3",
            "--set",
            "iaa.start_epoch=0",
            *tiny_glyph_args,
        ],
    )
    assert result.exit_code == 0, result.stderr
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["iaa"]["enabled"] and saved["iaa"]["aug_num"] == 2
    state = load_file(str(out / "last" / "loss.safetensors"))
    assert state["class_count"].sum() > 0 and int(state["draws"]) > 0  # synthesis ran
