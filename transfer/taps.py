"""Which backbone stages feature-map methods (FitNet, attention) pair, and the checks that they fit."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from dmlkd.errors import ConfigError
from dmlkd.models.outputs import ModelOutput
from dmlkd.transfer.base import ModelInfo

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
