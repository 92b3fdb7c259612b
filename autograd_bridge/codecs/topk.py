"""The topk codec: the largest-magnitude entries of each update, their positions as a bitmask or indices.

The numerics and the layout are in :mod:`autograd_bridge.codecs.sparse`.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .container import decode_update, pack
from .settings import CodecSettings
from .sparse import sparsify


class TopKCodec:
    """Magnitude top-k of the weights (optimizer state whole), at the settings' density, scope and values dtype."""

    name = "topk"
    sends_changes = True

    def __init__(self, settings: CodecSettings | None = None) -> None:
        self.settings = settings or CodecSettings()

    def encode(self, tensors: Mapping[str, Tensor]) -> bytes:
        """The top-k layout of ``tensors`` as safetensors bytes."""
        return pack(sparsify(tensors, self.settings), self.name)

    def decode(self, data: bytes) -> dict[str, Tensor]:
        """Dense tensors of any codec's bytes: kept entries as sent, zero elsewhere (see :func:`decode_update`)."""
        return decode_update(data)
