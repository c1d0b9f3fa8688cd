# FitNet: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for Thin Deep
# Nets", ICLR 2015. Attention transfer: S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention",
# ICLR 2017. Wiring of the LabelRelaxation code (seed-spec §2.7, §2.8, §3).
"""Feature-map KD baselines (FitNet, attention transfer), each plus Proxy-Anchor on the student."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dmlkd.data.batch import Batch
from dmlkd.errors import ConfigError
from dmlkd.models.outputs import ModelOutput
from dmlkd.transfer import functional
from dmlkd.transfer.base import ModelInfo, ProxyAnchorTerm, check_weight

__all__ = ["TAP_STRIDES", "AttentionTransfer", "FitNet", "check_tap_fit", "stage_pairs"]

# Input size / map size of each tap of the registered backbones (224 input: ResNet 56², 28², 14², 7²;
# BN-Inception 14², 7², 7²; GoogLeNet 28², 14², 7²). Pairs of known architectures are checked up front;
# other pairs are checked on the first batch.
TAP_STRIDES: dict[str, tuple[int, ...]] = {
    "resnet18": (4, 8, 16, 32),
    "resnet34": (4, 8, 16, 32),
    "resnet50": (4, 8, 16, 32),
    "resnet101": (4, 8, 16, 32),
    "googlenet": (8, 16, 32),
    "bn_inception": (16, 32, 32),
}


def _fitting_students(teacher: ModelInfo) -> str:
    strides = teacher.tap_strides or TAP_STRIDES.get(teacher.arch)
    fits = sorted(arch for arch, other in TAP_STRIDES.items() if strides is not None and other == strides)
    if fits:
        return f"students that fit teacher {teacher.arch}: {', '.join(fits)}"
    return (
        f"use a student with {len(teacher.tap_channels)} taps at the strides of teacher {teacher.arch} "
        "(e.g. resnet18 -> resnet50, bn_inception -> bn_inception)"
    )


def check_tap_fit(method: str, student: ModelInfo, teacher: ModelInfo) -> None:
    """Raise a one-line ConfigError unless the two networks tap stages of equal number and spatial size.

    Tap counts are compared always, strides when both architectures are in :data:`TAP_STRIDES`.
    """
    tokens = [f"{side} {info.arch}" for side, info in (("student", student), ("teacher", teacher))]
    tokens = [name for name, info in zip(tokens, (student, teacher)) if info.tap_kind == "tokens"]
    if tokens:
        raise ConfigError(
            f"{method} pairs convolutional stage maps, but {' and '.join(tokens)} gives ViT token maps (one "
            "stride for every block); use a CNN on both sides or a method without feature maps "
            "(relaxed_contrastive, rkd, pkt, ...)"
        )
    student_strides = student.tap_strides or TAP_STRIDES.get(student.arch)
    teacher_strides = teacher.tap_strides or TAP_STRIDES.get(teacher.arch)
    count_differs = len(student.tap_channels) != len(teacher.tap_channels)
    stride_differs = None not in (student_strides, teacher_strides) and student_strides != teacher_strides
    if count_differs or stride_differs:
        raise ConfigError(
            f"{method} pairs stage maps one to one, but student {student.arch} has "
            f"{len(student.tap_channels)} taps (strides {student_strides or 'unknown'}) and teacher "
            f"{teacher.arch} has {len(teacher.tap_channels)} (strides {teacher_strides or 'unknown'}); "
            f"{_fitting_students(teacher)}; or use a method without feature maps"
        )


def _maps(side: str, method: str, output: ModelOutput, expected: int) -> tuple[Tensor, ...]:
    if output.features is None:
        hint = " (an embedding cache holds no stage maps; run the teacher online)" if side == "teacher" else ""
        raise ConfigError(f"{method} needs the {side}'s stage maps, got none{hint}")
    if len(output.features) != expected:
        raise ValueError(f"{method} expected {expected} {side} stage maps, got {len(output.features)}")
    return tuple(output.features)


def stage_pairs(
    method: str, student: ModelOutput, teacher: ModelOutput, infos: Sequence[ModelInfo]
) -> list[tuple[Tensor, Tensor]]:
    """``[(student_map, teacher_map), ...]`` per stage after checking presence, count and spatial sizes.

    Args:
        method: the method's name, for messages.
        student: the student's output, with features.
        teacher: the teacher's output, with features.
        infos: ``(student_info, teacher_info)``.
    """
    student_info, teacher_info = infos
    student_maps = _maps("student", method, student, len(student_info.tap_channels))
    teacher_maps = _maps("teacher", method, teacher, len(teacher_info.tap_channels))
    for stage, (student_map, teacher_map) in enumerate(zip(student_maps, teacher_maps)):
        if student_map.shape[0] != teacher_map.shape[0] or student_map.shape[2:] != teacher_map.shape[2:]:
            raise ConfigError(
                f"{method} stage {stage}: student {student_info.arch} map {tuple(student_map.shape)} and "
                f"teacher {teacher_info.arch} map {tuple(teacher_map.shape)} differ in batch or spatial "
                "size; feed both the same images and pair architectures whose taps have equal strides"
            )
    return list(zip(student_maps, teacher_maps))


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

    method_name = "fitnet"
    needs_features = True
    cacheable = False
    parameter_group_name = "regressors"

    def __init__(
        self,
        student: ModelInfo,
        teacher: ModelInfo,
        num_classes: int,
        num_train: int,
        num_views: int,
        stage_weight: float = 1.0,
        init_range: float = 0.005,
        pa_weight: float = 1.0,
        pa_margin: float = 0.1,
        pa_alpha: float = 32.0,
    ) -> None:
        super().__init__(student, teacher, num_classes, num_train, num_views)
        check_tap_fit(self.method_name, student, teacher)
        self.stage_weight = check_weight("stage_weight", stage_weight)
        self.init_range = check_weight("init_range", init_range)
        self.regressors = nn.ModuleList(
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
            for student_channels, teacher_channels in zip(student.tap_channels, teacher.tap_channels)
        )
        self._init_proxy_anchor(pa_weight, pa_margin, pa_alpha)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Regressor weights ~U(−init_range, init_range), as the reference's FitNet module."""
        for regressor in self.regressors:
            nn.init.uniform_(regressor.weight, -self.init_range, self.init_range)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        pairs = stage_pairs(self.method_name, student, teacher, (self.student_info, self.teacher_info))
        terms = {
            f"fitnet_stage{stage}": self.stage_weight * functional.fitnet_stage(regressor(student_map), teacher_map)
            for stage, (regressor, (student_map, teacher_map)) in enumerate(zip(self.regressors, pairs))
        }
        return {**terms, **self.proxy_anchor_term(student, batch)}

    def extra_repr(self) -> str:
        return f"stage_weight={self.stage_weight}, init_range={self.init_range}, pa_weight={self.pa_weight}"


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

    method_name = "attention"
    needs_features = True
    cacheable = False

    def __init__(
        self,
        student: ModelInfo,
        teacher: ModelInfo,
        num_classes: int,
        num_train: int,
        num_views: int,
        beta: float = 1.0,
        pa_weight: float = 1.0,
        pa_margin: float = 0.1,
        pa_alpha: float = 32.0,
    ) -> None:
        super().__init__(student, teacher, num_classes, num_train, num_views)
        check_tap_fit(self.method_name, student, teacher)
        self.beta = check_weight("beta", beta)
        self._init_proxy_anchor(pa_weight, pa_margin, pa_alpha)

    def forward(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        pairs = stage_pairs(self.method_name, student, teacher, (self.student_info, self.teacher_info))
        terms = {
            f"attention_stage{stage}": self.beta * functional.attention_transfer(student_map, teacher_map)
            for stage, (student_map, teacher_map) in enumerate(pairs)
        }
        return {**terms, **self.proxy_anchor_term(student, batch)}

    def extra_repr(self) -> str:
        return f"beta={self.beta}, pa_weight={self.pa_weight}"
