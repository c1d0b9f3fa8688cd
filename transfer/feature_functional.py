"""Feature-map transfer terms (AT and FitNet), re-exported by ``dmlkd.transfer.functional``.

Same conventions as ``dmlkd.transfer.functional``: student first, teacher second, full precision inside,
no gradient to the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmlkd.numerics import full_precision

# --- Feature-map terms: S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention", ICLR 2017;
# A. Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.


@full_precision
def attention_map(feature_map: torch.Tensor) -> torch.Tensor:
    """Attention map a = normalize_L2(mean_c(F²) flattened over H·W) (Zagoruyko & Komodakis; §2.8).

    Args:
        feature_map: (B, C, H, W) features.

    Returns:
        (B, H·W) unit-norm rows (a zero map stays zero).
    """
    if feature_map.dim() != 4:
        raise ValueError(f"attention_map needs a (B, C, H, W) feature map, got {tuple(feature_map.shape)}")
    return F.normalize(feature_map.pow(2).mean(dim=1).flatten(1), p=2, dim=1)


@full_precision
def attention_transfer(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Attention transfer for one stage (seed-spec §2.8): mean over B·H·W of (a_student − a_teacher)².

    Args:
        student_map: (B, C_s, H, W) student features.
        teacher_map: (B, C_t, H, W) teacher features; channel counts may differ, B, H and W may not.

    Returns:
        Scalar loss (weight 1 in the official code, no β scaling).
    """
    if (
        student_map.dim() != 4
        or teacher_map.dim() != 4
        or student_map.shape[0] != teacher_map.shape[0]
        or student_map.shape[2:] != teacher_map.shape[2:]
    ):
        raise ValueError(
            "attention_transfer needs (B, C, H, W) maps with equal B, H and W, got student "
            f"{tuple(student_map.shape)} and teacher {tuple(teacher_map.shape)}"
        )
    student_attention = attention_map(student_map)
    with torch.no_grad():
        teacher_attention = attention_map(teacher_map.detach())
    return (student_attention - teacher_attention).pow(2).mean()


@full_precision
def fitnet_stage(student_regressed_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """FitNet hint loss for one stage (Romero et al.; seed-spec §2.7): mean over B·C·H·W of (r − F_t)².

    Args:
        student_regressed_map: (B, C_t, H, W) student features after the 1×1 regressor.
        teacher_map: (B, C_t, H, W) teacher features (detached).

    Returns:
        Scalar loss.
    """
    if student_regressed_map.shape != teacher_map.shape:
        raise ValueError(
            "fitnet_stage needs the regressed student map and the teacher map to have the same shape, got "
            f"student {tuple(student_regressed_map.shape)} and teacher {tuple(teacher_map.shape)}"
        )
    return (student_regressed_map - teacher_map.detach()).pow(2).mean()
