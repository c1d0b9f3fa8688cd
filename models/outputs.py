"""What a model returns (``ModelOutput``); the batch it is fed is ``dmlkd.data.batch.Batch``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ModelOutput:
    """What an ``EmbeddingNet`` returns.

    Attributes:
        embedding: ``(B, D)`` embedding (L2-normalised only if the model was built with ``l2_norm``).
        pooled: ``(B, C)`` pooled backbone feature before the embedding layer (GAP + GMP summed; CRD).
        features: the tapped feature maps ``(B, C_i, H_i, W_i)`` (seed-spec §3), only when asked for.
    """

    embedding: Tensor
    pooled: Tensor
    features: tuple[Tensor, ...] | None = None
