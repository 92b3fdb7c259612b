"""The planner's cost model for forward-gradient pipelines: forwards only, activations one way, nothing kept."""

from __future__ import annotations

import pytest

from autograd_bridge.partition import stage_specs_from_counts
from autograd_bridge.profile import profile_partitions
from server.planning.planner import PlannerSettings
from server.planning.planner.costs import Slots, cost_terms, stage_demands

from .test_planner import GFLOP, MB, client, tiny_llama


def test_a_forward_gradient_stage_has_no_backward_compute_traffic_or_memory() -> None:
    """With P forward passes a middle stage costs P forwards, P hidden states one way per boundary, no saved activations."""
    llama6 = tiny_llama(6)
    parts = profile_partitions(llama6, stage_specs_from_counts([1, 2, 3]))
    backprop = stage_demands(parts, PlannerSettings(batch_tokens=512))[1]
    forward = stage_demands(parts, PlannerSettings(batch_tokens=512, forward_passes=8))[1]
    hidden = 512 * llama6.hidden_size * llama6.dtype_bytes
    assert forward.train_flops == pytest.approx(parts[1].train_flops_per_token / 3 * 512 * 8)
    assert forward.boundary_bytes == 8 * 2 * hidden and forward.one_way and not backprop.one_way
    assert forward.memory_bytes < backprop.memory_bytes  # no activations kept, no gradients, no Adam moments
    helper = client("h", gflops=50, up_mb=10, down_mb=40, rtt=0.02)
    terms = cost_terms([forward], Slots.of([helper]), PlannerSettings(batch_tokens=512, forward_passes=8))
    # Each of the 8 passes receives one hidden state and sends one: half of the bytes each way.
    expected = forward.train_flops / (50 * GFLOP) + 8 * hidden * (1 / (10 * MB) + 1 / (40 * MB)) + 2 * 0.02
    assert terms.step[0, 0] == pytest.approx(expected)


def test_forward_passes_must_be_a_count() -> None:
    """A negative or fractional number of passes is refused by name."""
    with pytest.raises(ValueError, match="forward_passes"):
        PlannerSettings(forward_passes=-1)
