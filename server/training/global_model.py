"""The global model by whole-model tensor name, and which of its tensors each partition holds.

The server keeps a run's merged model (every weight, or only the adapters) and each owner's
optimizer state as flat dicts keyed by the names the whole model uses
(``model.layers.3.mlp.up_proj.weight``, ``optimizer/exp_avg/model.layers.3...``), never by
partition number. Each pipeline of a plan may cut the model differently (another number of
stages, other cut points, one stage holding the whole model), so what a partition loads is
worked out per pipeline from what the server knows of that partition: its decoder blocks and
the names in the weight file it was planned with (:class:`PartitionTensors`).

A tensor belongs to a partition when the partition's weight file holds that name, or, for
a tensor no weight file holds (a LoRA adapter), when its first number is a decoder block in
the partition's range. A tied weight is held by two partitions (a last stage stores the head
under the embedding's name), so both load it; its optimizer state goes to the first of them
only, the stage that trains it (:meth:`autograd_bridge.partition.StageModule.named_model_parameters`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autograd_bridge.optim_state import optimizer_parameter_name

__all__ = ["PartitionTensors", "optimizer_state_for", "partition_names"]

_BLOCK = re.compile(r"\.(\d+)\.")  # the first number in a parameter name is its decoder block


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionTensors:
    """What the server knows of one partition of one pipeline."""

    index: int  # its stage number in its pipeline
    layer_start: int  # first decoder block, inclusive
    layer_end: int  # last decoder block, exclusive
    stored: frozenset[str]  # whole-model names in the weight file it was planned with
    stored_bytes: int = 0  # the size of that file

    def holds(self, name: str) -> bool:
        """Whether tensor ``name`` of the whole model (a weight or an adapter) lives in this partition."""
        if name in self.stored:
            return True
        block = _BLOCK.search(name)
        return block is not None and self.layer_start <= int(block.group(1)) < self.layer_end


def partition_names(names: Iterable[str], partition: PartitionTensors) -> list[str]:
    """Those of ``names`` (global tensors) that ``partition`` holds, in their order."""
    return [name for name in names if partition.holds(name)]


def optimizer_state_for(
    state: Mapping[str, Any], pipeline: Sequence[PartitionTensors], index: int
) -> dict[str, Any]:
    """The entries of ``state`` (optimizer tensors by name) that partition ``index`` of ``pipeline`` trains.

    Each parameter's state goes to the first partition of the pipeline that holds the
    parameter, so a tied weight's state is loaded once.
    """
    by_index = sorted(pipeline, key=lambda p: p.index)
    out: dict[str, Any] = {}
    for name, tensor in state.items():
        parameter = optimizer_parameter_name(name)
        first = next((p.index for p in by_index if p.holds(parameter)), None)
        if first == index:
            out[name] = tensor
    return out
