"""Magnitude top-k of named tensors and the layout that carries it: the numerics of the topk codec.

Which entries are kept
    Every float32, float16, bfloat16 or float64 tensor whose name does not start with
    ``optimizer/`` is *ranked*; optimizer state (and any other dtype) travels whole, as it is.
    Of the ranked entries, the ``ceil(density * N)`` largest by magnitude are kept (negative
    values count by their size; NaN ranks with infinity, above every finite value, so a
    diverged update is seen as dense would show it). Ties are broken by position: the lower flat index wins, and across tensors the name
    that sorts first, so the same tensors always give the same bytes.

    ``scope = "partition"`` (the default) ranks all tensors of one ``encode()`` call together,
    ``N`` being their total size; ``"tensor"`` keeps ``ceil(density * n)`` of each tensor.
    The default follows FLoSS/FLASC: their code (``train_sparse_lora_dp.py``, both the
    download and the upload mask) flattens every trainable adapter tensor into one vector and
    takes one top-k of it, so a layer whose update is large gets more of the budget than one
    whose update is small. One ``encode()`` call carries one partition (or the whole model for
    an owner that holds it all), so "partition" is that ranking wherever the holder can
    compute it. "tensor" is there for runs that want every tensor to move each round.

The layout (safetensors, metadata ``titanic_codec = "topk"``)
    ``layout``      uint8: UTF-8 JSON ``{"version": 1, "tensors": [[NAME, DTYPE, SHAPE, INDEX, KEPT], ...]}``,
                    one row per ranked tensor in name order (DTYPE its own, e.g. "bfloat16";
                    INDEX "all", "bitmask" or "indices"; KEPT how many entries it keeps)
    ``values``      (sum KEPT,) in the ``values`` dtype: each row's kept values in flat-index order
    ``mask``        uint8: the "bitmask" rows' masks, ceil(n / 8) bytes each, entry ``j`` in bit
                    ``j % 8`` of byte ``j // 8``
    ``indices``     int32: the "indices" rows' kept flat indices, each row's strictly increasing
    ``indices64``   int64: the same for rows of more than 2**31 entries
    ``raw/NAME``    a tensor that travels whole (optimizer state, non-float tensors)

    Each name appears once (in the layout), so a LoRA partition of a hundred small tensors
    pays about a hundred bytes of header per tensor, not three entries each. The layout is a
    tensor rather than metadata because safetensors writes metadata in hash order, and the
    same tensors should give the same bytes. A stream no row uses is left out.

    Each tensor's kept set goes as whichever index is smaller for its kept count ``k`` of
    ``n``: a bitmask costs ceil(n / 8) bytes, indices 4k (8k past 2**31); with int32 indices
    the bitmask wins above a density of 1/32. When every entry is kept (``k == n``, e.g.
    density 1) no index travels at all ("all").

Decoding is of network input: every shape, dtype, count, index range and bit is checked
against the others (ValueError naming the tensor), and the elements a file declares are
capped relative to its size before anything is allocated (:data:`MAX_ELEMENTS_PER_BYTE`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from autograd_bridge.optim_state import is_optimizer_name

from .settings import MIN_DENSITY, VALUE_DTYPES, CodecSettings

#: the stored tensor that holds the layout, and the layout version this module writes and reads
LAYOUT_KEY = "layout"
LAYOUT_VERSION = 1

#: dtypes of the tensors that are ranked (others travel whole), by the name the layout uses
RANKED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

#: An honest encoding keeps at least density * N of the N entries it ranks, and each kept
#: value costs at least 2 bytes, so it declares at most N <= bytes / (2 * density) elements.
#: Decoding refuses more: a few bytes may not make the receiver allocate gigabytes.
MAX_ELEMENTS_PER_BYTE = math.ceil(1 / (2 * MIN_DENSITY))
#: and at most this many in any one file (16 GiB of float32)
MAX_DECODED_ELEMENTS = 2**32

_INT32_LIMIT = 2**31  # int32 holds every index of a tensor of up to this many entries
_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_SHIFTS = torch.arange(8, dtype=torch.uint8)
_MAX_DIMS = 32
#: the stored tensors that hold indices, and their dtypes
_INDEX_STREAMS = {"indices": torch.int32, "indices64": torch.int64}


def is_ranked(name: str, tensor: Tensor) -> bool:
    """Whether top-k applies to ``tensor`` (a weight or update), rather than it travelling whole."""
    return not is_optimizer_name(name) and tensor.dtype in RANKED_DTYPES.values()


def kept_count(n: int, density: float) -> int:
    """How many of ``n`` entries ``density`` keeps: ceil(density * n).

    The product is shrunk by one part in 10**12 first, so that float error (0.07 * 100 is
    7.000000000000001) does not keep one entry more than asked.
    """
    return min(n, math.ceil(density * n * (1 - 1e-12)))


def index_dtype(n: int) -> torch.dtype:
    """The dtype of the indices of a tensor of ``n`` entries."""
    return torch.int32 if n <= _INT32_LIMIT else torch.int64


def index_bytes(n: int, k: int, index: str) -> int:
    """Bytes the kept set of ``k`` of ``n`` entries takes as ``index`` ("all", "bitmask", "indices")."""
    if index == "all":
        return 0
    if index == "bitmask":
        return (n + 7) // 8
    return k * index_dtype(n).itemsize


def _index_stream(n: int) -> str:
    """The stored tensor the indices of a tensor of ``n`` entries go in."""
    return "indices" if index_dtype(n) == torch.int32 else "indices64"


def choose_index(n: int, k: int) -> str:
    """The smaller way to send which ``k`` of ``n`` entries are kept (indices on a tie)."""
    if k == n:
        return "all"
    return "bitmask" if index_bytes(n, k, "bitmask") < index_bytes(n, k, "indices") else "indices"


def top_k(magnitudes: Tensor, k: int) -> Tensor:
    """Which entries of ``magnitudes`` (N,) are the ``k`` largest: bool (N,), ties to lower indices.

    Linear time (a selection, not a sort): the k-th largest value is the threshold, all
    entries above it are kept, and the first of those equal to it fill the rest.
    """
    n = magnitudes.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    threshold = magnitudes.kthvalue(n - k + 1).values
    keep = magnitudes > threshold
    ties = (magnitudes == threshold).nonzero().flatten()[: k - int(keep.sum())]
    keep[ties] = True
    return keep


def _magnitudes(t: Tensor) -> Tensor:
    """|t| flattened to float32 (N,), NaN counted as infinity."""
    m = t.reshape(-1).abs().float()
    return m.masked_fill_(m.isnan(), math.inf)


def _keep_masks(ranked: Mapping[str, Tensor], settings: CodecSettings) -> dict[str, Tensor]:
    """Per ranked tensor, bool (n,) of the entries it keeps."""
    if settings.scope == "tensor":
        return {n: top_k(_magnitudes(t), kept_count(t.numel(), settings.density)) for n, t in ranked.items()}
    names = sorted(ranked)  # the tie-break order across tensors
    if not names:
        return {}
    joint = torch.cat([_magnitudes(ranked[n]) for n in names])  # (N,) over the whole call
    keep = top_k(joint, kept_count(joint.numel(), settings.density))
    return dict(zip(names, keep.split([ranked[n].numel() for n in names]), strict=True))


def pack_bits(keep: Tensor) -> Tensor:
    """bool (n,) -> uint8 (ceil(n / 8),), entry j in bit j % 8 of byte j // 8."""
    pad = (-keep.numel()) % 8
    bits = torch.cat([keep, keep.new_zeros(pad)]).view(-1, 8).to(torch.uint8)  # (ceil(n / 8), 8)
    return (bits * _BIT_VALUES).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """uint8 (ceil(n / 8),) -> bool (n,); ValueError when a padding bit past n is set."""
    bits = ((packed.unsqueeze(1) >> _SHIFTS) & 1).reshape(-1).bool()  # (8 * ceil(n / 8),)
    if bits[n:].any():
        raise ValueError("has bits set past the tensor's end")
    return bits[:n]


def sparsify(tensors: Mapping[str, Tensor], settings: CodecSettings) -> dict[str, Tensor]:
    """The tensors stored for ``tensors`` in the top-k layout."""
    stored: dict[str, Tensor] = {}
    ranked: dict[str, Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if is_ranked(name, t):
            ranked[name] = t
        else:
            stored[f"raw/{name}"] = t
    entries: list[list[Any]] = []
    streams: dict[str, list[Tensor]] = {"values": [], "mask": [], **{key: [] for key in _INDEX_STREAMS}}
    keeps = _keep_masks(ranked, settings)
    for name in sorted(ranked):  # the layout's order
        flat, keep = ranked[name].reshape(-1), keeps[name]
        n, k = flat.numel(), int(keep.sum())
        index = choose_index(n, k)
        streams["values"].append((flat if index == "all" else flat[keep]).to(VALUE_DTYPES[settings.values]))
        if index == "bitmask":
            streams["mask"].append(pack_bits(keep))
        elif index == "indices":
            streams[_index_stream(n)].append(keep.nonzero().flatten().to(index_dtype(n)))
        dtype = next(key for key, value in RANKED_DTYPES.items() if value == flat.dtype)
        entries.append([name, dtype, list(ranked[name].shape), index, k])
    # torch.cat copies, so nothing stored shares memory with the caller's tensors (safetensors
    # refuses shared memory, and tied weights would share it).
    for key, parts in streams.items():
        if parts:
            stored[key] = torch.cat(parts)
    document = json.dumps({"version": LAYOUT_VERSION, "tensors": entries}, separators=(",", ":")).encode()
    stored[LAYOUT_KEY] = torch.frombuffer(bytearray(document), dtype=torch.uint8)
    return stored


# -- decoding: every check a malformed file could fail ------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    """One ranked tensor of a layout, checked."""

    name: str
    dtype: torch.dtype
    shape: list[int]
    index: str  # "all" | "bitmask" | "indices"
    kept: int
    numel: int

    @property
    def stream(self) -> str | None:
        """The stored tensor its index set is in."""
        if self.index == "bitmask":
            return "mask"
        if self.index == "indices":
            return _index_stream(self.numel)
        return None

    @property
    def stream_length(self) -> int:
        """Its entries' share of that tensor."""
        return (self.numel + 7) // 8 if self.index == "bitmask" else self.kept


def densify(stored: Mapping[str, Tensor], *, encoded_size: int) -> dict[str, Tensor]:
    """The dense tensors of a top-k layout (``encoded_size``: the bytes it came in)."""
    entries = _read_layout(stored)
    declared = sum(e.numel for e in entries)
    limit = min(MAX_DECODED_ELEMENTS, MAX_ELEMENTS_PER_BYTE * encoded_size)
    if declared > limit:
        raise ValueError(
            f"a topk update of {encoded_size} bytes declares {declared} elements, more than the {limit} "
            f"such a file can honestly hold (density >= {MIN_DENSITY}); refusing to allocate them"
        )
    lengths = {"values": sum(e.kept for e in entries)} if entries else {}
    for e in entries:
        if e.stream is not None:
            lengths[e.stream] = lengths.get(e.stream, 0) + e.stream_length
    _check_streams(stored, lengths)
    out = {key[4:]: t for key, t in stored.items() if key.startswith("raw/")}
    offsets = dict.fromkeys(lengths, 0)
    for e in entries:
        if e.name in out:
            raise ValueError(f"a topk update carries {e.name!r} both whole and sparse")
        values = stored["values"][offsets["values"] : offsets["values"] + e.kept]
        offsets["values"] += e.kept
        index_set = None
        if e.stream is not None:
            index_set = stored[e.stream][offsets[e.stream] : offsets[e.stream] + e.stream_length]
            offsets[e.stream] += e.stream_length
        try:
            out[e.name] = _densify_one(e, values, index_set)
        except ValueError as exc:
            raise ValueError(f"a topk update's tensor {e.name!r} {exc}") from exc
    return out


def _read_layout(stored: Mapping[str, Tensor]) -> list[_Entry]:
    """The checked entries of the stored layout (ValueError for any malformed part)."""
    text = stored.get(LAYOUT_KEY)
    if text is None or text.dtype != torch.uint8 or text.dim() != 1:
        raise ValueError(f"a topk update lacks its layout (a 1-D uint8 tensor {LAYOUT_KEY!r})")
    try:
        document = json.loads(text.numpy().tobytes())  # UTF-8 or a ValueError
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise ValueError(f"a topk update's layout is not JSON: {exc!r}") from exc
    if not isinstance(document, dict) or document.get("version") != LAYOUT_VERSION:
        version = document.get("version") if isinstance(document, dict) else None
        raise ValueError(
            f"a topk update's layout has version {version!r}; this version reads {LAYOUT_VERSION}"
        )
    rows = document.get("tensors")
    if not isinstance(rows, list):
        raise ValueError("a topk update's layout has no tensors list")
    entries = [_read_entry(row) for row in rows]
    if len({e.name for e in entries}) != len(entries):
        raise ValueError("a topk update's layout names a tensor twice")
    return entries


def _read_entry(row: object) -> _Entry:
    """One layout row ``[name, dtype, shape, index, kept]``, checked."""
    if not (isinstance(row, list) and len(row) == 5 and isinstance(row[0], str)):
        raise ValueError(
            f"a topk update's layout row {str(row)[:80]} is not [name, dtype, shape, index, kept]"
        )
    name, dtype, shape, index, kept = row
    if not isinstance(dtype, str) or dtype not in RANKED_DTYPES:
        raise ValueError(
            f"a topk update's layout gives {name!r} the dtype {dtype!r}, not one of {', '.join(RANKED_DTYPES)}"
        )
    if not (
        isinstance(shape, list)
        and len(shape) <= _MAX_DIMS
        and all(type(d) is int and 0 <= d <= MAX_DECODED_ELEMENTS for d in shape)
    ):
        raise ValueError(
            f"a topk update's layout gives {name!r} the shape {str(shape)[:80]}, not a list of sizes"
        )
    if index not in ("all", "bitmask", "indices"):
        raise ValueError(
            f"a topk update's layout gives {name!r} the index {index!r}, not all, bitmask or indices"
        )
    numel = math.prod(shape)
    if type(kept) is not int or not 0 <= kept <= numel or (index == "all" and kept != numel):
        raise ValueError(
            f"a topk update's layout keeps {kept!r} of the {numel} entries of {name!r} ({index})"
        )
    return _Entry(name=name, dtype=RANKED_DTYPES[dtype], shape=shape, index=index, kept=kept, numel=numel)


def _check_streams(stored: Mapping[str, Tensor], lengths: Mapping[str, int]) -> None:
    """The stored tensors are the layout, raw ones, and each stream the layout uses at the length it adds up to."""
    expected = {LAYOUT_KEY, *lengths}
    if missing := sorted(expected - set(stored)):
        raise ValueError(f"a topk update lacks tensors its layout needs: {', '.join(missing)}")
    if unexpected := sorted(k for k in set(stored) - expected if not k.startswith("raw/")):
        raise ValueError(f"a topk update holds tensors its layout does not use: {', '.join(unexpected[:5])}")
    for key, length in lengths.items():
        t = stored[key]
        dtypes = (
            VALUE_DTYPES.values()
            if key == "values"
            else [torch.uint8]
            if key == "mask"
            else [_INDEX_STREAMS[key]]
        )
        if t.dim() != 1 or t.dtype not in dtypes or t.numel() != length:
            raise ValueError(
                f"a topk update's {key} is {t.dtype} {list(t.shape)}; its layout needs [{length}] of {', '.join(map(str, dtypes))}"
            )


def _densify_one(e: _Entry, values: Tensor, index_set: Tensor | None) -> Tensor:
    """The dense tensor of one entry from its values (kept,) and its mask or indices."""
    if index_set is None:  # every entry kept; a copy, so no two results share memory
        return values.to(e.dtype, copy=True).reshape(e.shape)
    out = torch.zeros(e.numel, dtype=e.dtype)
    if e.index == "bitmask":
        keep = unpack_bits(index_set, e.numel)
        if int(keep.sum()) != e.kept:
            raise ValueError(f"has a mask keeping {int(keep.sum())} entries, not {e.kept}")
        out[keep] = values.to(e.dtype)
    else:
        if e.kept and not (
            int(index_set[0]) >= 0
            and int(index_set[-1]) < e.numel
            and bool((index_set[1:] > index_set[:-1]).all())
        ):
            raise ValueError(f"has indices that are not strictly increasing within [0, {e.numel})")
        out[index_set.long()] = values.to(e.dtype)
    return out.reshape(e.shape)
