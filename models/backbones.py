"""Convolutional backbones that return their tapped feature maps (seed-spec §3).

Every backbone is registered in ``dmlkd.registry.BACKBONES`` as a builder
``builder(pretrained=False, bn_momentum=None) -> Backbone``. ``pretrained`` is ``False`` (random init),
``True`` (ImageNet weights, downloaded once into ``$TORCH_HOME/hub/checkpoints``) or a local file path.

The torchvision nets keep torchvision's attribute names (``conv1``, ``bn1``, ``layer1`` ...) without the
classifier, so their state-dict keys are torchvision's and those of the reference checkpoints (§4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torchvision.models as tvm
from torch import Tensor, nn

from dmlkd.models.pretrained import load_pretrained
from dmlkd.registry import BACKBONES


class Backbone(nn.Module):
    """A feature extractor whose ``forward(x)`` returns the tapped maps ``[(B, C_i, H_i, W_i), ...]``.

    The maps are post-ReLU and come in network order; the last one is the final map that the embedding
    network pools. Subclasses set ``tap_channels`` (the ``C_i``) in their constructor.

    Attributes:
        tap_channels: channels of the tapped maps, in the order ``forward`` returns them.
        checkpoint_ignored_prefixes: state-dict key prefixes of pretrained files that this backbone does not
            have (classifiers, auxiliary heads); they are dropped before the strict key check.
        default_bn_momentum: the BatchNorm momentum the architecture is built with (PyTorch semantics).
    """

    tap_channels: tuple[int, ...] = ()
    checkpoint_ignored_prefixes: tuple[str, ...] = ()
    default_bn_momentum: float = 0.1

    @property
    def out_channels(self) -> int:
        """Channels of the last (pooled) map."""
        return self.tap_channels[-1]

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def adapt_checkpoint(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Turn a pretrained file's state dict into this module's layout (drops ignored prefixes)."""
        prefixes = self.checkpoint_ignored_prefixes
        return {key: value for key, value in state_dict.items() if not (prefixes and key.startswith(prefixes))}

    def set_bn_momentum(self, momentum: float) -> None:
        """Set the momentum of every BatchNorm layer (PyTorch semantics: weight of the new batch)."""
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = momentum


class ResNetBackbone(Backbone):
    """A torchvision ResNet without ``avgpool``/``fc``; taps ``layer1`` .. ``layer4``."""

    checkpoint_ignored_prefixes = ("fc.",)

    def __init__(self, net: tvm.ResNet) -> None:
        super().__init__()
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        expansion = type(net.layer1[0]).expansion
        self.tap_channels = tuple(width * expansion for width in (64, 128, 256, 512))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            maps.append(x)
        return maps


class GoogLeNetBackbone(Backbone):
    """torchvision GoogLeNet without aux heads and classifier; taps ``inception3b``, ``4e``, ``5b``.

    The taps (480, 832, 1024 channels at strides 8, 16, 32) mirror BN-Inception's 3c/4e/5b blocks. As in the
    reference (PA), ``transform_input`` is off; feed the ImageNet normalisation the config names.
    """

    checkpoint_ignored_prefixes = ("fc.", "aux1.", "aux2.")

    def __init__(self, net: tvm.GoogLeNet) -> None:
        super().__init__()
        names = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3"]
        names += [f"inception4{s}" for s in "abcde"] + ["maxpool4", "inception5a", "inception5b"]
        for name in names:
            self.add_module(name, getattr(net, name))
        self.tap_channels = (480, 832, 1024)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        tap3 = self.inception3b(self.inception3a(x))
        x = self.maxpool3(tap3)
        for name in ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e"):
            x = getattr(self, name)(x)
        tap4 = x
        tap5 = self.inception5b(self.inception5a(self.maxpool4(tap4)))
        return [tap3, tap4, tap5]


def finish_backbone(backbone: Backbone, pretrained: bool | str, url: str, bn_momentum: float | None) -> Backbone:
    """Load the requested weights into ``backbone`` and set its BatchNorm momentum if one is given."""
    load_pretrained(backbone, pretrained, url)
    if bn_momentum is not None:
        backbone.set_bn_momentum(bn_momentum)
    return backbone


_RESNETS: dict[str, tuple[Callable[..., tvm.ResNet], str]] = {
    "resnet18": (tvm.resnet18, "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet34": (tvm.resnet34, "ResNet34_Weights.IMAGENET1K_V1"),
    "resnet50": (tvm.resnet50, "ResNet50_Weights.IMAGENET1K_V1"),
    "resnet101": (tvm.resnet101, "ResNet101_Weights.IMAGENET1K_V1"),
}


def _register_resnet(name: str) -> None:
    factory, weights_name = _RESNETS[name]

    def build(
        pretrained: bool | str = False, bn_momentum: float | None = None, zero_init_residual: bool = False
    ) -> Backbone:
        # zero_init_residual only zeroes the last BN gamma of each block after the usual initialisation (no extra
        # random draws); weights loaded below replace it.
        backbone = ResNetBackbone(factory(weights=None, zero_init_residual=zero_init_residual))
        return finish_backbone(backbone, pretrained, tvm.get_weight(weights_name).url, bn_momentum)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"torchvision {name}; ``pretrained=True`` loads {weights_name} (the reference's weights)."
    BACKBONES.register(name)(build)


for _name in _RESNETS:
    _register_resnet(_name)


@BACKBONES.register("googlenet")
def googlenet(pretrained: bool | str = False, bn_momentum: float | None = None) -> Backbone:
    """torchvision GoogLeNet; ``pretrained=True`` loads GoogLeNet_Weights.IMAGENET1K_V1 minus aux heads."""
    net = tvm.GoogLeNet(aux_logits=False, transform_input=False, init_weights=True)
    url = tvm.get_weight("GoogLeNet_Weights.IMAGENET1K_V1").url
    return finish_backbone(GoogLeNetBackbone(net), pretrained, url, bn_momentum)
