"""How partition tensors and updates travel between the server and the clients: the UpdateCodec seam.

Both directions of a run use the codec its run file names (``[communication] codec``), each
with its own :class:`CodecSettings` (a download and an upload density, say): a holder
encodes what it uploads, the server decodes it, and the server encodes what a pipeline
loads. What is counted as a transfer's size is ``len(codec.encode(tensors))``, the bytes
that cross the network. Nothing is pickled: every encoding is a safetensors file whose
metadata names the codec that wrote it, so :func:`decode_update` (and every member's
``decode``) reads any member's bytes, and untagged safetensors bytes read as dense.

Members: ``dense`` (every tensor whole) and ``topk`` (the largest-magnitude entries of each
weight, their positions as a bitmask or indices, whichever is smaller; see
:mod:`autograd_bridge.codecs.sparse`) and ``seeds`` (a forward-gradient holder's (seed,
coefficient) pairs, rebuilt by the receiver; see :mod:`autograd_bridge.codecs.seeds`). A new
member is a module here with a class that
satisfies :class:`UpdateCodec`, plus one line in :data:`CODECS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from torch import Tensor

from .container import decode_update
from .dense import DenseCodec
from .seeds import SeedsCodec
from .settings import MIN_DENSITY, CodecSettings
from .topk import TopKCodec


class UpdateCodec(Protocol):
    """Turns named tensors into bytes and back."""

    name: str
    # Whether holders upload their change since they last loaded rather than their values:
    # a sparse codec keeps the largest changes, and zeros elsewhere must mean "unchanged".
    sends_changes: bool

    def encode(self, tensors: Mapping[str, Tensor]) -> bytes:
        """The bytes that travel for ``tensors`` (whole-model names)."""

    def decode(self, data: bytes) -> dict[str, Tensor]:
        """The dense tensors any member's ``data`` carries (ValueError when it is no valid encoding)."""


#: name -> the codec's class, built with the direction's settings
CODECS: dict[str, Callable[[CodecSettings], UpdateCodec]] = {
    "dense": DenseCodec,
    "topk": TopKCodec,
    "seeds": SeedsCodec,
}


def get_codec(name: str, settings: CodecSettings | None = None) -> UpdateCodec:
    """The codec called ``name`` with ``settings`` (default: density 1, fp32; ValueError naming the known ones)."""
    if name not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(sorted(CODECS))}, not {name!r}")
    return CODECS[name](settings or CodecSettings())


__all__ = ["CODECS", "MIN_DENSITY", "CodecSettings", "UpdateCodec", "decode_update", "get_codec"]
