"""The three scenarios of the embedding-transfer paper (Kim et al., CVPR 2021) as data. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from dmlkd.errors import ConfigError, choices


@dataclass(frozen=True)
class Scenario:
    name: str
    teacher: str  # default teacher spec (the pipeline's --src)
    student: str  # default student spec (the pipeline's --dst)
    summary: str


SCENARIOS: dict[str, Scenario] = {
    "self-transfer": Scenario(
        "self-transfer",
        "bn_inception-512",
        "bn_inception-512",
        "same architecture and dimension: does transfer improve on the source itself?",
    ),
    "dim-reduction": Scenario(
        "dim-reduction", "bn_inception-512", "bn_inception-64", "same backbone, 8x smaller embedding"
    ),
    "compress": Scenario(
        "compress",
        "resnet50-512",
        "resnet18-128",
        "smaller backbone and smaller embedding (model compression)",
    ),
}

# ResNet-50 trained from scratch does not learn the 32 px demo glyphs within minutes (measured: Recall@1 32.5
# untrained, 15.5 after 4 epochs with proxy-anchor or normalised softmax), so on the demo data the compression
# scenario defaults to a ResNet-34 teacher; on real datasets (ImageNet weights, 224 px) it is ResNet-50.
# `--src resnet50-512` on the demo trains with its own recipe (teacher/config.py DEMO_GLYPHS_BY_ARCH).
DEMO_TEACHER = {"compress": "resnet34-512"}

# BN-Inception's stride-2 branches need inputs of at least 64 px (and sizes where they line up).
MIN_IMAGE_SIZE = {"bn_inception": 64, "googlenet": 64}


def scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise ConfigError(f"unknown scenario {name!r}; choose from: {choices(SCENARIOS)}")
    return SCENARIOS[name]
