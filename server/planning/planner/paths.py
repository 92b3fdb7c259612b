"""The step time of a planned pipeline on each data path: every boundary charged to its links.

The assignment (:mod:`.costs`) weighs one partition on one client; this module estimates the
whole step of a pipeline once its clients are chosen, for the relayed and the chained path
(:mod:`autograd_bridge.paths`), so that the plan says what a step will take and a run can put
the measured time beside it.

Per step of ``batch_tokens`` tokens, the boundary after stage ``k`` carries ``A_k =
batch_tokens * activation_bytes_per_token[k]`` bytes forward (the activation) and as many
backward (its gradient), unless both stages run on the same client. A hop from client ``s`` to
client ``r`` moves its bytes at ``min(upload[s], download[r])`` and costs one round trip
``max(rtt[s], rtt[r])`` per micro-batch. On the **chained** path the boundary is one hop, host
to host; on the **relayed** path a boundary between two hosts is two hops through the owner
(host -> owner -> next host), so the owner's links carry it twice.

With ``M`` micro-batches the step is estimated as a pipeline's: the path of one micro-batch
(every stage's compute and every hop, each at ``1/M`` of the step's bytes and FLOPs, plus its
round trips), then ``M - 1`` more micro-batches at the pace of the busiest resource, where a
resource is a client's compute, its upload or its download, each busy for the step's sum of
what it does (a link carries every hop that crosses it)::

    step_s = one_micro_batch_s + (M - 1) / M * max(resource busy seconds per step)

With ``M = 1`` the stages run one after another and the step is the path of the batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from autograd_bridge.partition import stage_specs_from_counts
from autograd_bridge.profile import ModelProfile, PartitionProfile, profile_partitions

from .types import ClientProfile, PartitionPlan

PATHS = ("relay", "chain")

# Bytes on the wire per byte of an fp32 activation (int8: one byte a value plus a float32 scale per row).
COMPRESSION_RATIO = {"none": 1.0, "fp16": 0.5, "int8": 0.25}


@dataclass(frozen=True, slots=True, kw_only=True)
class StageLoad:
    """One stage of a planned pipeline, per step."""

    client: ClientProfile  # who runs it
    train_flops: float  # forward + backward FLOPs per step
    out_bytes: float  # bytes per step of its output activation (= of the gradient coming back); 0: the last


@dataclass(frozen=True, slots=True)
class _Hop:
    sender: ClientProfile
    receiver: ClientProfile
    nbytes: float  # per step, one direction


def _hops(stages: Sequence[StageLoad], path: str) -> list[_Hop]:
    """The network hops of the forward pass (backward crosses the same links the other way)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, not {path!r}")
    owner = stages[0].client
    hops = []
    for k in range(len(stages) - 1):
        here, there = stages[k].client, stages[k + 1].client
        nbytes = stages[k].out_bytes
        if here.client_id == there.client_id:
            continue
        through_owner = path == "relay" and owner.client_id not in (here.client_id, there.client_id)
        hops += (
            [_Hop(here, owner, nbytes), _Hop(owner, there, nbytes)]
            if through_owner
            else [_Hop(here, there, nbytes)]
        )
    return hops


def step_seconds(stages: Sequence[StageLoad], path: str, micro_batches: int = 1) -> float:
    """Estimated seconds of one training step of the pipeline ``stages`` (owner first) on ``path``."""
    if not stages:
        raise ValueError("a pipeline has at least one stage")
    if micro_batches < 1:
        raise ValueError("micro_batches must be at least 1")
    m = micro_batches
    busy: dict[tuple[str, str], float] = defaultdict(float)  # (client, compute|up|down) -> seconds per step
    one_micro_batch = 0.0
    for stage in stages:
        seconds = stage.train_flops / stage.client.flops_per_s
        busy[(stage.client.client_id, "compute")] += seconds
        one_micro_batch += seconds / m
    for hop in _hops(stages, path):
        for direction in ((hop.sender, hop.receiver), (hop.receiver, hop.sender)):  # forward, then backward
            sender, receiver = direction
            rate = min(sender.upload_bytes_per_s, receiver.download_bytes_per_s)
            busy[(sender.client_id, "up")] += hop.nbytes / sender.upload_bytes_per_s
            busy[(receiver.client_id, "down")] += hop.nbytes / receiver.download_bytes_per_s
            one_micro_batch += hop.nbytes / m / rate + max(sender.rtt_s, receiver.rtt_s)
    return one_micro_batch + (m - 1) / m * max(busy.values())


def pipeline_loads(
    model: ModelProfile,
    plan: PartitionPlan,
    clients: Sequence[ClientProfile],
    *,
    batch_tokens: int,
    compression: str = "none",
) -> dict[str, list[StageLoad]]:
    """Per data owner, the stages of its planned pipeline with their clients and per-step loads."""
    by_id = {c.client_id: c for c in clients}
    ratio = COMPRESSION_RATIO[compression]
    loads: dict[str, list[StageLoad]] = {}
    for owner in plan.owners:
        rows = sorted((a for a in plan.assignments if a.owner_id == owner), key=lambda a: a.stage)
        counts = [a.layer_end - a.layer_start for a in rows]
        parts: list[PartitionProfile] = profile_partitions(model, stage_specs_from_counts(counts))
        loads[owner] = [
            StageLoad(
                client=by_id[a.client_id],
                train_flops=p.train_flops_per_token * batch_tokens,
                out_bytes=p.activation_bytes_per_token * batch_tokens * ratio,
            )
            for a, p in zip(rows, parts, strict=True)
        ]
    return loads


def estimate_paths(
    loads: Mapping[str, Sequence[StageLoad]], micro_batches: int = 1
) -> dict[str, dict[str, float]]:
    """Per data owner, the estimated step seconds of its pipeline on each path."""
    return {
        owner: {path: round(step_seconds(stages, path, micro_batches), 6) for path in PATHS}
        for owner, stages in loads.items()
    }
