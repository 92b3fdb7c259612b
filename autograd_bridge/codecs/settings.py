"""What a codec is told: :class:`CodecSettings` (the top-k codec reads them; dense ignores them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: the sparsest density accepted. Decoding refuses bytes that declare more than
#: MAX_ELEMENTS_PER_BYTE elements per byte received, and an encoding at this density never
#: does (see sparse.py), so this floor is what makes that refusal safe for honest senders.
MIN_DENSITY = 1e-4

#: the dtypes values may travel in, by their settings name
VALUE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: what the top-k is taken over: each tensor alone, or every tensor of one encode() call together
SCOPES = ("tensor", "partition")


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecSettings:
    """How a codec encodes one direction of one client's transfers."""

    # Share of the entries of each ranked set that is kept, in [MIN_DENSITY, 1]; top-k only.
    density: float = 1.0
    # The dtype kept values travel in: "fp32" (exact), "fp16" or "bf16" (rounded).
    values: str = "fp32"
    # What the top-k ranks together: "partition" (every weight tensor of one encode() call,
    # as FLASC ranks the whole adapter vector) or "tensor" (each tensor keeps its own share).
    scope: str = "partition"

    def __post_init__(self) -> None:
        density = self.density
        if isinstance(density, bool) or not isinstance(density, int | float) or not math.isfinite(density):
            raise ValueError(f"density must be a number in [{MIN_DENSITY}, 1] (e.g. 0.1), got {density!r}")
        if not MIN_DENSITY <= density <= 1.0:
            raise ValueError(
                f"density must be in [{MIN_DENSITY}, 1], the share of entries kept (1 keeps all), got {density!r}"
            )
        if self.values not in VALUE_DTYPES:
            raise ValueError(
                f"values must be one of {', '.join(VALUE_DTYPES)}, the dtype values travel in, got {self.values!r}"
            )
        if self.scope not in SCOPES:
            raise ValueError(
                f"scope must be one of {', '.join(SCOPES)}: rank each tensor alone, or all tensors of a "
                f"partition together; got {self.scope!r}"
            )
