"""The dense codec: every tensor whole, as a safetensors file (no pickle)."""

from __future__ import annotations

from collections.abc import Mapping

from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor


class DenseCodec:
    """safetensors bytes of the tensors as they are."""

    name = "dense"

    def encode(self, tensors: Mapping[str, Tensor]) -> bytes:
        """A safetensors file of ``tensors`` (contiguous, on the CPU)."""
        return save({name: t.detach().cpu().contiguous() for name, t in tensors.items()})

    def decode(self, data: bytes) -> dict[str, Tensor]:
        """The tensors of a safetensors file."""
        try:
            return load(data)
        except (SafetensorError, ValueError) as exc:
            raise ValueError(f"not a dense (safetensors) update: {exc}") from exc
