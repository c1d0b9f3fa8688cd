"""Small structured values passed between data, models and losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


@dataclass
class ModelOutput:
    """What an ``EmbeddingNet`` returns.

    Attributes:
        embedding: ``(B, D)`` embedding (L2-normalised only if the model was built with ``l2_norm``).
        pooled: ``(B, C)`` pooled backbone feature before the embedding layer (GAP + GMP summed; CRD).
        features: the tapped stage maps ``(B, C_i, H_i, W_i)`` (seed-spec §3), only when asked for.
    """

    embedding: Tensor
    pooled: Tensor
    features: tuple[Tensor, ...] | None = None


class Batch(NamedTuple):
    """A collated batch. With V views, ``images`` is view-major: row ``i + v * B`` is view ``v`` of image i.

    ``labels`` and ``indices`` (dataset positions) are repeated per view the same way.
    """

    images: Tensor
    labels: Tensor
    indices: Tensor
