"""The embedding network: backbone, global pooling, linear head (seed-spec §4).

``EmbeddingNet`` takes RGB images in [0, 1] and applies the preprocessing its backbone's weights expect
(channel flip to BGR, scaling to 0-255, mean/std) itself, so a BGR/0-255 teacher and an ImageNet-normalised
student can be fed the same batch. State-dict keys are ``backbone.<torchvision or Caffe-port name>`` and
``embedding.weight`` / ``embedding.bias``; the preprocessing constants are non-persistent buffers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmlkd.errors import ConfigError
from dmlkd.models.backbones import Backbone
from dmlkd.models.inputs import embed_images
from dmlkd.models.outputs import ModelOutput
from dmlkd.models.spec import ModelConfig, Preprocessing, input_size_problem
from dmlkd.models.timm_backbone import build_timm_backbone, timm_preprocessing
from dmlkd.registry import BACKBONES


def global_pool(feature_map: Tensor, mode: str) -> Tensor:
    """Pool ``(B, C, H, W)`` to ``(B, C)``: ``avg``, ``max`` or ``avg+max`` (summed, not concatenated)."""
    if mode == "avg":
        return feature_map.mean(dim=(2, 3))
    if mode == "max":
        return feature_map.amax(dim=(2, 3))
    return feature_map.mean(dim=(2, 3)) + feature_map.amax(dim=(2, 3))


def init_head(layer: nn.Linear, method: str) -> None:
    """Orthogonal (LR) or Kaiming-normal fan_out (PA) weights; bias 0."""
    if method == "orthogonal":
        nn.init.orthogonal_(layer.weight)
    else:
        nn.init.kaiming_normal_(layer.weight, mode="fan_out")
    nn.init.zeros_(layer.bias)


def preprocessing_of(config: ModelConfig) -> Preprocessing:
    """The preprocessing ``config``'s model applies: the recorded one, else the timm pretrained config's (timm
    models), else the architecture default."""
    if config.preprocessing is None and config.is_timm:
        return timm_preprocessing(config.arch)
    return config.resolved_preprocessing()


class EmbeddingNet(nn.Module):
    """Backbone + global pooling + ``Linear(out_channels, D)`` + optional L2 normalisation.

    Args:
        config: what to build (architecture, dimension, head, pooling, weights, preprocessing).
        backbone: an already built backbone to use instead of building ``config.arch`` from the registry.

    Attributes:
        config: the ``ModelConfig`` this model was built from.
        embedding_dim: ``D``.
        pooled_dim: channels of the pooled feature (the backbone's last map).
        tap_channels: channels of the tapped feature maps returned with ``with_features=True``.
    """

    def __init__(self, config: ModelConfig, backbone: Backbone | None = None) -> None:
        super().__init__()
        if backbone is None and config.is_timm:
            backbone, config = build_timm_backbone(config)
        elif backbone is None:
            extra = {"zero_init_residual": True} if config.zero_init_residual else {}
            backbone = BACKBONES.build(
                config.arch, pretrained=config.weights_source(), bn_momentum=config.bn_momentum, **extra
            )
        self.config = config
        self.backbone = backbone
        self.pooled_dim = backbone.out_channels
        self.tap_channels = backbone.tap_channels
        self.tap_strides = getattr(backbone, "tap_strides", None)
        self.tap_kind = getattr(backbone, "tap_kind", "conv")
        if config.embedding_dim == 0:  # no head (timm models): the pooled feature is the embedding
            self.embedding_dim = self.pooled_dim
            self.embedding: nn.Module = nn.Identity()
        else:
            self.embedding_dim = config.embedding_dim
            self.embedding = nn.Linear(self.pooled_dim, self.embedding_dim)
            init_head(self.embedding, config.head_init)
        prep = preprocessing_of(config)
        self.flip_to_bgr = prep.color_order == "BGR"
        self.value_range = float(prep.value_range)
        self.register_buffer("input_mean", torch.tensor(prep.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(prep.std).view(1, 3, 1, 1), persistent=False)

    # ``torch.channels_last`` once ``dmlkd.engine.memory_format.use_channels_last`` converted the model.
    input_memory_format = torch.contiguous_format

    def preprocess(self, images: Tensor) -> Tensor:
        """Convert RGB ``(B, 3, H, W)`` in [0, 1] (float) or 0..255 (uint8) to this backbone's input convention.

        uint8 batches (the training loader's) become float here, on the model's device, with the same values as
        ``ToTensor`` (``x.float() / 255``); the result has the model's input memory format.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.to(torch.float32).div(255)
        images = images.contiguous(memory_format=self.input_memory_format)
        if self.flip_to_bgr:
            images = images.flip(1)
        return (images * self.value_range - self.input_mean) / self.input_std

    def forward(self, images: Tensor, with_features: bool = False) -> ModelOutput:
        """Embed a batch.

        Args:
            images: RGB ``(B, 3, H, W)``, float in [0, 1] (not normalised; the model does that).
            with_features: also return the tapped feature maps (FitNet / attention transfer need them).

        Returns:
            ``ModelOutput`` with ``embedding`` ``(B, D)`` (unit norm if ``config.l2_norm``), ``pooled``
            ``(B, pooled_dim)`` and, if asked, ``features``: the post-ReLU maps ``(B, C_i, H_i, W_i)``.
        """
        if images.dim() == 4:
            problem = input_size_problem(self.config.arch, int(images.shape[-2]), int(images.shape[-1]))
            if problem:
                raise ConfigError(f"{problem}; choose another image size (--image-size)")
        pool = getattr(self.backbone, "pooled_and_taps", None)
        if pool is not None:  # timm backbones pool as their own head does
            pooled, maps = pool(self.preprocess(images), with_features)
        else:
            maps = self.backbone(self.preprocess(images))
            pooled = global_pool(maps[-1], self.config.pooling)
        embedding = self.embedding(pooled)
        if self.config.l2_norm:
            embedding = F.normalize(embedding, p=2, dim=1)
        return ModelOutput(embedding=embedding, pooled=pooled, features=tuple(maps) if with_features and maps else None)

    def embed(
        self,
        images: Any,
        *,
        image_size: int | None = None,
        resize_ratio: float | str | None = "recorded",
        batch_size: int = 64,
        normalize: bool = False,
    ) -> Tensor:
        """Embed PIL images, image paths or an image tensor; returns ``(N, D)`` float32 on the CPU.

        PIL images and paths get the eval view at ``image_size`` (None: the size recorded with the
        checkpoint, else 224) and ``resize_ratio`` (``"recorded"``: the checkpoint's, else 256/224); tensors
        ``(B, 3, H, W)`` in [0, 1] (or uint8 0-255) are used as given. Runs in eval mode under ``no_grad`` on
        this model's device; ``normalize`` L2-normalises the rows. See ``dmlkd.inference.embed.embed_images``.
        """

        return embed_images(
            self,
            images,
            image_size=image_size,
            resize_ratio=resize_ratio,
            batch_size=batch_size,
            normalize=normalize,
        )


def build_model(config: ModelConfig) -> EmbeddingNet:
    """Build the embedding network ``config`` describes (downloading or reading weights if asked)."""
    return EmbeddingNet(config)


def create_model(spec: str, **config_overrides: Any) -> EmbeddingNet:
    """``create_model("resnet18-128", l2_norm=True)``: a spec plus ``ModelConfig`` field overrides."""
    return build_model(ModelConfig.from_spec(spec, **config_overrides))
