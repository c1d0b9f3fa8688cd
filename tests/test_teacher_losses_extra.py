"""Pair-based teacher losses: loop oracles, PyTorch-Metric-Learning parity, sampling, mixed precision, recipes, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import regularizers as pml_regularizers
from safetensors.torch import load_file

from dmlkd.cli import main
from dmlkd.config import from_dict
from dmlkd.errors import ConfigError, DataError
from dmlkd.registry import TEACHER_LOSSES
from dmlkd.teacher import (
    ContrastiveLoss,
    EMLLoss,
    MarginLoss,
    MultiSimilarityLoss,
    NPairsLoss,
    QuadrupletLoss,
    TripletLoss,
)
from dmlkd.teacher.config import RECIPES, TeacherConfig, start_tree
from dmlkd.teacher.losses.margin import distance_weighted_negatives, gumbel_noise
from dmlkd.teacher.losses.multi_similarity import multi_similarity_mining
from dmlkd.teacher.module import build_criterion

NEW_LOSSES = {
    "triplet": TripletLoss,
    "quadruplet": QuadrupletLoss,
    "eml": EMLLoss,
    "npairs": NPairsLoss,
    "multi_similarity": MultiSimilarityLoss,
    "contrastive": ContrastiveLoss,
    "margin": MarginLoss,
}


def class_batch(classes: int, per_class: int, dim: int, seed: int = 0, spread: float = 1.0):
    """A class-ordered (P x K) fp64 batch: rows of one class are consecutive, as the P x K sampler yields."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(per_class)
    noise = torch.randn(classes * per_class, dim, generator=generator, dtype=torch.float64)
    return centres[labels] + spread * noise, labels


def random_batch(size: int, dim: int, classes: int, seed: int = 0):
    """An unordered fp64 batch with random labels (some classes may have one image)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (size,), generator=generator)
    return torch.randn(size, dim, generator=generator, dtype=torch.float64), labels


def rows(embeddings: torch.Tensor, normalise: bool) -> list[list[float]]:
    out = embeddings.tolist()
    if normalise:
        out = [[v / math.sqrt(sum(u * u for u in row) + 1e-12) for v in row] for row in out]
    return out


def sq(a: list[float], b: list[float]) -> float:
    return sum((u - v) ** 2 for u, v in zip(a, b))


# ---------------------------------------------------------------------------------------------------------
# Registry and package exports


def test_registry_names_and_exports():
    for name, cls in NEW_LOSSES.items():
        assert TEACHER_LOSSES.get(name) is cls
        assert cls.lr_multiplier > 0
    import dmlkd.teacher as teacher

    for cls in NEW_LOSSES.values():
        assert cls.__name__ in teacher.__all__ and getattr(teacher, cls.__name__) is cls


# ---------------------------------------------------------------------------------------------------------
# Triplet


def triplet_oracle(embeddings, labels, margin):
    x, y = rows(embeddings, True), labels.tolist()
    total, count = 0.0, 0
    for i in range(len(y)):
        for j in range(i + 1, len(y)):
            if y[i] != y[j]:
                continue
            for k in range(len(y)):
                if y[k] != y[i]:
                    total += max(0.0, sq(x[i], x[j]) + margin - sq(x[i], x[k]))
                    count += 1
    return total / count


@pytest.mark.parametrize("margin", [0.1, 0.5])
def test_triplet_matches_loop_oracle(margin):
    for embeddings, labels in (class_batch(4, 3, 6, seed=1), random_batch(14, 5, 4, seed=2)):
        loss = TripletLoss(10, embeddings.shape[1], margin=margin)(embeddings, labels)
        assert loss.item() == pytest.approx(triplet_oracle(embeddings, labels, margin), rel=1e-10)


def test_triplet_on_one_paddle_triplet_is_paddles_formula():
    # PaddlePaddle's layout: rows (anchor, positive, negative); loss = relu(d_ap + 0.1 - d_an), squared L2.
    embeddings, _ = random_batch(3, 7, 2, seed=3)
    labels = torch.tensor([4, 4, 1])
    a, p, n = F.normalize(embeddings, dim=1)
    expected = F.relu((a - p).pow(2).sum() + 0.1 - (a - n).pow(2).sum())
    assert TripletLoss(5, 7)(embeddings, labels).item() == pytest.approx(expected.item(), abs=1e-12)


def test_triplet_matches_pml_on_the_same_triplets():
    embeddings, labels = class_batch(5, 4, 8, seed=4)
    triplets = [
        (i, j, k)
        for i in range(len(labels))
        for j in range(i + 1, len(labels))
        if labels[i] == labels[j]
        for k in range(len(labels))
        if labels[k] != labels[i]
    ]
    indices = tuple(torch.tensor(column) for column in zip(*triplets))
    reference = pml_losses.TripletMarginLoss(
        margin=0.1, distance=pml_distances.LpDistance(power=2), reducer=pml_reducers.MeanReducer()
    )
    expected = reference(embeddings, labels, indices)
    assert TripletLoss(5, 8)(embeddings, labels).item() == pytest.approx(expected.item(), rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# Quadruplet


def quadruplet_oracle(embeddings, labels, margin):
    x, y = rows(embeddings, True), labels.tolist()
    pairs = [(i, j) for i in range(len(y)) for j in range(len(y)) if i != j]
    hardest_positive = max(sq(x[i], x[j]) for i, j in pairs if y[i] == y[j])
    hardest_negative = min(sq(x[i], x[j]) for i, j in pairs if y[i] != y[j])
    return max(0.0, hardest_positive - hardest_negative + margin)


@pytest.mark.parametrize(("spread", "margin"), [(1.0, 0.1), (0.05, 0.1), (0.3, 0.4)])
def test_quadruplet_matches_loop_oracle(spread, margin):
    embeddings, labels = class_batch(4, 3, 6, seed=5, spread=spread)
    embeddings.requires_grad_(True)
    loss = QuadrupletLoss(4, 6, margin=margin)(embeddings, labels)
    expected = quadruplet_oracle(embeddings.detach(), labels, margin)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    loss.backward()
    touched = (embeddings.grad.abs().sum(dim=1) > 0).sum().item()
    assert touched <= 4 and (touched > 0) == (expected > 0)  # only the two extreme pairs' rows move


# ---------------------------------------------------------------------------------------------------------
# EML


def eml_oracle(embeddings, labels, beta=1e5, threshold=20.0):
    """seed-spec §2.13 literally (raw embeddings, squared distances, per-anchor p*, n*, θ, b)."""
    x, y = rows(embeddings, False), labels.tolist()
    losses, linear = [], 0
    for i in range(len(y)):
        pos = [sq(x[i], x[j]) for j in range(len(y)) if j != i and y[j] == y[i]]
        neg = [sq(x[i], x[k]) for k in range(len(y)) if y[k] != y[i]]
        if not pos or not neg:
            continue
        p_star, n_star = max(pos), min(neg)
        theta = sum(math.exp(d - p_star) for d in pos) / len(pos) * sum(math.exp(n_star - d) for d in neg) / len(neg)
        b = p_star - n_star
        if b > threshold:
            linear += 1
            losses.append((math.log(theta) + b + math.log(beta)) / math.log(1 + beta))
        else:
            losses.append(math.log(1 + beta * theta * math.exp(b)) / math.log(1 + beta))
    return sum(losses) / len(losses), linear, len(losses)


@pytest.mark.parametrize(("beta", "threshold"), [(1e5, 20.0), (10.0, 0.0)])
def test_eml_matches_loop_oracle_on_both_branches(beta, threshold):
    # With PaddlePaddle's β = 1e5 and threshold 20 the two forms agree to ~e^-30 where they switch; a small β
    # and threshold make the linearised form visibly different, so a wrong branch choice fails here.
    embeddings, labels = class_batch(4, 3, 5, seed=6)
    scales = torch.linspace(0.3, 4.0, len(labels), dtype=torch.float64)[:, None]
    for batch in (embeddings, embeddings * scales, embeddings * 0.1):
        expected, linear, anchors = eml_oracle(batch, labels, beta, threshold)
        loss = EMLLoss(4, 5, beta=beta, threshold=threshold)(batch, labels)
        assert loss.item() == pytest.approx(expected, rel=1e-10)
    _, linear, anchors = eml_oracle(embeddings * scales, labels, beta, threshold)
    assert 0 < linear < anchors  # the scaled batch exercises both forms


def test_eml_matches_paddles_stable_form():
    # PaddlePaddle: f(min(b, 20)) + f_lin(max(b, 20)) - f(20): equal to the piecewise form up to ~1e-12.
    embeddings, labels = class_batch(3, 4, 5, seed=7)
    embeddings = embeddings * torch.linspace(0.5, 3.0, len(labels), dtype=torch.float64)[:, None]
    x, y, beta = rows(embeddings, False), labels.tolist(), 1e5
    total = 0.0
    for i in range(len(y)):
        pos = [sq(x[i], x[j]) for j in range(len(y)) if j != i and y[j] == y[i]]
        neg = [sq(x[i], x[k]) for k in range(len(y)) if y[k] != y[i]]
        p_star, n_star = max(pos), min(neg)
        theta = sum(math.exp(d - p_star) for d in pos) / len(pos) * sum(math.exp(n_star - d) for d in neg) / len(neg)

        def f(b, theta=theta):
            return math.log(1 + beta * theta * math.exp(b)) / math.log(1 + beta)

        def f_lin(b, theta=theta):
            return (math.log(theta) + b + math.log(beta)) / math.log(1 + beta)

        b = p_star - n_star
        total += f(min(b, 20.0)) + f_lin(max(b, 20.0)) - f(20.0)
    assert EMLLoss(3, 5)(embeddings, labels).item() == pytest.approx(total / len(y), abs=1e-10)


# ---------------------------------------------------------------------------------------------------------
# N-pairs


def npairs_oracle(embeddings, labels, reg_lambda):
    x = rows(embeddings, False)
    anchors, positives = x[0::2], x[1::2]
    total = 0.0
    for a, anchor in enumerate(anchors):
        logits = [sum(u * v for u, v in zip(anchor, positive)) for positive in positives]
        top = max(logits)
        total -= logits[a] - top - math.log(sum(math.exp(v - top) for v in logits))
    reg = sum(sum(v * v for v in row) for row in x) / len(x)
    return total / len(anchors) + 0.5 * reg_lambda * reg


@pytest.mark.parametrize("reg_lambda", [0.01, 0.0, 0.3])
def test_npairs_matches_oracle_and_pml(reg_lambda):
    embeddings, labels = class_batch(6, 2, 7, seed=8)
    perm = torch.tensor([3, 0, 5, 1, 4, 2]).repeat_interleave(2) * 2 + torch.arange(12) % 2
    embeddings, labels = embeddings[perm], labels[perm]  # classes shuffled, pairs kept consecutive
    loss = NPairsLoss(6, 7, reg_lambda=reg_lambda)(embeddings, labels)
    assert loss.item() == pytest.approx(npairs_oracle(embeddings, labels, reg_lambda), rel=1e-10)
    reference = pml_losses.NPairsLoss(
        distance=pml_distances.DotProductSimilarity(normalize_embeddings=False),
        embedding_regularizer=pml_regularizers.LpRegularizer(power=2),
        embedding_reg_weight=0.5 * reg_lambda,
    )
    assert loss.item() == pytest.approx(reference(embeddings, labels).item(), rel=1e-9)


@pytest.mark.parametrize(
    ("labels", "composition"),
    [
        ([0, 0, 0, 0, 1, 1, 1, 1], "8 images: 2 classes with 4 images"),
        ([0, 1, 0, 1, 2, 2], "6 images: 3 classes with 2 images"),
        ([0, 0, 1, 1, 2, 2, 0, 0], "8 images: 1 class with 4 images, 2 classes with 2 images"),
    ],
)
def test_npairs_rejects_other_batch_layouts(labels, composition):
    labels = torch.tensor(labels)
    with pytest.raises(DataError) as error:
        NPairsLoss(3, 4)(torch.randn(len(labels), 4), labels)
    message = str(error.value)
    assert "\n" not in message and composition in message and message.endswith("train with --ipc 2")


# ---------------------------------------------------------------------------------------------------------
# Multi-Similarity and contrastive (PML parity)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_similarity_matches_pml_with_its_miner(seed):
    embeddings, labels = class_batch(5, 4, 8, seed=seed, spread=1.2)
    loss = MultiSimilarityLoss(5, 8)(embeddings, labels)
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
    reference = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    assert loss.item() == pytest.approx(reference(embeddings, labels, miner(embeddings, labels)).item(), rel=1e-9)
    # the miner really drops pairs on these batches
    unit = F.normalize(embeddings, dim=1)
    same = labels[:, None] == labels[None, :]
    positive, negative = same & ~torch.eye(len(labels), dtype=torch.bool), ~same
    hard_positive, hard_negative = multi_similarity_mining(unit @ unit.T, positive, negative, 0.1)
    assert hard_negative.sum() < negative.sum()
    a1, _, a2, _ = miner(embeddings, labels)
    assert hard_positive.sum() == len(a1) and hard_negative.sum() == len(a2)


def test_multi_similarity_other_settings_match_pml():
    embeddings, labels = random_batch(16, 6, 4, seed=9)
    loss = MultiSimilarityLoss(4, 6, epsilon=0.3, scale_pos=1.0, scale_neg=20.0, threshold=0.2)
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.3)
    reference = pml_losses.MultiSimilarityLoss(alpha=1.0, beta=20.0, base=0.2)
    expected = reference(embeddings, labels, miner(embeddings, labels))
    assert loss(embeddings, labels).item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize(("pos_margin", "neg_margin", "spread"), [(0.0, 0.5, 1.0), (0.0, 0.5, 0.2), (0.2, 1.2, 0.6)])
def test_contrastive_matches_pml(pos_margin, neg_margin, spread):
    embeddings, labels = class_batch(4, 4, 6, seed=10, spread=spread)
    loss = ContrastiveLoss(4, 6, pos_margin=pos_margin, neg_margin=neg_margin)(embeddings, labels)
    reference = pml_losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin)
    assert loss.item() == pytest.approx(reference(embeddings, labels).item(), rel=1e-9, abs=1e-12)


def test_contrastive_ignores_identical_images():
    embeddings, labels = class_batch(3, 2, 5, seed=11)
    embeddings[1] = embeddings[0]  # a repeated image (the reference sampler draws with replacement)
    embeddings.requires_grad_(True)
    loss = ContrastiveLoss(3, 5)(embeddings, labels)
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()


# ---------------------------------------------------------------------------------------------------------
# Margin loss and distance-weighted sampling


def test_sampling_frequencies_follow_inverse_sphere_density():
    dim, cutoff = 4, 0.5
    row = [0.0, 0.4, 0.3, 0.8, 1.0, 1.3, 1.6]  # anchor, its positive, five negatives (the last too far)
    distances = torch.full((7, 7), 1.0, dtype=torch.float64)
    distances[0], distances[:, 0] = torch.tensor(row), torch.tensor(row)
    labels = torch.tensor([0, 0, 1, 2, 3, 4, 5])
    same = labels[:, None] == labels[None, :]
    positive, negative = same & ~torch.eye(7, dtype=torch.bool), ~same

    def inverse_q(d):
        d = max(d, cutoff)
        return d ** (2 - dim) * (1 - d * d / 4) ** (-(dim - 3) / 2)

    weights = [inverse_q(d) for d in row[2:6]]
    expected = [w / sum(weights) for w in weights]
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(7)
    draws = 3000
    for _ in range(draws):
        uniform = torch.rand(7, 7, generator=generator, dtype=torch.float64).clamp_min(1e-300)
        sampled = distance_weighted_negatives(distances, positive, negative, dim, -torch.log(-torch.log(uniform)))
        assert sampled[0].sum() == 1
        counts += sampled[0]
    assert counts[[0, 1, 6]].sum() == 0  # never itself, its positive, or a negative beyond the cut-off
    for got, want in zip((counts[2:6] / draws).tolist(), expected):
        assert got == pytest.approx(want, abs=0.035)


def test_each_anchor_draws_as_many_admissible_negatives_as_it_has_positives():
    embeddings, labels = class_batch(5, 4, 8, seed=12, spread=1.5)
    unit = F.normalize(embeddings, dim=1)
    distances = torch.cdist(unit, unit)
    same = labels[:, None] == labels[None, :]
    positive, negative = same & ~torch.eye(len(labels), dtype=torch.bool), ~same
    sampled = distance_weighted_negatives(distances, positive, negative, 8, gumbel_noise((20, 20), 0, 0))
    admissible = negative & (distances < 1.4)
    assert not (sampled & ~admissible).any()
    expected = torch.minimum(positive.sum(dim=1), admissible.sum(dim=1))
    assert torch.equal(sampled.sum(dim=1), expected)


def margin_oracle(embeddings, labels, sampled, betas, alpha, nu, per_class):
    x, y = rows(embeddings, True), labels.tolist()
    total, count = 0.0, 0
    for i in range(len(y)):
        beta = betas[y[i]] if per_class else betas[0]
        for j in range(len(y)):
            if j != i and y[j] == y[i]:
                term = max(0.0, math.sqrt(sq(x[i], x[j])) - beta + alpha)
            elif sampled[i][j]:
                term = max(0.0, beta - math.sqrt(sq(x[i], x[j])) + alpha)
            else:
                continue
            total += term
            count += term > 0
    if per_class:
        reg = sum(abs(betas[y[i]]) * (y.count(y[i]) - 1) for i in range(len(y)))
    else:
        reg = abs(betas[0])
    return (total + nu * reg) / max(count, 1)


def sampled_mask(embeddings, labels, seed, step, dim):
    unit = F.normalize(embeddings, dim=1)
    distances = torch.cdist(unit, unit)
    same = labels[:, None] == labels[None, :]
    positive, negative = same & ~torch.eye(len(labels), dtype=torch.bool), ~same
    noise = gumbel_noise((len(labels), len(labels)), seed, step)
    return distance_weighted_negatives(distances, positive, negative, dim, noise)


@pytest.mark.parametrize(("per_class", "nu", "alpha"), [(False, 0.0, 0.2), (True, 0.0, 0.2), (True, 0.01, 0.3)])
def test_margin_matches_loop_oracle_given_the_sampled_pairs(per_class, nu, alpha):
    embeddings, labels = class_batch(5, 3, 8, seed=13, spread=1.5)
    loss_fn = MarginLoss(6, 8, alpha=alpha, nu=nu, per_class_beta=per_class, seed=7)
    if per_class:
        with torch.no_grad():
            loss_fn.beta.copy_(torch.linspace(1.0, 1.3, 6))
    betas = loss_fn.beta.tolist()
    for step in range(3):
        sampled = sampled_mask(embeddings, labels, 7, step, 8)
        expected = margin_oracle(embeddings, labels, sampled.tolist(), betas, alpha, nu, per_class)
        assert loss_fn(embeddings, labels).item() == pytest.approx(expected, rel=1e-10)
    assert int(loss_fn.sampling_step) == 3


@pytest.mark.parametrize("per_class", [False, True])
def test_margin_matches_pml_given_the_sampled_triplets(per_class):
    embeddings, labels = class_batch(6, 3, 8, seed=14, spread=1.0)
    loss_fn = MarginLoss(6, 8, per_class_beta=per_class, seed=3)
    reference = pml_losses.MarginLoss(margin=0.2, nu=0.0, beta=1.2, learn_beta=per_class, num_classes=6)
    if per_class:
        with torch.no_grad():
            loss_fn.beta.copy_(torch.linspace(1.1, 1.35, 6))
            reference.beta.copy_(loss_fn.beta.double())
    sampled = sampled_mask(embeddings, labels, 3, 0, 8)
    triplets = []
    for i in range(len(labels)):
        positives = [j for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        negatives = sampled[i].nonzero().flatten().tolist()
        assert len(negatives) == len(positives)  # every anchor has enough admissible negatives here
        triplets += [(i, j, k) for j, k in zip(positives, negatives)]
    indices = tuple(torch.tensor(column) for column in zip(*triplets))
    expected = reference(embeddings, labels, indices)
    assert loss_fn(embeddings, labels).item() == pytest.approx(expected.item(), rel=1e-9)


def test_margin_sampling_is_reproducible_and_resumable():
    embeddings, labels = class_batch(6, 4, 16, seed=15, spread=2.0)

    def run(loss_fn, steps):
        return [loss_fn(embeddings, labels).item() for _ in range(steps)]

    first, second = MarginLoss(6, 16, seed=5), MarginLoss(6, 16, seed=5)
    sequence = run(first, 6)
    assert sequence == run(second, 6)
    assert len(set(sequence)) > 1  # fresh negatives every step
    masks = {tuple(sampled_mask(embeddings, labels, seed, 0, 16).flatten().tolist()) for seed in range(4)}
    assert len(masks) > 1  # the seed changes the draws
    resumed = MarginLoss(6, 16, seed=5)
    halfway = MarginLoss(6, 16, seed=5)
    run(halfway, 3)
    resumed.load_state_dict(halfway.state_dict())
    assert run(resumed, 3) == sequence[3:]
    resumed.eval()  # evaluation-mode calls reuse the current step's noise and do not advance it
    assert len(set(run(resumed, 3))) == 1 and int(resumed.sampling_step) == 6


def test_margin_beta_trains_unless_fixed():
    embeddings, labels = class_batch(4, 3, 8, seed=16, spread=1.5)
    loss_fn = MarginLoss(4, 8)
    assert [name for name, _ in loss_fn.named_parameters()] == ["beta"] and MarginLoss.lr_multiplier == 10.0
    loss_fn(embeddings, labels).backward()
    assert loss_fn.beta.grad is not None and loss_fn.beta.grad.abs().item() > 0
    fixed = MarginLoss(4, 8, learn_beta=False, per_class_beta=True)
    assert fixed.beta.shape == (4,) and not fixed.beta.requires_grad


# ---------------------------------------------------------------------------------------------------------
# Mixed precision, input checks


@pytest.mark.parametrize("name", sorted(NEW_LOSSES))
def test_bf16_autocast_gives_finite_loss_and_gradients(name):
    torch.manual_seed(0)
    classes, per_class = (6, 2) if name == "npairs" else (3, 4)
    labels = torch.arange(classes).repeat_interleave(per_class)
    layer = torch.nn.Linear(10, 16)
    inputs = torch.randn(len(labels), 10) * 4
    loss_fn = NEW_LOSSES[name](classes, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = layer(inputs)
        loss = loss_fn(embeddings, labels)
    assert embeddings.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for parameter in [*layer.parameters(), *loss_fn.parameters()]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()


@pytest.mark.parametrize("name", sorted(NEW_LOSSES))
def test_batches_without_pairs_are_one_line_data_errors(name):
    loss_fn = NEW_LOSSES[name](8, 4)
    with pytest.raises(DataError, match=r"--ipc K \(K >= 2\)$") as error:
        loss_fn(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 5]))
    assert "6 images: 6 classes with 1 image" in str(error.value)
    with pytest.raises(DataError, match="at least two classes") as error:
        loss_fn(torch.randn(4, 4), torch.tensor([2, 2, 2, 2]))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="embedding_dim=4"):
        loss_fn(torch.randn(4, 5), torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("triplet", {"margin": -0.1}, "triplet margin must be a finite number in [0, inf), got -0.1"),
        ("quadruplet", {"margin": float("nan")}, "loss 'quadruplet' option margin: expected a finite number, got nan"),
        ("eml", {"beta": 0}, "eml beta must be a finite number in (0, inf), got 0"),
        ("npairs", {"reg_lambda": -1}, "npairs reg_lambda"),
        ("multi_similarity", {"scale_neg": 0.0}, "multi_similarity scale_neg"),
        ("contrastive", {"neg_margin": 3.0}, "contrastive neg_margin must be a finite number in [0, 2)"),
        ("margin", {"seed": -1}, "margin seed must be an integer >= 0, got -1"),
        ("margin", {"per_class_beta": "yes"}, "loss 'margin' option per_class_beta: expected true or false, got 'yes'"),
        ("margin", {"beta": -1.2}, "margin beta"),
    ],
)
def test_bad_options_are_config_errors(name, options, message):
    with pytest.raises(ConfigError) as error:
        TEACHER_LOSSES.build(name, 4, 8, **options)  # the registry checks the types, the loss the ranges
    assert message in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# Recipes


PD_RECIPES = [name for name in RECIPES if name.startswith("pd-")]


def test_paddle_recipes_exist():
    assert set(PD_RECIPES) == {
        "pd-sop-softmax",
        "pd-sop-arcmargin",
        "pd-sop-finetune-triplet",
        "pd-sop-finetune-quadruplet",
        "pd-sop-finetune-eml",
        "pd-sop-finetune-npairs",
    }


@pytest.mark.parametrize("name", PD_RECIPES)
def test_paddle_recipes_parse_and_build_their_loss(name):
    config = from_dict(TeacherConfig, start_tree(name, None, None))
    assert config.recipe == name and config.data.name == "sop"
    assert (config.model.arch, config.model.embedding_dim) == ("resnet50", 512)
    assert config.optim.optimizer == "sgd" and config.optim.momentum == 0.9 and config.optim.weight_decay == 1e-4
    criterion = build_criterion(config, num_classes=11318)
    assert type(criterion) is TEACHER_LOSSES.get(config.loss.name)
    if "finetune" in name:
        assert config.loss.name == name.rsplit("-", 1)[1]
        assert (config.train.batch_size, config.train.ipc, config.optim.lr) == (160, 2, 1e-4)
        assert config.optim.scheduler == "none"
    else:
        assert (config.train.batch_size, config.train.ipc, config.optim.lr) == (256, None, 0.01)
        assert (config.optim.scheduler, config.optim.lr_decay_gamma) == ("step", 0.1)
        # 30k iterations of 256 over SOP's 59,551 images, steps near 15k and 25k iterations
        iterations_per_epoch = 59551 // 256
        assert abs(config.train.epochs * iterations_per_epoch - 30000) < iterations_per_epoch
        assert abs(2 * config.optim.lr_decay_step * iterations_per_epoch - 25000) < iterations_per_epoch
    if name == "pd-sop-arcmargin":
        assert (criterion.scale, criterion.margin) == (80.0, 0.15)


# ---------------------------------------------------------------------------------------------------------
# End to end through the CLI


def _train(tmp_path: Path, tiny_glyph_args: list[str], *extra: str):
    out = tmp_path / "run"
    args = ["teacher", "train", "--out", str(out), "--max-steps", "2", *tiny_glyph_args, *extra]
    result = CliRunner().invoke(main, args)
    return result, out


@pytest.mark.parametrize("name", sorted(NEW_LOSSES))
def test_two_step_teacher_run(tmp_path: Path, tiny_glyph_args: list[str], name: str):
    extra = ["--ipc", "2"] if name == "npairs" else []
    result, out = _train(tmp_path, tiny_glyph_args, "--loss", name, *extra)
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    record = json.loads((out / "last" / "config.json").read_text())
    assert record["metrics"]["step"] == 2 and record["train_config"]["loss"]["name"] == name
    if name == "margin":
        tensors = load_file(str(out / "last" / "loss.safetensors"))
        assert int(tensors["sampling_step"]) == 2 and tensors["beta"].shape == (1,)
        assert tensors["beta"].item() != pytest.approx(1.2)  # β trained


def test_npairs_run_without_ipc_2_is_a_one_line_error(tmp_path: Path, tiny_glyph_args: list[str]):
    result, _ = _train(tmp_path, tiny_glyph_args, "--loss", "npairs")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "16 images: 4 classes with 4 images" in lines[0] and "--ipc 2" in lines[0]
