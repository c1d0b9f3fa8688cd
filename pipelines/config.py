"""Pipeline configuration: what a ``dmlkd pipeline`` command asked for, saved in ``pipeline.json``."""

from __future__ import annotations

import dataclasses

from dmlkd.config import DataConfig
from dmlkd.errors import ConfigError


@dataclasses.dataclass
class PipelineConfig:
    """A scenario run: teacher SRC, student spec DST, transfer methods and per-stage ``--set`` overrides.

    ``teacher_overrides``/``transfer_overrides`` are ``KEY=VALUE`` items applied to the stage configs after
    the scenario's recipes (e.g. ``train.epochs=2``). ``teacher_check_tolerance`` is how far (absolute
    Recall@1) a re-evaluated teacher may fall below the metrics recorded in its checkpoint before the
    pipeline stops.
    """

    scenario: str
    src: str
    dst: str
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    methods: list[str] = dataclasses.field(default_factory=lambda: ["relaxed_contrastive"])
    teacher_overrides: list[str] = dataclasses.field(default_factory=list)
    transfer_overrides: list[str] = dataclasses.field(default_factory=list)
    teacher_check_tolerance: float = 0.05
    export_format: str = "safetensors"
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("--methods needs at least one transfer method")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"--methods lists a method twice: {','.join(self.methods)}")
        if not 0 <= self.teacher_check_tolerance <= 1:
            raise ConfigError(f"teacher_check_tolerance must be in [0, 1], got {self.teacher_check_tolerance}")
