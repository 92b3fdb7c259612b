"""The seeds codec: a forward-gradient holder uploads its (seed, coefficient) pairs, not its tensors.

A holder that trained with forward gradients (:mod:`autograd_bridge.methods.forward_gradient`)
changed each tensor by ``sum_steps sum_k alpha_k v(seed_k)``, every ``v`` drawn from its seed
and the tensor's whole-model name. So its upload for a round is the pairs it applied, plus the
names and shapes they apply to; the server rebuilds the change (:func:`rebuild`). A round of
S steps with K directions costs 16 S K bytes (an int64 seed and a float64 coefficient each:
float64 keeps exactly the coefficient the holder applied) plus a header naming the tensors,
whatever the size of the adapters.

A holder with nothing seeded to send (a backprop owner in a mixed run) uploads its change
dense, tagged ``dense``: this codec sends changes, and dense bytes of a change decode as that
change. Downloads (what the server sends a pipeline) are dense values too.

The layout (safetensors, metadata ``titanic_codec = "seeds"``)
    ``layout``   uint8: zlib-compressed UTF-8 JSON ``{"version": 1, "tensors": [[NAME, DTYPE, SHAPE], ...]}``
                 (the names repeat ``model.layers.N.self_attn.q_proj.lora_A.weight`` patterns: zlib
                 makes the header a few times smaller, which matters when the pairs are few)
    ``seeds``    int64 (N,): every direction's seed, step after step
    ``alphas``   float64 (N,): its coefficient
    ``steps``    int64 (S,): how many directions each step used (summing to N)
    ``raw/NAME`` a tensor that travels whole (optimizer state)

Decoding is of network input: every field is checked, and since a few bytes here stand for
a large tensor and its rebuild costs N draws of every tensor, both the elements declared and
that work are capped (:data:`MAX_ELEMENTS`, :data:`MAX_WORK`) before anything is allocated.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .container import pack
from .settings import CodecSettings

LAYOUT_VERSION = 1
#: the most bytes the layout may inflate to (a zip bomb stops here)
MAX_LAYOUT_BYTES = 16 * 2**20
#: the most elements one seeds upload may declare (4 GiB of float32)
MAX_ELEMENTS = 2**30
#: the most (direction x element) draws one rebuild may cost (about a minute of CPU)
MAX_WORK = 2**36
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

Steps = Sequence[Sequence[tuple[int, float]]]


class SeedsCodec:
    """Uploads of forward-gradient holders as seeds and coefficients; anything else dense."""

    name = "seeds"
    sends_changes = True

    def __init__(self, settings: CodecSettings | None = None) -> None:
        self.settings = settings or CodecSettings()  # nothing here reads them: seeds are exact

    def encode(self, tensors: Mapping[str, Tensor]) -> bytes:
        """Tensors with no seeded steps behind them (a backprop holder's change, a download): dense."""
        return pack({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, "dense")

    def encode_steps(
        self, steps: Steps, shapes: Mapping[str, Tensor], extra: Mapping[str, Tensor] | None = None
    ) -> bytes:
        """The bytes of ``steps`` of (seed, alpha) pairs applied to tensors like ``shapes`` (by name), plus ``extra`` whole."""
        rows = [
            [name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in sorted(shapes.items())
        ]
        layout = zlib.compress(json.dumps({"version": LAYOUT_VERSION, "tensors": rows}, separators=(",", ":")).encode(), 9)
        pairs = [pair for step in steps for pair in step]
        stored = {
            "layout": torch.frombuffer(bytearray(layout), dtype=torch.uint8),
            "seeds": torch.tensor([s for s, _ in pairs], dtype=torch.int64),
            "alphas": torch.tensor([a for _, a in pairs], dtype=torch.float64),
            "steps": torch.tensor([len(step) for step in steps], dtype=torch.int64),
        }
        stored.update({f"raw/{name}": t.detach().cpu().contiguous() for name, t in (extra or {}).items()})
        return pack(stored, self.name)

    def decode(self, data: bytes) -> dict[str, Tensor]:
        """The dense tensors of any codec's bytes (see :func:`~autograd_bridge.codecs.decode_update`)."""
        from .container import decode_update

        return decode_update(data)


def rebuild(stored: Mapping[str, Tensor], encoded_size: int) -> dict[str, Tensor]:
    """The change a seeds upload stands for, per tensor in its own dtype, plus its raw tensors (ValueError if malformed)."""
    from autograd_bridge.methods.perturbation import SEED_BOUND, rebuild_change

    shapes, dtypes = _read_layout(stored)
    seeds, alphas, counts = (stored.get(key) for key in ("seeds", "alphas", "steps"))
    if seeds is None or seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise ValueError("a seeds update needs 'seeds', a 1-D int64 tensor")
    if alphas is None or alphas.dtype != torch.float64 or tuple(alphas.shape) != tuple(seeds.shape):
        raise ValueError("a seeds update needs 'alphas', float64, one per seed")
    if counts is None or counts.dtype != torch.int64 or counts.dim() != 1 or bool((counts < 0).any()):
        raise ValueError("a seeds update needs 'steps', a 1-D int64 tensor of counts >= 0")
    if int(counts.sum()) != seeds.numel():
        raise ValueError(
            f"a seeds update's steps add up to {int(counts.sum())} directions, but it carries {seeds.numel()}"
        )
    if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= SEED_BOUND):
        raise ValueError("a seeds update's seeds must be in [0, 2**63)")
    if not bool(torch.isfinite(alphas).all()):
        raise ValueError("a seeds update's coefficients must be finite")
    elements = sum(math.prod(shape) for shape in shapes.values())
    if elements > MAX_ELEMENTS or elements * seeds.numel() > MAX_WORK:
        raise ValueError(
            f"a seeds update of {seeds.numel()} directions over {elements} elements is more than this "
            f"server rebuilds (at most {MAX_ELEMENTS} elements and {MAX_WORK} draws); send it dense"
        )
    pairs = list(zip(seeds.tolist(), alphas.tolist(), strict=True))
    steps, at = [], 0
    for count in counts.tolist():
        steps.append(pairs[at : at + count])
        at += count
    out = {key[4:]: t for key, t in stored.items() if key.startswith("raw/")}
    for name, change in rebuild_change(steps, shapes).items():
        if name in out:
            raise ValueError(f"a seeds update carries {name!r} both whole and seeded")
        out[name] = change.to(dtypes[name])
    return out


def _read_layout(stored: Mapping[str, Tensor]) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    text = stored.get("layout")
    if text is None or text.dtype != torch.uint8 or text.dim() != 1:
        raise ValueError("a seeds update lacks its layout (a 1-D uint8 tensor 'layout')")
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(text.numpy().tobytes(), MAX_LAYOUT_BYTES)
        if inflate.unconsumed_tail or not inflate.eof:
            raise ValueError(f"it inflates past {MAX_LAYOUT_BYTES} bytes or is cut short")
        document = json.loads(raw)
    except (ValueError, RecursionError, zlib.error) as exc:
        raise ValueError(f"a seeds update's layout is not JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("version") != LAYOUT_VERSION:
        raise ValueError(f"a seeds update's layout must be version {LAYOUT_VERSION}")
    rows = document.get("tensors")
    if not isinstance(rows, list):
        raise ValueError("a seeds update's layout needs a list 'tensors'")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for row in rows:
        ok = isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and row[1] in _DTYPES
        ok = ok and isinstance(row[2], list) and len(row[2]) <= 32
        ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in row[2])
        if not ok or row[0] in shapes:
            raise ValueError(
                f"a seeds update's layout row {str(row)[:200]} is not [unique NAME, float DTYPE, SHAPE]"
            )
        shapes[row[0]] = tuple(row[2])
        dtypes[row[0]] = _DTYPES[row[1]]
    return shapes, dtypes
