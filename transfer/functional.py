"""Pure tensor math of the embedding-transfer losses (seed-spec §2.5–2.12).

Every loss takes the student tensor first and the teacher tensor second, exactly as the official
LabelRelaxation code feeds them: the student embedding raw, the teacher embedding as given (the callers
normalise the teacher embedding before, as the official training script does; a loss re-normalises
inside only where the official loss does). Each returns a scalar.

Numerics, for every public function:
- the math runs in float32, or float64 when an input is float64; fp16/bf16 inputs are cast up and autocast
  is switched off inside, so the results are finite under ``torch.autocast``;
- the teacher side is detached and computed under ``torch.no_grad()``: no gradient ever reaches it;
- Euclidean distances clamp the squared distance at ``eps`` before the square root, so gradients stay
  finite at coincident points (duplicate rows) and on the forced-zero diagonal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmlkd.numerics import check_embeddings, eye_mask, full_precision, zero_with_graph
from dmlkd.transfer.feature_functional import attention_map, attention_transfer, fitnet_stage

__all__ = [
    "attention_map", "attention_transfer", "dark_rank", "fitnet_stage", "pairwise_distances", "pkt",
    "relaxed_contrastive", "relaxed_ms", "rkd_angle", "rkd_distance"
]  # fmt: skip


# --- Distances.


@full_precision
def pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrix as the official code computes it ("pdist", seed-spec §2).

    D_ij = sqrt(clamp(‖x_i‖² + ‖x_j‖² − 2 x_i·x_j, min=eps)) for i ≠ j and D_ii = 0. Coincident rows get
    sqrt(eps), not 0. Gradients are finite everywhere: the clamp has zero gradient below ``eps`` and the
    diagonal is filled after the square root, so no gradient reaches it.

    Args:
        x: (N, D) embeddings.
        eps: lower clamp of the squared distance; must be > 0.

    Returns:
        (N, N) distances, differentiable with respect to ``x``.
    """
    if eps <= 0:
        raise ValueError(f"pairwise_distances needs eps > 0 for finite gradients, got {eps!r}")
    squared_norms = x.pow(2).sum(dim=1)
    squared = squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2.0 * (x @ x.t())
    distances = squared.clamp(min=eps).sqrt()
    return distances.masked_fill(eye_mask(x.shape[0], x.device), 0.0)


def _row_mean_normalised(distances: torch.Tensor) -> torch.Tensor:
    """d_ij = D_ij / μ_i with μ_i the mean of row i over all N columns, the zero diagonal included."""
    return distances / distances.mean(dim=1, keepdim=True)


def _relaxed_scaled_squared(teacher: torch.Tensor, sigma: float) -> torch.Tensor:
    """‖ŝ_i − ŝ_j‖² / σ on the re-normalised teacher, without gradient; the relaxed label is exp(−·)."""
    with torch.no_grad():
        unit = F.normalize(teacher.detach(), p=2, dim=1)
        return pairwise_distances(unit).pow(2) / sigma


# --- Relaxed losses: S. Kim, D. Kim, M. Cho, S. Kwak, "Embedding Transfer with Label Relaxation for Improved
# Metric Learning", CVPR 2021 (arXiv:2103.14908).


@full_precision
def relaxed_contrastive(
    student: torch.Tensor, teacher: torch.Tensor, sigma: float = 1.0, delta: float = 1.0
) -> torch.Tensor:
    """Relaxed contrastive loss (Kim et al., CVPR 2021; seed-spec §2.5).

    With D = pdist(student), d_ij = D_ij / μ_i, μ_i = (1/N) Σ_j D_ij (diagonal included, not detached;
    d is asymmetric) and relaxed labels w_ij = exp(−‖ŝ_i − ŝ_j‖² / σ) from the re-normalised teacher ŝ
    (no gradient):

        L = (1/N) Σ_{(i, j): d_ij > 0} [ w_ij d_ij² + (1 − w_ij) [δ − d_ij]_+² ]

    over ordered pairs; only the diagonal (d = 0) drops out.

    Args:
        student: (N, D_s) raw student embeddings.
        teacher: (N, D_t) teacher embeddings; only their directions matter.
        sigma: width σ of the Gaussian relaxed label.
        delta: margin δ on normalised distances.

    Returns:
        Scalar loss; 0 (with graph) when N < 2.
    """
    n = check_embeddings("relaxed_contrastive", student, teacher)
    if n < 2:
        return zero_with_graph(student)
    normalised = _row_mean_normalised(pairwise_distances(student))
    weights = torch.exp(-_relaxed_scaled_squared(teacher, sigma))
    pull = weights * normalised.pow(2)
    push = (1.0 - weights) * (delta - normalised).clamp(min=0.0).pow(2)
    return torch.where(normalised > 0, pull + push, 0.0).sum() / n


def _log_one_plus_sum_exp(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row-wise log(1 + Σ_{j: keep_ij} exp(logits_ij)), computed as a logsumexp with a zero logit."""
    masked = logits.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(torch.cat([torch.zeros_like(masked[:, :1]), masked], dim=1), dim=1)


@full_precision
def relaxed_ms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    num_views: int = 2,
    sigma: float = 1.0,
    delta: float = 1.0,
    alpha: float = 1.0,
    beta: float = 2.0,
) -> torch.Tensor:
    """Relaxed multi-similarity loss (Kim et al., CVPR 2021; seed-spec §2.6), vectorised and working.

    d_ij and w_ij as in :func:`relaxed_contrastive`, then w_ij = 1 for every pair of views of one image
    (the batch is view-major: rows i and i + kB, B = N / num_views). Per anchor i, over j ≠ i:

        L_i = (1/α) log(1 + Σ_j w_ij e^{α d_ij}) + (1/β) log(1 + Σ_j (1 − w_ij) e^{β(δ − d_ij)})

    and L is the mean of L_i over anchors with L_i > 0. Both terms are evaluated as logsumexp over
    log-weights (log w = −‖ŝ_i − ŝ_j‖²/σ exactly), which is the same value without overflow.

    Args:
        student: (N, D_s) raw student embeddings, N = num_views · B, view-major.
        teacher: (N, D_t) teacher embeddings; only their directions matter.
        num_views: views per image V.
        sigma: width σ of the Gaussian relaxed label.
        delta: margin δ of the push term.
        alpha: scale α of the pull term.
        beta: scale β of the push term.

    Returns:
        Scalar loss; 0 (with graph) when no anchor has L_i > 0.
    """
    n = check_embeddings("relaxed_ms", student, teacher)
    if num_views < 1 or n % num_views:
        raise ValueError(
            f"relaxed_ms needs N divisible by num_views (view-major batch), got N={n}, num_views={num_views}"
        )
    if n < 2:
        return zero_with_graph(student)
    normalised = _row_mean_normalised(pairwise_distances(student))
    with torch.no_grad():
        scaled = _relaxed_scaled_squared(teacher, sigma)
        image = torch.arange(n, device=student.device) % (n // num_views)
        same_image = image.unsqueeze(1) == image.unsqueeze(0)
        log_positive = torch.where(same_image, 0.0, -scaled)
        log_negative = torch.where(same_image, float("-inf"), torch.log(-torch.expm1(-scaled)))
        others = ~eye_mask(n, student.device)
    pull = _log_one_plus_sum_exp(log_positive + alpha * normalised, others) / alpha
    push = _log_one_plus_sum_exp(log_negative + beta * (delta - normalised), others) / beta
    per_anchor = pull + push
    active = per_anchor > 0
    return torch.where(active, per_anchor, 0.0).sum() / active.sum().clamp(min=1)


# --- RKD: W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", CVPR 2019.


def _global_mean_normalised(distances: torch.Tensor) -> torch.Tensor:
    """D / μ with μ the mean of the positive entries of D (left unscaled when there are none)."""
    positive = distances > 0
    count = positive.sum()
    mean = torch.where(positive, distances, 0.0).sum() / count.clamp(min=1)
    return distances / torch.where(count > 0, mean, torch.ones_like(mean))


@full_precision
def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance term (Park et al., CVPR 2019; seed-spec §2.12).

    With D = pdist of each side divided by the global mean of its positive entries,
    L_D = mean over all N² entries (diagonal included) of SmoothL1_{β=1}(D^student_ij − D^teacher_ij).
    Scale-free on both sides (up to the pdist eps clamp).

    Args:
        student: (N, D_s) raw student embeddings.
        teacher: (N, D_t) teacher embeddings as given (the caller normalises them, as the official code).

    Returns:
        Scalar loss; 0 when the student's distances are proportional to the teacher's.
    """
    check_embeddings("rkd_distance", student, teacher)
    student_distances = _global_mean_normalised(pairwise_distances(student))
    with torch.no_grad():
        teacher_distances = _global_mean_normalised(pairwise_distances(teacher.detach()))
    return F.smooth_l1_loss(student_distances, teacher_distances, reduction="mean", beta=1.0)


def _angle_cosines(x: torch.Tensor) -> torch.Tensor:
    """(N, N, N) tensor of ⟨e_ab, e_ac⟩ with e_ab = normalize(x_b − x_a); e_aa (and duplicates) are 0."""
    unit_differences = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # [a, b] = e_ab
    return torch.bmm(unit_differences, unit_differences.transpose(1, 2))


@full_precision
def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle term (Park et al., CVPR 2019; seed-spec §2.12).

    cos_abc = ⟨e_ab, e_ac⟩ with e_ab = (x_b − x_a)/‖x_b − x_a‖ (the cosine of the angle at vertex a);
    L_A = mean over all N³ triples of SmoothL1_{β=1}(cos^student_abc − cos^teacher_abc). Degenerate
    triples (a ∈ {b, c}, or coincident rows) give a zero e and add 0 to both sides. Memory is O(N²·D + N³).

    Args:
        student: (N, D_s) raw student embeddings.
        teacher: (N, D_t) teacher embeddings as given.

    Returns:
        Scalar loss; 0 when the student is a scaled, rotated or shifted copy of the teacher.
    """
    check_embeddings("rkd_angle", student, teacher)
    student_cosines = _angle_cosines(student)
    with torch.no_grad():
        teacher_cosines = _angle_cosines(teacher.detach())
    return F.smooth_l1_loss(student_cosines, teacher_cosines, reduction="mean", beta=1.0)


# --- PKT: N. Passalis, A. Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
# ECCV 2018.


def _pkt_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-normalised cosine kernel P_ij = K_ij / Σ_k K_ik with K = (cos + 1)/2, diagonal included."""
    unit = x / (x.norm(p=2, dim=1, keepdim=True) + eps)
    unit = torch.where(torch.isnan(unit), 0.0, unit)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


@full_precision
def pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018; seed-spec §2.11).

    Each side is normalised as x/(‖x‖ + eps) (NaNs set to 0), turned into P as in the kernel above, and

        L = mean over all N² entries of P^t_ij log((P^t_ij + eps) / (P^s_ij + eps)),

    a KL(teacher ‖ student) averaged instead of summed.

    Args:
        student: (N, D_s) student embeddings (normalised inside).
        teacher: (N, D_t) teacher embeddings (normalised inside).
        eps: added to the norms and inside the logarithm.

    Returns:
        Scalar loss; 0 when both sides have the same cosine matrix.
    """
    check_embeddings("pkt", student, teacher)
    student_probabilities = _pkt_probabilities(student, eps)
    with torch.no_grad():
        teacher_probabilities = _pkt_probabilities(teacher.detach(), eps)
    ratio = (teacher_probabilities + eps) / (student_probabilities + eps)
    return (teacher_probabilities * torch.log(ratio)).mean()


# --- DarkRank: Y. Chen, N. Wang, Z. Zhang, "DarkRank: Accelerating Deep Metric Learning via Cross Sample
# Similarities Transfer", AAAI 2018 (hard variant, settings of the RKD code).


@full_precision
def dark_rank(
    student: torch.Tensor, teacher: torch.Tensor, alpha: float = 3.0, beta: float = 3.0, list_length: int = 4
) -> torch.Tensor:
    """Hard DarkRank ranking term (Chen et al., AAAI 2018; seed-spec §2.10), without the triplet term.

    Both sides are L2-normalised; scores are a_ij = −α D_ij^β on pdist. For each anchor i the teacher's
    ``list_length`` highest-scoring other samples, in descending teacher order, index the student scores
    o_1..o_L, and log P_i = Σ_k [o_k − logsumexp(o_k, …, o_L)] (Plackett-Luce on the truncated list).
    L = −mean_i log P_i. The list is capped at N − 1.

    Self-exclusion differs from the official code, which drops rank 0 of the sorted teacher row assuming
    it is the anchor. Here the anchor is excluded by index. The two agree whenever the anchor's score
    (0) is the unique maximum of its row, which holds for distinct rows; with exact duplicate teacher rows
    the duplicate's score −α·sqrt(eps)^β can round to 0 (low precision, large β) and tie with the anchor,
    and the unstable sort may then drop the duplicate and keep the anchor itself in the list: a
    zero-distance self pair that carries no ranking information and pushes a real neighbour out.

    Args:
        student: (N, D_s) student embeddings (normalised inside).
        teacher: (N, D_t) teacher embeddings (normalised inside).
        alpha: score scale α.
        beta: distance exponent β.
        list_length: length L of the teacher's ranked list per anchor.

    Returns:
        Scalar loss; 0 (with graph) when N < 2.
    """
    n = check_embeddings("dark_rank", student, teacher)
    if list_length < 1:
        raise ValueError(f"dark_rank needs list_length >= 1, got {list_length!r}")
    length = min(list_length, n - 1)
    if length < 1:
        return zero_with_graph(student)
    with torch.no_grad():
        teacher_distances = pairwise_distances(F.normalize(teacher.detach(), p=2, dim=1))
        teacher_scores = (-alpha * teacher_distances.pow(beta)).masked_fill(eye_mask(n, teacher.device), -torch.inf)
        ranked = teacher_scores.topk(length, dim=1).indices
    student_distances = pairwise_distances(F.normalize(student, p=2, dim=1))
    ordered_scores = -alpha * student_distances.gather(1, ranked).pow(beta)  # never touches D_ii = 0
    tail_logsumexp = torch.logcumsumexp(ordered_scores.flip(1), dim=1).flip(1)
    return -(ordered_scores - tail_logsumexp).sum(dim=1).mean()
