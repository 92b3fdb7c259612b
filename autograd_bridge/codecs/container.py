"""The bytes every codec writes: a safetensors file whose metadata names the codec.

An encoding is self-describing: its safetensors metadata holds ``{"titanic_codec": NAME}``,
so :func:`decode_update` reads any member's bytes without being told which member wrote
them. A safetensors file without that key (one written before codecs tagged their bytes, or
by any other safetensors writer) is read as ``dense``. Nothing is pickled either way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from .sparse import densify

#: the metadata key that names the codec of an encoding
CODEC_KEY = "titanic_codec"


def pack(stored: Mapping[str, Tensor], codec: str) -> bytes:
    """A safetensors file of ``stored`` (CPU, contiguous) tagged as ``codec``'s.

    The tag is the only metadata entry: safetensors writes metadata in hash order, which
    would make equal tensors give different bytes in different processes.
    """
    return save(dict(stored), metadata={CODEC_KEY: codec})


def unpack(data: bytes) -> tuple[dict[str, str], dict[str, Tensor]]:
    """``(metadata, tensors)`` of a safetensors file (ValueError for anything else)."""
    if not isinstance(data, bytes | bytearray):
        raise ValueError(f"an update is bytes, got {type(data).__name__}")
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, KeyError) as exc:  # KeyError: a dtype torch has no name for
        raise ValueError(f"not a dense or topk update (no valid safetensors file): {exc!r}") from exc
    # safetensors checked the header; it gives no way to read its metadata from bytes, so
    # read it here: u64 little-endian header length, then that many bytes of JSON.
    size = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + size]))
    metadata = header.get("__metadata__") or {}
    return dict(metadata), tensors


def decode_update(data: bytes) -> dict[str, Tensor]:
    """The tensors any codec's ``data`` carries, as dense tensors of their original shapes and dtypes.

    ``data`` is network input: anything malformed, truncated, inconsistent or of an unknown
    encoding is a ValueError that says what is wrong, before any large allocation.
    """
    metadata, stored = unpack(data)
    codec = metadata.get(CODEC_KEY, "dense")
    read = _READERS.get(codec)
    if read is None:
        raise ValueError(
            f"unknown update encoding {codec!r} (metadata {CODEC_KEY}); this version reads "
            f"{' and '.join(_READERS)}: update the receiving side"
        )
    return read(stored, len(data))


#: the tag an encoding carries -> how its stored tensors become dense ones (with the encoded size, for caps)
_READERS: dict[str, Callable[[dict[str, Tensor], int], dict[str, Tensor]]] = {
    "dense": lambda stored, size: stored,
    "topk": lambda stored, size: densify(stored, encoded_size=size),
    "seeds": lambda stored, size: _rebuild_seeds(stored, size),
}


def _rebuild_seeds(stored: dict[str, Tensor], size: int) -> dict[str, Tensor]:
    from .seeds import rebuild  # seeds.py imports this module

    return rebuild(stored, size)
