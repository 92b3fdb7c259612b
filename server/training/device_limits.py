"""What each data owner's device can train at once, and how fast: the inputs of local work.

An owner trains its pipeline's first and last stage itself (more when the plan keeps more
on it), so its memory bounds the micro-batch its pipeline can take: weights, gradients and
two Adam moments of its partitions, plus the activations autograd keeps for each sequence
of a micro-batch (:meth:`autograd_bridge.profile.PartitionProfile.train_memory_bytes`)::

    max_micro_batch = floor((memory - 4 * weight_bytes) / (saved_bytes_per_token * seq_len))

over the partitions it holds, at least 1 (the planner already refused a plan whose stages do
not fit one micro-batch). A device that declares ``max_micro_batch`` in its profile
(``titanic-client run --declare-max-micro-batch N``) has that value instead.

The same profiles give a first guess of each pipeline's seconds per sequence (every stage's
training FLOPs over its holder's FLOP/s, added up: the stages of one micro-batch run one
after another), which a time-budget member uses before any step was measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proto.messages import DeviceProfile

if TYPE_CHECKING:
    from autograd_bridge.profile import PartitionProfile
    from server.control.state import PlanRow

__all__ = ["MAX_MICRO_BATCH", "OwnerDevice", "owner_devices"]

#: The largest micro-batch derived from memory (a device with plenty of memory is not asked for more).
MAX_MICRO_BATCH = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnerDevice:
    """What one data owner's pipeline can do, as the server sizes its work."""

    max_micro_batch: int  # sequences its own stages train at once (declared, or from its memory)
    declared: bool  # max_micro_batch was declared by the device, not derived from memory
    seconds_per_sequence: float  # the profiles' guess of its pipeline's seconds per sequence; 0: unknown


def owner_devices(
    rows: Sequence[PlanRow],
    partitions: Mapping[tuple[str, int], PartitionProfile],
    profiles: Mapping[str, DeviceProfile | None],
    *,
    seq_len: int,
) -> dict[str, OwnerDevice]:
    """Per owner in ``rows``: its micro-batch limit and its pipeline's guessed speed.

    ``partitions`` holds the profile of each row's partition by (bridge run, partition
    index), measured at ``seq_len``; ``profiles`` each client's reported device profile.
    """
    out: dict[str, OwnerDevice] = {}
    for owner in sorted({r.owner_id for r in rows}):
        pipeline = [r for r in rows if r.owner_id == owner]
        own = [partitions[(r.run_id, r.partition)] for r in pipeline if r.client_id == owner]
        profile = profiles.get(owner)
        declared = profile is not None and profile.max_micro_batch > 0
        if profile is not None and declared:
            limit = profile.max_micro_batch
        else:
            limit = _from_memory(own, profile.training_memory_bytes if profile is not None else 0, seq_len)
        seconds = 0.0
        for row in pipeline:
            holder = profiles.get(row.client_id)
            flops = holder.flops_per_s if holder is not None else 0.0
            if flops <= 0:
                seconds = 0.0  # one stage of unknown speed: no guess for the pipeline
                break
            seconds += partitions[(row.run_id, row.partition)].train_flops_per_token * seq_len / flops
        out[owner] = OwnerDevice(max_micro_batch=limit, declared=declared, seconds_per_sequence=seconds)
    return out


def _from_memory(own: Sequence[PartitionProfile], memory_bytes: int, seq_len: int) -> int:
    """The most sequences of ``seq_len`` tokens the partitions ``own`` train at once in ``memory_bytes``."""
    if memory_bytes <= 0:
        return MAX_MICRO_BATCH  # nothing reported: no limit the server could know of
    state = sum(p.train_memory_bytes(0) for p in own)  # weights, gradients, moments
    per_sequence = sum(p.train_memory_bytes(seq_len) for p in own) - state
    if per_sequence <= 0:
        return MAX_MICRO_BATCH
    return max(1, min(MAX_MICRO_BATCH, (memory_bytes - state) // per_sequence))
