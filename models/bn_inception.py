"""BN-Inception (Inception v2 with BatchNorm) in the layout of the Caffe port (Cadene ``bninception``).

Module names, kernel sizes, strides, ``ceil_mode`` pooling and channel numbers follow the port, so its
ImageNet file ``bn_inception-52deb4733.pth`` and the reference DML checkpoints load by key name
(``conv1_7x7_s2.weight``, ``inception_3a_1x1_bn.running_mean``, ...). The ten inception blocks are built
from the table ``BLOCKS`` instead of one assignment per layer.

Every convolution is followed by BatchNorm and ReLU, and the ReLU output is what the next layer and the
block concatenation see; this is what the port's in-place ReLUs compute (seed-spec §3), written without
relying on aliasing. Input: BGR, 0-255, minus mean [104, 117, 128] (``CAFFE_BGR``; ``EmbeddingNet`` does it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmlkd.models.backbones import Backbone, finish_backbone
from dmlkd.models.pretrained import BN_INCEPTION_URL
from dmlkd.registry import BACKBONES


class InceptionBlock(NamedTuple):
    """One inception block; a width of 0 means the branch (or the pool projection) does not exist.

    Branches, concatenated in this order: ``1x1``; ``3x3_reduce -> 3x3``; ``double_3x3_reduce ->
    double_3x3_1 -> double_3x3_2``; ``pool -> pool_proj``. Reduction blocks (stride 2) have no 1x1 branch
    and pass their max-pooled input through without projection.
    """

    name: str
    in_channels: int
    c1x1: int
    c3x3_reduce: int
    c3x3: int
    double_reduce: int
    double: int
    pool: Literal["avg", "max"]
    pool_proj: int
    stride: int = 1

    @property
    def out_channels(self) -> int:
        pooled = self.pool_proj if self.pool_proj else self.in_channels
        return self.c1x1 + self.c3x3 + self.double + pooled


BLOCKS: tuple[InceptionBlock, ...] = (
    InceptionBlock("3a", 192, 64, 64, 64, 64, 96, "avg", 32),
    InceptionBlock("3b", 256, 64, 64, 96, 64, 96, "avg", 64),
    InceptionBlock("3c", 320, 0, 128, 160, 64, 96, "max", 0, stride=2),
    InceptionBlock("4a", 576, 224, 64, 96, 96, 128, "avg", 128),
    InceptionBlock("4b", 576, 192, 96, 128, 96, 128, "avg", 128),
    InceptionBlock("4c", 576, 160, 128, 160, 128, 160, "avg", 128),
    InceptionBlock("4d", 608, 96, 128, 192, 160, 192, "avg", 128),
    InceptionBlock("4e", 608, 0, 128, 192, 192, 256, "max", 0, stride=2),
    InceptionBlock("5a", 1056, 352, 192, 320, 160, 224, "avg", 128),
    InceptionBlock("5b", 1024, 352, 192, 320, 192, 224, "max", 128),
)
TAPPED_BLOCKS = ("3c", "4e", "5b")  # seed-spec §3: 576, 1056, 1024 channels


class BNInception(Backbone):
    """BN-Inception returning the outputs of ``inception_3c``, ``inception_4e`` and ``inception_5b``.

    Args:
        bn_momentum: BatchNorm momentum in PyTorch semantics; the port's 0.9 (running statistics follow
            roughly the last batch) is the default, as in the reference code.
    """

    checkpoint_ignored_prefixes = ("last_linear.",)
    default_bn_momentum = 0.9

    def __init__(self, bn_momentum: float = 0.9) -> None:
        super().__init__()
        self._bn_momentum = bn_momentum
        self._add_unit("conv1_7x7_s2", 3, 64, kernel=7, stride=2)
        self._add_unit("conv2_3x3_reduce", 64, 64, kernel=1)
        self._add_unit("conv2_3x3", 64, 192, kernel=3)
        for block in BLOCKS:
            self._add_block(block)
        self.tap_channels = tuple(block.out_channels for block in BLOCKS if block.name in TAPPED_BLOCKS)

    def _add_unit(self, name: str, in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> None:
        """Register ``name`` (a biased convolution) and ``name_bn``, as the port names them."""
        conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
        self.add_module(name, conv)
        self.add_module(f"{name}_bn", nn.BatchNorm2d(out_channels, eps=1e-5, momentum=self._bn_momentum))

    def _add_block(self, block: InceptionBlock) -> None:
        prefix, cin = f"inception_{block.name}", block.in_channels
        if block.c1x1:
            self._add_unit(f"{prefix}_1x1", cin, block.c1x1, kernel=1)
        self._add_unit(f"{prefix}_3x3_reduce", cin, block.c3x3_reduce, kernel=1)
        self._add_unit(f"{prefix}_3x3", block.c3x3_reduce, block.c3x3, kernel=3, stride=block.stride)
        self._add_unit(f"{prefix}_double_3x3_reduce", cin, block.double_reduce, kernel=1)
        self._add_unit(f"{prefix}_double_3x3_1", block.double_reduce, block.double, kernel=3)
        self._add_unit(f"{prefix}_double_3x3_2", block.double, block.double, kernel=3, stride=block.stride)
        if block.pool_proj:
            self._add_unit(f"{prefix}_pool_proj", cin, block.pool_proj, kernel=1)

    def _unit(self, name: str, x: Tensor) -> Tensor:
        """Convolution, BatchNorm, ReLU: the rectified map the port's in-place ReLU leaves behind."""
        bn = getattr(self, f"{name}_bn")
        return F.relu(bn(getattr(self, name)(x)), inplace=True)

    def _block(self, block: InceptionBlock, x: Tensor) -> Tensor:
        prefix = f"inception_{block.name}"
        branches = []
        if block.c1x1:
            branches.append(self._unit(f"{prefix}_1x1", x))
        branches.append(self._unit(f"{prefix}_3x3", self._unit(f"{prefix}_3x3_reduce", x)))
        double = self._unit(f"{prefix}_double_3x3_reduce", x)
        double = self._unit(f"{prefix}_double_3x3_1", double)
        branches.append(self._unit(f"{prefix}_double_3x3_2", double))
        pooled = _pool(block, x)
        branches.append(self._unit(f"{prefix}_pool_proj", pooled) if block.pool_proj else pooled)
        return torch.cat(branches, dim=1)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.max_pool2d(self._unit("conv1_7x7_s2", x), 3, stride=2, ceil_mode=True)
        x = self._unit("conv2_3x3", self._unit("conv2_3x3_reduce", x))
        x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        maps = []
        for block in BLOCKS:
            x = self._block(block, x)
            if block.name in TAPPED_BLOCKS:
                maps.append(x)
        return maps

    def adapt_checkpoint(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Drop ``last_linear``; squeeze leading singleton dims (the port stores BN tensors as ``(1, C)``)."""
        state = super().adapt_checkpoint(state_dict)
        return {key: _squeeze_leading(value) for key, value in state.items()}


def _squeeze_leading(value: Tensor) -> Tensor:
    return value.squeeze(0) if value.dim() > 1 and value.shape[0] == 1 else value


def _pool(block: InceptionBlock, x: Tensor) -> Tensor:
    """The pool branch: 3x3 average (stride 1, pad 1), 3x3 max with stride 2 (reduction blocks) or 1 (5b)."""
    if block.pool == "avg":
        return F.avg_pool2d(x, 3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
    if block.stride == 2:
        return F.max_pool2d(x, 3, stride=2, ceil_mode=True)
    return F.max_pool2d(x, 3, stride=1, padding=1, ceil_mode=True)


@BACKBONES.register("bn_inception")
def bn_inception(pretrained: bool | str = False, bn_momentum: float | None = None) -> Backbone:
    """BN-Inception; ``pretrained=True`` loads the Caffe port ``bn_inception-52deb4733.pth`` (ImageNet)."""
    backbone = BNInception(bn_momentum=BNInception.default_bn_momentum if bn_momentum is None else bn_momentum)
    return finish_backbone(backbone, pretrained, BN_INCEPTION_URL, None)
