"""Device limits: an owner's largest micro-batch from its memory and the partitions it holds, or declared."""

from __future__ import annotations

import pytest
import torch

from autograd_bridge.models import tiny_config
from autograd_bridge.partition import stage_specs_from_counts
from autograd_bridge.profile import profile_model, profile_partitions
from proto.messages import DeviceProfile
from server.control.state import PlanRow
from server.training.device_limits import MAX_MICRO_BATCH, owner_devices

SEQ_LEN = 32


def rows_and_costs() -> tuple[list[PlanRow], dict[tuple[str, int], object]]:
    """One owner's pipeline in three stages: the ends on the owner, the middle on a helper."""
    torch.manual_seed(0)
    model = profile_model(tiny_config("llama"), seq_len=SEQ_LEN)
    layers = model.num_layers
    counts = [1, layers - 2, 1]
    parts = profile_partitions(model, stage_specs_from_counts(counts))
    rows, start = [], 0
    for k, count in enumerate(counts):
        rows.append(PlanRow(pipeline=0, owner_id="o", run_id="p0", partition=k, layer_start=start, layer_end=start + count,
                            params=1, client_id="h" if k == 1 else "o", est_compute_s=0.0, est_transfer_s=0.0, why=""))  # fmt: skip
        start += count
    return rows, {("p0", k): p for k, p in enumerate(parts)}


def test_the_limit_follows_from_memory_and_the_owner_partitions() -> None:
    """(memory - training state of the owner's partitions) / (activation bytes per sequence), by hand."""
    rows, costs = rows_and_costs()
    own = [costs[("p0", 0)], costs[("p0", 2)]]
    state = sum(p.train_memory_bytes(0) for p in own)  # type: ignore[attr-defined]
    per_sequence = sum(p.saved_bytes_per_token * SEQ_LEN for p in own)  # type: ignore[attr-defined]
    memory = state + 5 * per_sequence + per_sequence // 2
    profiles = {"o": DeviceProfile(memory_bytes=memory, flops_per_s=1e9), "h": DeviceProfile(flops_per_s=2e9)}
    got = owner_devices(rows, costs, profiles, seq_len=SEQ_LEN)["o"]  # type: ignore[arg-type]
    assert got.max_micro_batch == 5 and not got.declared
    want = sum(
        costs[("p0", k)].train_flops_per_token * SEQ_LEN / f for k, f in ((0, 1e9), (1, 2e9), (2, 1e9))
    )  # type: ignore[attr-defined]
    assert got.seconds_per_sequence == pytest.approx(want)


def test_a_declared_limit_wins_and_unknown_memory_sets_none() -> None:
    """A profile's declared max_micro_batch is taken as it is; without memory the server knows no limit."""
    rows, costs = rows_and_costs()
    declared = {"o": DeviceProfile(memory_bytes=1, max_micro_batch=3), "h": DeviceProfile()}
    got = owner_devices(rows, costs, declared, seq_len=SEQ_LEN)["o"]  # type: ignore[arg-type]
    assert (got.max_micro_batch, got.declared, got.seconds_per_sequence) == (3, True, 0.0)
    unknown = owner_devices(rows, costs, {"o": None, "h": None}, seq_len=SEQ_LEN)["o"]  # type: ignore[arg-type]
    assert unknown.max_micro_batch == MAX_MICRO_BATCH
    tiny = owner_devices(rows, costs, {"o": DeviceProfile(memory_bytes=1), "h": None}, seq_len=SEQ_LEN)["o"]  # type: ignore[arg-type]
    assert tiny.max_micro_batch == 1  # the planner already refused what does not fit one sequence
