# FitNet: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for Thin Deep
# Nets", ICLR 2015. Attention transfer: S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention",
# ICLR 2017. Wiring of the LabelRelaxation code (seed-spec §2.7, §2.8, §3).
"""Attention transfer on every tapped stage plus Proxy-Anchor on the student embedding."""

from __future__ import annotations

from torch import Tensor

from dmlkd.data.batch import Batch
from dmlkd.models.outputs import ModelOutput
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer import functional
from dmlkd.transfer.base import ProxyAnchorTerm, TransferContext, check_weight
from dmlkd.transfer.taps import check_tap_fit, stage_pairs


@TRANSFER_METHODS.register("attention")
class AttentionTransfer(ProxyAnchorTerm):
    """Attention transfer on every tapped stage + Proxy-Anchor on the student embedding.

    The reference weights each stage by 1 (no β≈10³ as in the AT paper), which makes this baseline weak:
    the attention signal is tiny next to Proxy-Anchor (seed-spec §2.8, §10.14); ``beta`` restores the
    paper's scaling. Channel counts may differ; strides may not.
    Returns ``{"attention_stage0": beta · ℓ_0, ..., "proxy_anchor": pa_weight · L_PA}``.

    Args:
        beta: weight of each stage's attention loss (reference 1).
        pa_weight: weight of the Proxy-Anchor term.
        pa_margin: Proxy-Anchor δ.
        pa_alpha: Proxy-Anchor α.
    """

    needs_features = True
    cacheable = False

    def __init__(self, context: TransferContext, beta: float = 1.0, **proxy_anchor: float) -> None:
        super().__init__(context, **proxy_anchor)
        check_tap_fit("attention", context.student, context.teacher)
        self.beta = check_weight("beta", beta)
        self._init_proxy_anchor()

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        pairs = stage_pairs("attention", student, teacher, (self.student_info, self.teacher_info))
        terms = {
            f"attention_stage{stage}": self.beta * functional.attention_transfer(student_map, teacher_map)
            for stage, (student_map, teacher_map) in enumerate(pairs)
        }
        return {**terms, **self.proxy_anchor_term(student, batch)}

    def extra_repr(self) -> str:
        return f"beta={self.beta}, pa_weight={self.pa_weight}"
