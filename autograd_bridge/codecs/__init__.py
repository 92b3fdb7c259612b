"""How partition tensors and updates travel between the server and the clients: the UpdateCodec seam.

Both directions of a run use the codec its run file names (``[communication] codec``): a
holder encodes what it uploads, the server decodes it, and the server encodes what a pipeline
loads. What is counted as a transfer's size is the length of the encoded bytes, which is
what crosses the network. Nothing is pickled: encoded data is safetensors or plain arrays.

Members: ``dense`` (every tensor whole). A new member (top-k sparse, quantized) is a module
here with a class that satisfies :class:`UpdateCodec`, plus one line in :data:`CODECS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from torch import Tensor

from .dense import DenseCodec


class UpdateCodec(Protocol):
    """Turns named tensors into bytes and back."""

    name: str

    def encode(self, tensors: Mapping[str, Tensor]) -> bytes:
        """The bytes that travel for ``tensors`` (whole-model names)."""

    def decode(self, data: bytes) -> dict[str, Tensor]:
        """The tensors ``data`` carries (ValueError when it is not this codec's encoding)."""


#: name -> the codec's class
CODECS: dict[str, type[UpdateCodec]] = {
    "dense": DenseCodec,
}


def get_codec(name: str) -> UpdateCodec:
    """The codec called ``name`` (ValueError naming the known ones)."""
    if name not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(sorted(CODECS))}, not {name!r}")
    return CODECS[name]()


__all__ = ["CODECS", "UpdateCodec", "get_codec"]
