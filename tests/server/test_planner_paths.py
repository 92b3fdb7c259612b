"""The step estimate of a planned pipeline charges every boundary to the links it crosses."""

from __future__ import annotations

import pytest

from server.planning.planner.paths import StageLoad, step_seconds
from server.planning.planner.types import ClientProfile

MB = 1e6 / 8  # bytes/s of one Mbit/s


def client(name: str, mbit: float, *, flops: float = 1e10, rtt: float = 0.0) -> ClientProfile:
    return ClientProfile(
        client_id=name, flops_per_s=flops, memory_bytes=1 << 30, upload_bytes_per_s=mbit * MB,
        download_bytes_per_s=mbit * MB, rtt_s=rtt,
    )  # fmt: skip


def pipeline(owner: ClientProfile, hosts: list[ClientProfile], nbytes: float) -> list[StageLoad]:
    stages = [StageLoad(client=owner, train_flops=1e9, out_bytes=nbytes)]
    stages += [StageLoad(client=h, train_flops=1e9, out_bytes=nbytes) for h in hosts]
    return [*stages, StageLoad(client=owner, train_flops=1e9, out_bytes=0.0)]


def test_relay_sends_a_boundary_between_hosts_through_the_owners_link():
    """One micro-batch: the relayed path adds both hops over the owner's slow link, the chain one fast hop."""
    owner, a, b = client("o", 10), client("a", 200), client("b", 200)
    nbytes = 1e6
    stages = pipeline(owner, [a, b], nbytes)
    compute = 4 * 1e9 / 1e10
    slow, fast = nbytes / (10 * MB), nbytes / (200 * MB)
    # Boundaries o->a and b->o cross the owner's link both ways (activation and gradient) on either path.
    ends = 2 * 2 * slow
    assert step_seconds(stages, "chain") == pytest.approx(compute + ends + 2 * fast)
    assert step_seconds(stages, "relay") == pytest.approx(compute + ends + 2 * 2 * slow)


def test_round_trips_are_charged_per_micro_batch_and_hop():
    """Each hop costs the larger round trip of its two ends once per micro-batch, each way."""
    owner, a = client("o", 1e6, flops=1e15, rtt=0.05), client("a", 1e6, flops=1e15, rtt=0.01)
    stages = pipeline(owner, [a], 1.0)
    base = step_seconds(pipeline(client("o", 1e6, flops=1e15), [client("a", 1e6, flops=1e15)], 1.0), "chain")
    assert step_seconds(stages, "chain") - base == pytest.approx(2 * 2 * 0.05, rel=1e-3)


def test_stages_on_one_client_exchange_nothing():
    """A pipeline held by the owner alone costs its compute on either path."""
    owner = client("o", 1)
    stages = pipeline(owner, [owner], 1e9)
    assert step_seconds(stages, "relay") == step_seconds(stages, "chain") == pytest.approx(3 * 1e9 / 1e10)


def test_micro_batches_overlap_at_the_pace_of_the_busiest_link():
    """With many micro-batches the chain's step tends to the owner's link time, far below the relay's."""
    owner, hosts = client("o", 10), [client(n, 200) for n in "abc"]
    stages = pipeline(owner, hosts, 4e6)
    chain, relay = step_seconds(stages, "chain", 8), step_seconds(stages, "relay", 8)
    owner_link = 2 * 4e6 / (10 * MB)  # the owner uploads the first activation and the last gradient
    assert owner_link <= chain < relay
    assert chain / relay < 0.5
    with pytest.raises(ValueError, match="path must be"):
        step_seconds(stages, "star")


def test_auto_takes_the_path_the_plan_estimates_faster():
    """``[training] path = "auto"`` picks the faster estimate; a named path stays; no estimate means relay."""
    from server.training.spec import chosen_path

    assert chosen_path("auto", {"relay": 7.4, "chain": 4.1}) == "chain"
    assert chosen_path("auto", {"relay": 1.0, "chain": 1.2}) == "relay"
    assert chosen_path("auto", None) == "relay"
    assert chosen_path("chain", {"relay": 1.0, "chain": 9.0}) == "chain"
