"""Tests of dmlkd.transfer.functional against explicit loops written from seed-spec §2.5–2.12."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch

from dmlkd.transfer import functional as tf

DOUBLE = torch.float64


def _random(n: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator, dtype=DOUBLE) * scale


def _pair(n: int = 6, student_dim: int = 3, teacher_dim: int = 4, seed: int = 0):
    return _random(n, student_dim, seed), _random(n, teacher_dim, seed + 100)


# ---------------------------------------------------------------------------------------------------------
# Loop oracles, one line of seed-spec at a time.


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.tolist()


def _dot(a: list[float], b: list[float]) -> float:
    return sum(p * q for p, q in zip(a, b))


def _unit(a: list[float], eps: float = 1e-12) -> list[float]:
    norm = max(math.sqrt(_dot(a, a)), eps)
    return [v / norm for v in a]


def _pdist_loop(rows: list[list[float]], eps: float = 1e-12) -> list[list[float]]:
    n = len(rows)
    out = [[0.0] * n for _ in range(n)]
    for i, j in itertools.product(range(n), range(n)):
        if i != j:
            squared = _dot(rows[i], rows[i]) + _dot(rows[j], rows[j]) - 2 * _dot(rows[i], rows[j])
            out[i][j] = math.sqrt(max(squared, eps))
    return out


def _relaxed_parts(student: torch.Tensor, teacher: torch.Tensor, sigma: float):
    distances = _pdist_loop(_rows(student))
    n = len(distances)
    normalised = [[distances[i][j] / (sum(distances[i]) / n) for j in range(n)] for i in range(n)]
    teacher_distances = _pdist_loop([_unit(r) for r in _rows(teacher)])
    weights = [[math.exp(-(teacher_distances[i][j] ** 2) / sigma) for j in range(n)] for i in range(n)]
    return normalised, weights


def _relaxed_contrastive_loop(student, teacher, sigma=1.0, delta=1.0) -> float:
    d, w = _relaxed_parts(student, teacher, sigma)
    n = len(d)
    total = 0.0
    for i, j in itertools.product(range(n), range(n)):
        if d[i][j] > 0:
            total += w[i][j] * d[i][j] ** 2 + (1 - w[i][j]) * max(delta - d[i][j], 0.0) ** 2
    return total / n


def _relaxed_ms_loop(student, teacher, num_views=2, sigma=1.0, delta=1.0, alpha=1.0, beta=2.0) -> float:
    d, w = _relaxed_parts(student, teacher, sigma)
    n = len(d)
    images = n // num_views
    for i, j in itertools.product(range(n), range(n)):
        if i % images == j % images:
            w[i][j] = 1.0
    losses = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        pull = math.log(1 + sum(w[i][j] * math.exp(alpha * d[i][j]) for j in others)) / alpha
        push = math.log(1 + sum((1 - w[i][j]) * math.exp(beta * (delta - d[i][j])) for j in others)) / beta
        losses.append(pull + push)
    positive = [v for v in losses if v > 0]
    return sum(positive) / len(positive)


def _smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _rkd_distance_loop(student, teacher) -> float:
    sides = []
    for x in (student, teacher):
        distances = _pdist_loop(_rows(x))
        positive = [v for row in distances for v in row if v > 0]
        mean = sum(positive) / len(positive)
        sides.append([[v / mean for v in row] for row in distances])
    n = student.shape[0]
    return sum(_smooth_l1(sides[0][i][j] - sides[1][i][j]) for i in range(n) for j in range(n)) / n**2


def _cosine_at_vertex(rows, a, b, c) -> float:
    def edge(p, q):
        diff = [y - x for x, y in zip(rows[p], rows[q])]
        norm = math.sqrt(_dot(diff, diff))
        return [0.0] * len(diff) if norm == 0 else [v / norm for v in diff]

    return _dot(edge(a, b), edge(a, c))


def _rkd_angle_loop(student, teacher) -> float:
    student_rows, teacher_rows = _rows(student), _rows(teacher)
    n = len(student_rows)
    total = 0.0
    for a, b, c in itertools.product(range(n), repeat=3):
        total += _smooth_l1(_cosine_at_vertex(student_rows, a, b, c) - _cosine_at_vertex(teacher_rows, a, b, c))
    return total / n**3


def _pkt_loop(student, teacher, eps=1e-7) -> float:
    probabilities = []
    for x in (student, teacher):
        units = [[v / (math.sqrt(_dot(r, r)) + eps) for v in r] for r in _rows(x)]
        kernel = [[(_dot(p, q) + 1) / 2 for q in units] for p in units]
        probabilities.append([[k / sum(row) for k in row] for row in kernel])
    student_p, teacher_p = probabilities
    n = len(student_p)
    return (
        sum(
            teacher_p[i][j] * math.log((teacher_p[i][j] + eps) / (student_p[i][j] + eps))
            for i in range(n)
            for j in range(n)
        )
        / n**2
    )


def _log_sum_exp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _plackett_luce_log_likelihood(scores: list[float]) -> float:
    return sum(scores[k] - _log_sum_exp(scores[k:]) for k in range(len(scores)))


def _dark_rank_lists(student, teacher, alpha, beta, length):
    """Per anchor: the student scores of the teacher's ranked list (self excluded by index)."""
    scores = []
    for x in (student, teacher):
        distances = _pdist_loop([_unit(r) for r in _rows(x)])
        scores.append([[-alpha * v**beta for v in row] for row in distances])
    student_scores, teacher_scores = scores
    n = len(student_scores)
    lists = []
    for i in range(n):
        ranked = sorted((j for j in range(n) if j != i), key=lambda j: -teacher_scores[i][j])[:length]
        lists.append([student_scores[i][j] for j in ranked])
    return lists


def _dark_rank_loop(student, teacher, alpha=3.0, beta=3.0, length=4) -> float:
    lists = _dark_rank_lists(student, teacher, alpha, beta, length)
    return -sum(_plackett_luce_log_likelihood(scores) for scores in lists) / len(lists)


# ---------------------------------------------------------------------------------------------------------
# Against the loops.


def test_pairwise_distances_matches_loop_and_zero_diagonal():
    x = _random(7, 3, 1)
    expected = torch.tensor(_pdist_loop(_rows(x)), dtype=DOUBLE)
    actual = tf.pairwise_distances(x)
    torch.testing.assert_close(actual, expected)
    assert torch.all(actual.diagonal() == 0)
    torch.testing.assert_close(actual, torch.cdist(x, x))


def test_pairwise_distances_finite_gradient_at_duplicates_and_diagonal():
    x = _random(5, 3, 2)
    x = torch.cat([x, x[:2]]).requires_grad_(True)  # rows 5, 6 duplicate rows 0, 1
    distances = tf.pairwise_distances(x)
    assert distances[0, 5].item() == pytest.approx(1e-6, rel=1e-3)
    distances.sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="eps"):
        tf.pairwise_distances(x, eps=0.0)


@pytest.mark.parametrize(("sigma", "delta"), [(1.0, 1.0), (0.5, 1.3)])
def test_relaxed_contrastive_matches_loop(sigma, delta):
    student, teacher = _pair(seed=3)
    actual = tf.relaxed_contrastive(student, teacher, sigma=sigma, delta=delta)
    assert actual.item() == pytest.approx(_relaxed_contrastive_loop(student, teacher, sigma, delta), rel=1e-10)


@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_relaxed_ms_matches_loop(num_views):
    student, teacher = _pair(n=6, seed=4)
    actual = tf.relaxed_ms(student, teacher, num_views=num_views, sigma=0.7, delta=1.1, alpha=1.5, beta=2.5)
    expected = _relaxed_ms_loop(student, teacher, num_views, 0.7, 1.1, 1.5, 2.5)
    assert actual.item() == pytest.approx(expected, rel=1e-10)


def test_relaxed_ms_forces_view_pairs_positive():
    student, teacher = _pair(n=6, seed=5)
    ours = tf.relaxed_ms(student, teacher, num_views=2)
    single = tf.relaxed_ms(student, teacher, num_views=1)  # no forced pairs
    assert ours.item() != pytest.approx(single.item(), rel=1e-6)
    assert ours.item() == pytest.approx(_relaxed_ms_loop(student, teacher, 2), rel=1e-10)


def test_relaxed_ms_rejects_uneven_views_and_tiny_batch_is_zero_with_graph():
    student, teacher = _pair(n=5)
    with pytest.raises(ValueError, match="num_views=2"):
        tf.relaxed_ms(student, teacher, num_views=2)
    lone = _random(1, 3, 0).requires_grad_(True)
    loss = tf.relaxed_ms(lone, _random(1, 4, 1), num_views=1)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(lone.grad == 0)


def test_rkd_distance_matches_loop():
    student, teacher = _pair(seed=6)
    assert tf.rkd_distance(student, teacher).item() == pytest.approx(_rkd_distance_loop(student, teacher), rel=1e-10)
    large_student = student * 30  # beyond the quadratic zone of SmoothL1
    assert tf.rkd_distance(large_student, teacher / 40).item() == pytest.approx(
        _rkd_distance_loop(large_student, teacher / 40), rel=1e-10
    )


def test_rkd_angle_matches_loop_including_degenerate_triples():
    student, teacher = _pair(n=5, seed=7)
    student = torch.cat([student, student[:1]])  # a duplicate row: extra degenerate triples
    teacher = torch.cat([teacher, teacher[1:2]])
    assert tf.rkd_angle(student, teacher).item() == pytest.approx(_rkd_angle_loop(student, teacher), rel=1e-10)


def test_pkt_matches_loop():
    student, teacher = _pair(seed=8)
    assert tf.pkt(student, teacher).item() == pytest.approx(_pkt_loop(student, teacher), rel=1e-10)


@pytest.mark.parametrize(("alpha", "beta", "length"), [(3.0, 3.0, 4), (2.0, 1.5, 2), (3.0, 3.0, 50)])
def test_dark_rank_matches_loop(alpha, beta, length):
    student, teacher = _pair(n=7, seed=9)
    actual = tf.dark_rank(student, teacher, alpha=alpha, beta=beta, list_length=length)
    assert actual.item() == pytest.approx(_dark_rank_loop(student, teacher, alpha, beta, length), rel=1e-10)


def test_dark_rank_excludes_self_with_duplicate_teacher_rows():
    student, teacher = _pair(n=6, seed=10)
    teacher = torch.cat([teacher, teacher[:2]])  # exact duplicates of rows 0 and 1
    student = torch.cat([student, _random(2, 3, 11)])
    # beta large enough that the duplicate's score underflows to exactly 0 and ties with the anchor's own
    # score: dropping "rank 0" (the official code) could then drop the duplicate and keep the anchor
    unit = torch.nn.functional.normalize(teacher, dim=1)
    assert (-3.0 * tf.pairwise_distances(unit).pow(60.0))[0, 6].item() == 0.0
    actual = tf.dark_rank(student, teacher, alpha=3.0, beta=60.0, list_length=3)
    assert actual.item() == pytest.approx(_dark_rank_loop(student, teacher, 3.0, 60.0, 3), rel=1e-10)


def _attention_loop(feature_map: torch.Tensor) -> list[list[float]]:
    batch, channels, height, width = feature_map.shape
    maps = []
    for b in range(batch):
        values = [
            sum(feature_map[b, c, y, x].item() ** 2 for c in range(channels)) / channels
            for y in range(height)
            for x in range(width)
        ]
        maps.append(_unit(values))
    return maps


def test_attention_transfer_matches_loop():
    generator = torch.Generator().manual_seed(12)
    student = torch.randn(2, 3, 4, 5, generator=generator, dtype=DOUBLE)
    teacher = torch.randn(2, 6, 4, 5, generator=generator, dtype=DOUBLE)
    student_maps, teacher_maps = _attention_loop(student), _attention_loop(teacher)
    expected = sum((s - t) ** 2 for sm, tm in zip(student_maps, teacher_maps) for s, t in zip(sm, tm)) / (2 * 20)
    torch.testing.assert_close(tf.attention_map(student), torch.tensor(student_maps, dtype=DOUBLE))
    assert tf.attention_transfer(student, teacher).item() == pytest.approx(expected, rel=1e-10)


def test_attention_transfer_shape_mismatch_is_one_line_value_error():
    with pytest.raises(ValueError) as info:
        tf.attention_transfer(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 8, 8))
    message = str(info.value)
    assert "\n" not in message and "(2, 3, 4, 4)" in message and "(2, 3, 8, 8)" in message
    with pytest.raises(ValueError, match="feature map"):
        tf.attention_map(torch.zeros(2, 3, 4))


def test_fitnet_stage_matches_loop_and_checks_shapes():
    generator = torch.Generator().manual_seed(13)
    student = torch.randn(2, 3, 2, 2, generator=generator, dtype=DOUBLE)
    teacher = torch.randn(2, 3, 2, 2, generator=generator, dtype=DOUBLE)
    expected = sum((a - b) ** 2 for a, b in zip(student.flatten().tolist(), teacher.flatten().tolist())) / 24
    assert tf.fitnet_stage(student, teacher).item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"\(2, 3, 2, 2\)"):
        tf.fitnet_stage(student, teacher[:, :2])


def test_embedding_losses_reject_mismatched_batches():
    with pytest.raises(ValueError, match=r"student \(4, 3\) and teacher \(5, 3\)"):
        tf.rkd_distance(torch.zeros(4, 3), torch.zeros(5, 3))


# ---------------------------------------------------------------------------------------------------------
# Properties.

EMBEDDING_LOSSES = {
    "relaxed_contrastive": tf.relaxed_contrastive,
    "relaxed_ms": tf.relaxed_ms,
    "rkd_distance": tf.rkd_distance,
    "rkd_angle": tf.rkd_angle,
    "pkt": tf.pkt,
    "dark_rank": tf.dark_rank,
}


@pytest.mark.parametrize("name", sorted(EMBEDDING_LOSSES))
def test_batch_permutation_invariance(name):
    student, teacher = _pair(n=8, seed=14)
    generator = torch.Generator().manual_seed(15)
    if name == "relaxed_ms":  # permute images, keep the view-major layout (B = 4, V = 2)
        images = torch.randperm(4, generator=generator)
        permutation = torch.cat([images, images + 4])
    else:
        permutation = torch.randperm(8, generator=generator)
    loss = EMBEDDING_LOSSES[name]
    torch.testing.assert_close(loss(student[permutation], teacher[permutation]), loss(student, teacher))


@pytest.mark.parametrize("name", ["relaxed_contrastive", "relaxed_ms", "rkd_angle", "pkt", "dark_rank"])
def test_teacher_scale_invariance(name):
    student, teacher = _pair(n=8, seed=16)
    loss = EMBEDDING_LOSSES[name]
    rtol = 1e-5 if name == "pkt" else 1e-9  # PKT's x / (‖x‖ + eps) is scale-free only up to eps
    torch.testing.assert_close(loss(student, teacher * 37.0), loss(student, teacher), rtol=rtol, atol=1e-12)


def test_rkd_distance_is_scale_free_on_both_sides():
    student, teacher = _pair(n=8, seed=17)
    reference = tf.rkd_distance(student, teacher)
    torch.testing.assert_close(tf.rkd_distance(student * 0.01, teacher * 50.0), reference)


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "pkt"])
def test_relational_losses_vanish_when_student_equals_teacher(name):
    embeddings = _random(8, 5, 18)
    assert EMBEDDING_LOSSES[name](embeddings, embeddings.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_relational_losses_vanish_for_similar_student():
    """RKD terms only see shape: a rotated, scaled copy of the teacher in another width costs nothing."""
    teacher = _random(8, 4, 19)
    rotation, _ = torch.linalg.qr(_random(6, 6, 20))
    student = torch.cat([teacher, torch.zeros(8, 2, dtype=DOUBLE)], dim=1) @ rotation * 3.0
    assert tf.rkd_distance(student, teacher).item() == pytest.approx(0.0, abs=1e-12)
    assert tf.rkd_angle(student, teacher).item() == pytest.approx(0.0, abs=1e-12)


def test_dark_rank_student_ranking_the_teacher_list_in_order_is_optimal():
    """With student == teacher the gathered scores come out sorted; Plackett-Luce then is at its minimum
    over all orderings of that score set, and the value equals the loop with that best ordering."""
    angles = torch.tensor([0.0, 0.3, 0.75, 1.4, 2.2, 3.0, 4.1, 5.3], dtype=DOUBLE)
    teacher = torch.stack([angles.cos(), angles.sin()], dim=1)
    student = teacher * 2.0  # normalised inside: ranks every list exactly as the teacher
    lists = _dark_rank_lists(student, teacher, 3.0, 3.0, 4)
    best = 0.0
    for scores in lists:
        assert scores == sorted(scores, reverse=True)
        best += min(-_plackett_luce_log_likelihood(list(p)) for p in itertools.permutations(scores))
    assert tf.dark_rank(student, teacher).item() == pytest.approx(best / len(lists), rel=1e-10)
    reversed_student = torch.stack([angles.cos(), -angles.sin()], dim=1)  # mirror: same distances
    assert tf.dark_rank(reversed_student, teacher).item() == pytest.approx(best / len(lists), rel=1e-10)
    shuffled = teacher[torch.tensor([3, 6, 0, 5, 1, 7, 2, 4])]
    assert tf.dark_rank(shuffled, teacher).item() > best / len(lists) + 1e-3


@pytest.mark.parametrize("name", sorted(EMBEDDING_LOSSES))
def test_gradient_reaches_student_never_teacher(name):
    student, teacher = _pair(n=8, seed=21)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = EMBEDDING_LOSSES[name](student, teacher)
    assert loss.dim() == 0 and loss.item() >= 0
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["attention_transfer", "fitnet_stage"])
def test_feature_gradient_reaches_student_never_teacher(name):
    generator = torch.Generator().manual_seed(22)
    student = torch.randn(2, 4, 3, 3, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 3, generator=generator, requires_grad=True)
    getattr(tf, name)(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def _finite_forward_backward(loss_fn, student: torch.Tensor, teacher: torch.Tensor, leaf: torch.Tensor):
    loss = loss_fn(student, teacher)
    assert torch.isfinite(loss), loss
    loss.backward()
    assert torch.isfinite(leaf.grad).all()
    return loss


@pytest.mark.parametrize("name", sorted(EMBEDDING_LOSSES))
def test_finite_under_bf16_autocast(name):
    generator = torch.Generator().manual_seed(23)
    leaf = torch.randn(8, 16, generator=generator, requires_grad=True)
    projection = torch.randn(16, 6, generator=generator)
    teacher = torch.randn(8, 10, generator=generator) * 100.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = leaf @ projection * 50.0  # bf16 under autocast
        assert student.dtype == torch.bfloat16
        loss = _finite_forward_backward(EMBEDDING_LOSSES[name], student, teacher.bfloat16(), leaf)
    assert loss.dtype == torch.float32


def test_feature_maps_finite_in_half_precision():
    generator = torch.Generator().manual_seed(24)
    leaf = torch.randn(2, 3, 4, 4, generator=generator).mul(400.0).requires_grad_(True)  # 400² > fp16 max
    teacher = torch.randn(2, 5, 4, 4, generator=generator).mul(400.0).half()
    loss = _finite_forward_backward(tf.attention_transfer, leaf.half(), teacher, leaf)
    assert loss.dtype == torch.float32
    assert torch.isfinite(tf.fitnet_stage(leaf.half(), leaf.detach().half() * 2))


@pytest.mark.parametrize("name", sorted(EMBEDDING_LOSSES))
def test_finite_with_exact_duplicate_rows(name):
    student, teacher = _pair(n=4, seed=25)
    leaf = torch.cat([student, student]).requires_grad_(True)  # every row twice (also the two views)
    _finite_forward_backward(EMBEDDING_LOSSES[name], leaf, torch.cat([teacher, teacher]), leaf)
    constant = torch.ones(6, 3, dtype=DOUBLE, requires_grad=True)  # all rows coincide
    _finite_forward_backward(EMBEDDING_LOSSES[name], constant, torch.ones(6, 4, dtype=DOUBLE), constant)


def test_float64_stays_float64_and_float32_stays_float32():
    student, teacher = _pair()
    assert tf.relaxed_contrastive(student, teacher).dtype == DOUBLE
    assert tf.relaxed_contrastive(student.float(), teacher.float()).dtype == torch.float32


def test_relaxed_contrastive_full_size_batch_is_fast():
    generator = torch.Generator().manual_seed(26)
    student = torch.randn(180, 512, generator=generator, requires_grad=True)
    teacher = torch.randn(180, 512, generator=generator)
    start = time.perf_counter()
    for _ in range(5):
        loss = tf.relaxed_contrastive(student, teacher)
        loss.backward()
    assert (time.perf_counter() - start) / 5 < 0.5
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("name", sorted(EMBEDDING_LOSSES))
def test_gradients_match_finite_differences(name):
    """Catches detached terms (e.g. the relaxed row mean μ_i must carry gradient)."""
    student, teacher = _pair(n=6, seed=27)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: EMBEDDING_LOSSES[name](x, teacher), (student,))


@pytest.mark.parametrize("name", ["attention_transfer", "fitnet_stage"])
def test_feature_gradients_match_finite_differences(name):
    generator = torch.Generator().manual_seed(28)
    student = torch.randn(2, 3, 2, 3, generator=generator, dtype=DOUBLE, requires_grad=True)
    teacher = torch.randn(2, 3, 2, 3, generator=generator, dtype=DOUBLE)
    assert torch.autograd.gradcheck(lambda x: getattr(tf, name)(x, teacher), (student,))


@pytest.mark.parametrize("name", sorted(EMBEDDING_LOSSES))
def test_autocast_does_not_lower_precision(name):
    student, teacher = (x.float() for x in _pair(n=8, seed=29))
    expected = EMBEDDING_LOSSES[name](student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = EMBEDDING_LOSSES[name](student, teacher)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
