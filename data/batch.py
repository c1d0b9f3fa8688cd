"""The collated batch the data loaders yield and every training step consumes."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Batch(NamedTuple):
    """A collated batch. With V views, ``images`` is view-major: row ``i + v * B`` is view ``v`` of image i.

    ``labels`` and ``indices`` (dataset positions) are repeated per view the same way.
    """

    images: Tensor
    labels: Tensor
    indices: Tensor
