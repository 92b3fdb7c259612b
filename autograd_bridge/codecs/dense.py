"""The dense codec: every tensor whole, as a safetensors file (no pickle)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .container import decode_update, pack
from .settings import CodecSettings


class DenseCodec:
    """safetensors bytes of the tensors as they are, tagged ``titanic_codec = "dense"``.

    The tensor bytes are those of a plain ``safetensors.torch.save``; the tag only adds a
    metadata entry to the header, which any safetensors reader ignores, and bytes without
    it (written before codecs tagged them) still decode as dense.
    """

    name = "dense"
    sends_changes = False

    def __init__(self, settings: CodecSettings | None = None) -> None:
        # Dense sends everything in its own dtype: the settings are the top-k codec's.
        self.settings = settings or CodecSettings()

    def encode(self, tensors: Mapping[str, Tensor]) -> bytes:
        """A safetensors file of ``tensors`` (contiguous, on the CPU)."""
        return pack({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, self.name)

    def decode(self, data: bytes) -> dict[str, Tensor]:
        """The tensors of any codec's bytes (see :func:`decode_update`)."""
        return decode_update(data)
