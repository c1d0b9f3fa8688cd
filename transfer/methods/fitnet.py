# FitNet: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for Thin Deep
# Nets", ICLR 2015. Attention transfer: S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention",
# ICLR 2017. Wiring of the LabelRelaxation code (seed-spec §2.7, §2.8, §3).
"""FitNet hints on every tapped stage plus Proxy-Anchor on the student embedding."""

from __future__ import annotations

from torch import Tensor, nn

from dmlkd.data.batch import Batch
from dmlkd.models.outputs import ModelOutput
from dmlkd.registry import TRANSFER_METHODS
from dmlkd.transfer import functional
from dmlkd.transfer.base import ProxyAnchorTerm, TransferContext, check_weight
from dmlkd.transfer.taps import check_tap_fit, stage_pairs


@TRANSFER_METHODS.register("fitnet")
class FitNet(ProxyAnchorTerm):
    """FitNet hints on every tapped stage + Proxy-Anchor on the student embedding.

    One 1×1 ``Conv2d`` regressor per stage maps student channels to teacher channels (no bias, weights
    ~U(−0.005, 0.005)), trained at the base lr (group ``"regressors"``). Works for any pair whose taps agree
    in number and strides (ResNet18 -> ResNet50 regresses 64→256, 128→512, 256→1024, 512→2048).
    Returns ``{"fitnet_stage0": stage_weight · ℓ_0, ..., "proxy_anchor": pa_weight · L_PA}``.

    Args:
        stage_weight: weight of each stage's hint loss (reference 1).
        init_range: the regressors' weights start ~U(−init_range, init_range).
        pa_weight: weight of the Proxy-Anchor term.
        pa_margin: Proxy-Anchor δ.
        pa_alpha: Proxy-Anchor α.
    """

    needs_features = True
    cacheable = False
    parameter_group_name = "regressors"

    def __init__(
        self, context: TransferContext, stage_weight: float = 1.0, init_range: float = 0.005, **proxy_anchor: float
    ) -> None:
        super().__init__(context, **proxy_anchor)
        check_tap_fit("fitnet", context.student, context.teacher)
        self.stage_weight = check_weight("stage_weight", stage_weight)
        self.init_range = check_weight("init_range", init_range)
        self.regressors = nn.ModuleList(
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
            for student_channels, teacher_channels in zip(context.student.tap_channels, context.teacher.tap_channels)
        )
        self._init_proxy_anchor()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Regressor weights ~U(−init_range, init_range), as the reference's FitNet module."""
        for regressor in self.regressors:
            nn.init.uniform_(regressor.weight, -self.init_range, self.init_range)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        pairs = stage_pairs("fitnet", student, teacher, (self.student_info, self.teacher_info))
        terms = {
            f"fitnet_stage{stage}": self.stage_weight * functional.fitnet_stage(regressor(student_map), teacher_map)
            for stage, (regressor, (student_map, teacher_map)) in enumerate(zip(self.regressors, pairs))
        }
        return {**terms, **self.proxy_anchor_term(student, batch)}

    def extra_repr(self) -> str:
        return f"stage_weight={self.stage_weight}, init_range={self.init_range}, pa_weight={self.pa_weight}"
