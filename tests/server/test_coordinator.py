"""Planning and delivery with the real planner and a real tiny model, without sockets."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from proto.messages import (
    ChainPeers,
    CommandState,
    ConnectPeers,
    DeviceProfile,
    HostRun,
    RunState,
    RunStatus,
    StatusReport,
    StopRun,
)
from server.config import ModelSettings, PlanningSettings
from server.control.handler import ControlHandler
from server.control.state import ClientStatus
from server.planning.coordinator import Coordinator, PlanOutcome
from server.planning.model_source import hf_model_source, planner_for

from .conftest import FakeClock, registration


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (4 blocks) saved as a Hugging Face directory."""
    from transformers import AutoModelForCausalLM

    from autograd_bridge.models import save_pretrained_dir, tiny_config

    path = tmp_path_factory.mktemp("model")
    save_pretrained_dir(AutoModelForCausalLM.from_config(tiny_config("llama")), None, path)
    return path


def make_coordinator(handler: ControlHandler, model_dir: Path, tmp_path: Path, *, stages: int | None) -> Coordinator:
    """A coordinator planning the tiny model with the real planner into ``stages`` (None: it chooses)."""
    settings = ModelSettings(path=str(model_dir), stages=stages)
    source = hf_model_source(settings, work_dir=tmp_path / "model-work")
    planning = PlanningSettings(settle_s=0.0)
    coordinator = Coordinator(
        handler, model=source, plan=planner_for(source, settings, planning), settings=planning, scratch_dir=tmp_path / "scratch"
    )
    handler.listener = coordinator
    return coordinator


@pytest.fixture
def coordinator(handler: ControlHandler, model_dir: Path, tmp_path: Path) -> Coordinator:
    return make_coordinator(handler, model_dir, tmp_path, stages=3)


def join(handler: ControlHandler, name: str, flops: float, *, owner: bool = False, memory: int = 8 << 30) -> str:
    """Register a ready client with the given speed (and memory); returns its session token."""
    result = handler.register(registration(name, owner=owner))
    client = handler.authenticate(result.session_token)
    profile = DeviceProfile(
        flops_per_s=flops, memory_bytes=memory, upload_bytes_per_s=1e8, download_bytes_per_s=1e8, rtt_s=0.001
    )
    handler.report_profile(client, profile)
    return result.session_token


def bodies(handler: ControlHandler, client_id: str) -> list[object]:
    return [c.body for c in handler.state.pending_commands(client_id)]


def report(handler: ControlHandler, token: str, run: RunStatus) -> None:
    handler.report_status(handler.authenticate(token), StatusReport(command_id=1, state=CommandState.DONE, run=run))


async def test_fast_helper_gets_the_middle_partition(handler: ControlHandler, coordinator: Coordinator) -> None:
    """The owner keeps the first and last stage, the fastest helper hosts the middle one."""
    join(handler, "owner", 1e10, owner=True)
    join(handler, "slow", 1e9)
    join(handler, "fast", 5e10)
    deployment = await coordinator.replan()
    assert deployment.error == "" and deployment.owners == ("owner",)
    by_partition = {r.partition: r.client_id for r in deployment.rows}
    assert by_partition == {0: "owner", 1: "fast", 2: "owner"}
    assert sum(r.blocks for r in deployment.rows) == 4


async def test_hosts_get_their_partitions_and_the_owners_token_digest(handler: ControlHandler, coordinator: Coordinator) -> None:
    """Each client gets one HostRun with its partitions; only the served host lists the owner as peer."""
    join(handler, "owner", 1e10, owner=True)
    join(handler, "fast", 5e10)
    deployment = await coordinator.replan()
    (owner_cmd,) = bodies(handler, "owner")
    (host_cmd,) = bodies(handler, "fast")
    assert isinstance(owner_cmd, HostRun) and isinstance(host_cmd, HostRun)
    assert [p.index for p in owner_cmd.partitions] == [0, 2] and all(p.local for p in owner_cmd.partitions)
    assert owner_cmd.allowed_peers == ()
    assert [p.index for p in host_cmd.partitions] == [1] and not host_cmd.partitions[0].local
    assert [a.client_id for a in host_cmd.allowed_peers] == ["owner"]
    assert host_cmd.run_id == deployment.rows[0].run_id == f"{deployment.plan_id}-p0"


async def test_partition_weights_match_their_command(handler: ControlHandler, coordinator: Coordinator) -> None:
    """The weights a host may download hash to the digest in its command."""
    join(handler, "owner", 1e10, owner=True)
    join(handler, "fast", 5e10)
    await coordinator.replan()
    (cmd,) = bodies(handler, "fast")
    assert isinstance(cmd, HostRun)
    part = cmd.partitions[0]
    stored = handler.weights.get(cmd.run_id, part.index, client_id="fast")
    assert hashlib.sha256(stored.path.read_bytes()).hexdigest() == part.weights_sha256
    assert stored.size == part.weights_bytes


async def test_owner_is_sent_its_peers_once_hosts_serve(handler: ControlHandler, coordinator: Coordinator) -> None:
    """When the host serves, the owner gets ConnectPeers with a token the host will accept."""
    owner = join(handler, "owner", 1e10, owner=True)
    fast = join(handler, "fast", 5e10)
    deployment = await coordinator.replan()
    run_id = deployment.rows[0].run_id
    (host_cmd,) = bodies(handler, "fast")
    assert isinstance(host_cmd, HostRun)
    report(handler, fast, RunStatus(run_id=run_id, partitions=(1,), state=RunState.SERVING, bridge_url="wss://127.0.0.1:9",
                                    bridge_cert_pem="PEM of fast"))  # fmt: skip
    connect = bodies(handler, "owner")[-1]
    assert isinstance(connect, ConnectPeers)
    (peer,) = connect.peers
    assert (peer.partition, peer.client_id, peer.url) == (1, "fast", "wss://127.0.0.1:9")
    assert peer.cert_pem == "PEM of fast"  # the server vouches for exactly what that host reported
    assert hashlib.sha256(peer.token.encode()).hexdigest() == host_cmd.allowed_peers[0].token_sha256
    report(handler, owner, RunStatus(run_id=run_id, partitions=(0, 2), state=RunState.CONNECTED))
    current = handler.state.get_deployment()
    assert current is not None and current.state == "connected"


async def test_lost_host_is_replaced(handler: ControlHandler, coordinator: Coordinator, clock: FakeClock) -> None:
    """When the middle host is lost, the next plan moves its partition and stops the old run."""
    owner = join(handler, "owner", 1e10, owner=True)
    join(handler, "fast", 5e10)
    second = join(handler, "second", 2e10)
    first_plan = await coordinator.replan()
    clock.advance(handler.settings.heartbeat_timeout_s - 1)
    handler.authenticate(owner)
    handler.authenticate(second)
    clock.advance(2)
    assert handler.expire() == ["fast"]
    new_plan = await coordinator.replan()
    assert new_plan.generation > first_plan.generation
    assert {r.partition: r.client_id for r in new_plan.rows}[1] == "second"
    stops = [b for b in bodies(handler, "owner") if isinstance(b, StopRun)]
    assert [s.run_id for s in stops] == [first_plan.rows[0].run_id]


async def test_unchanged_clients_keep_the_plan(handler: ControlHandler, coordinator: Coordinator) -> None:
    """Replanning with the same ready clients keeps the current plan and sends nothing new."""
    join(handler, "owner", 1e10, owner=True)
    join(handler, "fast", 5e10)
    first = await coordinator.replan()
    queued = len(handler.state.pending_commands("fast"))
    again = await coordinator.replan()
    assert again.generation == first.generation
    assert len(handler.state.pending_commands("fast")) == queued


async def test_no_owner_gives_an_explained_error(handler: ControlHandler, coordinator: Coordinator) -> None:
    """Without a data owner there is no plan, and the reason says what to do."""
    join(handler, "fast", 5e10)
    deployment = await coordinator.replan()
    assert deployment.plan_id == "" and "--data" in deployment.error


async def test_too_few_clients_is_infeasible(handler: ControlHandler, coordinator: Coordinator) -> None:
    """An owner alone cannot run a three-stage pipeline; the planner's reason is kept."""
    join(handler, "owner", 1e10, owner=True)
    deployment = await coordinator.replan()
    assert deployment.plan_id == "" and "constraint" in deployment.error
    assert handler.state.get_client("owner").status == ClientStatus.READY  # type: ignore[union-attr]


async def test_planning_loop_survives_an_unexpected_error(handler: ControlHandler, tmp_path: Path) -> None:
    """A plan function that crashes leaves an explained failed plan, and the loop plans again on the next change."""
    import asyncio

    calls = []

    def crashing_plan(clients: object, owners: object) -> PlanOutcome:
        calls.append(1)
        raise RuntimeError("solver exploded")

    coordinator = Coordinator(
        handler, model=_NoModel(), plan=crashing_plan, settings=PlanningSettings(settle_s=0.0), scratch_dir=tmp_path
    )
    coordinator.start()
    try:
        for _ in range(100):
            deployment = handler.state.get_deployment()
            if deployment is not None:
                break
            await asyncio.sleep(0.01)
        assert deployment is not None and "solver exploded" in deployment.error
        coordinator.membership_changed()
        for _ in range(100):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(calls) == 2
    finally:
        await coordinator.close()


class _NoModel:
    """A model source that is never asked for weights (the plan fails first)."""

    def config_json(self) -> str:
        raise AssertionError("not reached")

    def write_stage(self, **kwargs: object) -> None:
        raise AssertionError("not reached")


# --------------------------------------------------------------------- one-stage pipelines


async def test_owner_alone_holds_the_whole_model_and_connects(
    handler: ControlHandler, model_dir: Path, tmp_path: Path
) -> None:
    """With no helper the owner gets one local partition of every block, no peers, and the plan connects."""
    coordinator = make_coordinator(handler, model_dir, tmp_path, stages=None)
    owner = join(handler, "owner", 1e10, owner=True)
    deployment = await coordinator.replan()
    assert deployment.error == "" and deployment.state == "serving"
    (row,) = deployment.rows
    assert (row.partition, row.layer_start, row.layer_end, row.client_id) == (0, 0, 4, "owner")
    assert row.local and row.pinned and deployment.summary["num_stages"] == 1
    host_cmd, connect = bodies(handler, "owner")
    assert isinstance(host_cmd, HostRun) and isinstance(connect, ConnectPeers)
    (part,) = host_cmd.partitions
    assert (part.index, part.num_stages, part.layer_start, part.layer_end, part.local) == (0, 1, 0, 4, True)
    assert host_cmd.allowed_peers == ()
    assert connect.run_id == host_cmd.run_id == row.run_id and connect.peers == ()
    stored = handler.weights.get(row.run_id, 0, client_id="owner")
    assert hashlib.sha256(stored.path.read_bytes()).hexdigest() == part.weights_sha256
    report(handler, owner, RunStatus(run_id=row.run_id, partitions=(0,), state=RunState.CONNECTED))
    current = handler.state.get_deployment()
    assert current is not None and current.state == "connected" and current.connected == ("owner",)


async def test_one_stage_plan_reads_as_a_table(handler: ControlHandler, model_dir: Path, tmp_path: Path) -> None:
    """``titanic-server plan`` shows the one partition on the owner, all blocks, and num_stages=1."""
    from server.observe.admin import deployment_json
    from server.observe.tables import plan_table

    coordinator = make_coordinator(handler, model_dir, tmp_path, stages=None)
    join(handler, "owner", 1e10, owner=True)
    deployment = await coordinator.replan()
    lines = plan_table(deployment_json(deployment)).splitlines()
    assert lines[0] == f"{deployment.plan_id} (serving; owners: owner)"
    assert len(lines) == 5  # head, column names, rule, the one partition, facts
    assert "0-3" in lines[3] and "owner (owner)" in lines[3] and "the whole model" in lines[3]
    assert "num_stages=1" in lines[-1] and "block_counts=[4]" in lines[-1]


async def test_forced_one_stage_leaves_helpers_idle(handler: ControlHandler, model_dir: Path, tmp_path: Path) -> None:
    """``stages = 1`` keeps the model on the owner even beside a fast helper, which gets no command."""
    coordinator = make_coordinator(handler, model_dir, tmp_path, stages=1)
    join(handler, "owner", 1e10, owner=True)
    join(handler, "fast", 5e10)
    deployment = await coordinator.replan()
    assert [(r.partition, r.client_id, r.local) for r in deployment.rows] == [(0, "owner", True)]
    assert bodies(handler, "fast") == []
    assert [type(b) for b in bodies(handler, "owner")] == [HostRun, ConnectPeers]


async def test_much_slower_helper_is_not_used(handler: ControlHandler, model_dir: Path, tmp_path: Path) -> None:
    """With the stage count left to the planner, a fast owner keeps the whole model from a slow helper."""
    coordinator = make_coordinator(handler, model_dir, tmp_path, stages=None)
    join(handler, "owner", 5e10, owner=True)
    join(handler, "slow", 1e8)
    deployment = await coordinator.replan()
    assert [(r.partition, r.client_id) for r in deployment.rows] == [(0, "owner")]
    assert bodies(handler, "slow") == []


async def test_each_owner_alone_runs_its_own_whole_model(
    handler: ControlHandler, model_dir: Path, tmp_path: Path
) -> None:
    """Two owners and no helper: two one-stage pipelines, each owner connects to no one, then both are connected."""
    coordinator = make_coordinator(handler, model_dir, tmp_path, stages=None)
    tokens = {name: join(handler, name, 1e10, owner=True) for name in ("a", "b")}
    deployment = await coordinator.replan()
    assert sorted((r.pipeline, r.client_id, r.partition, r.local) for r in deployment.rows) == [
        (0, "a", 0, True),
        (1, "b", 0, True),
    ]
    runs = {r.client_id: r.run_id for r in deployment.rows}
    for name, token in tokens.items():
        host_cmd, connect = bodies(handler, name)
        assert isinstance(host_cmd, HostRun) and isinstance(connect, ConnectPeers)
        assert host_cmd.run_id == connect.run_id == runs[name] and connect.peers == ()
        report(handler, token, RunStatus(run_id=runs[name], partitions=(0,), state=RunState.CONNECTED))
    current = handler.state.get_deployment()
    assert current is not None and current.state == "connected" and current.connected == ("a", "b")


# ------------------------------------------------- mixed plans: alone beside split pipelines

SMALL_MEMORY = 100_000_000  # the tiny model's embedding, head and a block, not all four blocks (222 MB)


async def join_big_and_small(handler: ControlHandler) -> dict[str, str]:
    """A fast owner that holds the whole model, an owner too small for it, and two helpers (one each)."""
    return {
        "big": join(handler, "big", 5e10, owner=True),
        "small": join(handler, "small", 1e10, owner=True, memory=SMALL_MEMORY),
        "helper": join(handler, "helper", 5e10),
        "helper2": join(handler, "helper2", 1e10),
    }


async def test_mixed_plan_sends_each_owner_its_own_pipeline(
    handler: ControlHandler, model_dir: Path, tmp_path: Path
) -> None:
    """The big owner hosts one local partition and connects at once; the small one's partitions span three stages."""
    coordinator = make_coordinator(handler, model_dir, tmp_path, stages=None)
    await join_big_and_small(handler)
    deployment = await coordinator.replan()
    assert deployment.error == "" and deployment.owners == ("big", "small")
    by_owner = {o: [r for r in deployment.rows if r.owner_id == o] for o in ("big", "small")}
    assert [(r.partition, r.layer_start, r.layer_end, r.client_id) for r in by_owner["big"]] == [(0, 0, 4, "big")]
    small = by_owner["small"]
    assert [r.partition for r in small] == [0, 1, 2] and [r.client_id for r in small] == ["small", "helper", "small"]
    assert small[0].layer_start == 0 and small[-1].layer_end == 4 and sum(r.blocks for r in small) == 4
    assert deployment.summary["stages"] == {"big": 1, "small": 3} and deployment.summary["num_stages"] == 3
    big_host, big_connect = bodies(handler, "big")
    assert isinstance(big_host, HostRun) and isinstance(big_connect, ConnectPeers) and big_connect.peers == ()
    assert [(p.index, p.num_stages, p.layer_start, p.layer_end, p.local) for p in big_host.partitions] == [(0, 1, 0, 4, True)]
    (small_host,) = bodies(handler, "small")
    (helper_host,) = bodies(handler, "helper")
    assert isinstance(small_host, HostRun) and isinstance(helper_host, HostRun)
    assert small_host.run_id == helper_host.run_id == small[0].run_id != big_host.run_id
    assert [(p.index, p.num_stages, p.local) for p in small_host.partitions] == [(0, 3, True), (2, 3, True)]
    assert [(p.index, p.num_stages, p.local) for p in helper_host.partitions] == [(1, 3, False)]
    assert [a.client_id for a in helper_host.allowed_peers] == ["small"]
    assert bodies(handler, "helper2") == []  # the slower helper is not needed


async def test_mixed_plan_connects_once_the_split_pipeline_is_served(
    handler: ControlHandler, model_dir: Path, tmp_path: Path
) -> None:
    """The small owner gets its peer when the helper serves; the plan is connected when both owners are."""
    coordinator = make_coordinator(handler, model_dir, tmp_path, stages=None)
    tokens = await join_big_and_small(handler)
    deployment = await coordinator.replan()
    assert deployment.state == "planned"  # the split pipeline's host does not serve yet
    runs = {r.owner_id: r.run_id for r in deployment.rows}
    report(handler, tokens["big"], RunStatus(run_id=runs["big"], partitions=(0,), state=RunState.CONNECTED))
    current = handler.state.get_deployment()
    assert current is not None and current.state == "planned" and current.connected == ("big",)
    report(
        handler,
        tokens["helper"],
        RunStatus(run_id=runs["small"], partitions=(1,), state=RunState.SERVING, bridge_url="ws://127.0.0.1:9"),
    )
    connect = bodies(handler, "small")[-1]
    assert isinstance(connect, ConnectPeers) and connect.run_id == runs["small"]
    assert [(p.partition, p.client_id) for p in connect.peers] == [(1, "helper")]
    report(handler, tokens["small"], RunStatus(run_id=runs["small"], partitions=(0, 2), state=RunState.CONNECTED))
    current = handler.state.get_deployment()
    assert current is not None and current.state == "connected" and current.connected == ("big", "small")


async def test_mixed_plan_table_shows_each_pipeline(handler: ControlHandler, model_dir: Path, tmp_path: Path) -> None:
    """``titanic-server plan`` lists the alone pipeline's one row, the split one's three, and each owner's stages."""
    from server.observe.admin import deployment_json
    from server.observe.tables import plan_table

    coordinator = make_coordinator(handler, model_dir, tmp_path, stages=None)
    await join_big_and_small(handler)
    deployment = await coordinator.replan()
    lines = plan_table(deployment_json(deployment)).splitlines()
    assert len(lines) == 3 + 4 + 1  # head, column names, rule; four partitions; facts
    assert "big (owner)" in lines[3] and "0-3" in lines[3] and "alone is at least as fast" in lines[3]
    assert "small (owner)" in lines[4] and "cannot hold the whole model" in lines[4]
    assert "helper" in lines[5]
    assert "stages={big: 1, small: 3}" in lines[-1] and "num_stages=3" in lines[-1]


async def test_fixed_stages_cut_both_owners_alike(handler: ControlHandler, model_dir: Path, tmp_path: Path) -> None:
    """With ``stages = 3`` the owner that could train alone gets three stages too, and both share the helpers."""
    coordinator = make_coordinator(handler, model_dir, tmp_path, stages=3)
    await join_big_and_small(handler)
    deployment = await coordinator.replan()
    assert deployment.error == "" and deployment.summary["stages"] == {"big": 3, "small": 3}
    for owner in ("big", "small"):
        rows = [r for r in deployment.rows if r.owner_id == owner]
        assert [r.partition for r in rows] == [0, 1, 2] and rows[0].client_id == rows[-1].client_id == owner
    assert sorted(r.client_id for r in deployment.rows if not r.local) == ["helper", "helper2"]


async def test_a_host_that_never_serves_is_dropped_and_the_plan_redone(
    handler: ControlHandler, model_dir: Path, tmp_path: Path
) -> None:
    """A fast helper that takes the middle stage but never serves is left out after serve_timeout_s; the plan moves on."""
    settings = ModelSettings(path=str(model_dir), stages=3)
    source = hf_model_source(settings, work_dir=tmp_path / "model-work")
    planning = PlanningSettings(settle_s=0.0, serve_timeout_s=0.3)
    coordinator = Coordinator(handler, model=source, plan=planner_for(source, settings, planning), settings=planning,
                              scratch_dir=tmp_path / "scratch")  # fmt: skip
    handler.listener = coordinator
    join(handler, "owner", 1e10, owner=True)
    join(handler, "liar", 1e15)  # claims far more FLOP/s than anyone, and never serves
    join(handler, "honest", 2e10)
    coordinator.start()
    try:
        for _ in range(200):
            current = handler.state.get_deployment()
            if current is not None and current.plan_id and current.rows[1].client_id == "honest":
                break
            await asyncio.sleep(0.05)
        first = [b for b in bodies(handler, "liar") if isinstance(b, HostRun)]
        assert first, "the liar was planned first"
        assert current is not None and {r.partition: r.client_id for r in current.rows}[1] == "honest"
        stops = [b for b in bodies(handler, "liar") if isinstance(b, StopRun)]
        assert [s.run_id for s in stops] == [first[0].run_id]
    finally:
        await coordinator.close()


async def test_hosts_are_sent_their_neighbours_for_the_chained_path(
    handler: ControlHandler, model_dir: Path, tmp_path: Path
) -> None:
    """Each host lets in the owner and the hosts next to it, and gets their URLs with its own token."""
    coordinator = make_coordinator(handler, model_dir, tmp_path, stages=4)
    tokens = {"owner": join(handler, "owner", 1e10, owner=True)}
    for name in ("a", "b"):
        tokens[name] = join(handler, name, 5e10)
    deployment = await coordinator.replan()
    host_of = {r.partition: r.client_id for r in deployment.rows if not r.local}
    assert sorted(host_of) == [1, 2] and host_of[1] != host_of[2], deployment.rows
    est = deployment.summary["est_step_s"]["owner"]  # the plan's step estimate on each data path
    assert 0 < est["chain"] <= est["relay"]
    run_id = deployment.rows[0].run_id
    host_cmds = {name: bodies(handler, name)[0] for name in set(host_of.values())}
    for partition, name in host_of.items():
        other = host_of[3 - partition]
        assert sorted(a.client_id for a in host_cmds[name].allowed_peers) == sorted(["owner", other])  # type: ignore[attr-defined]
        url = f"ws://127.0.0.1:{9000 + partition}"
        report(handler, tokens[name], RunStatus(run_id=run_id, partitions=(partition,), state=RunState.SERVING, bridge_url=url,
                                                bridge_cert_pem=f"PEM of {name}"))  # fmt: skip
    for partition, name in host_of.items():
        (chain,) = [b for b in bodies(handler, name) if isinstance(b, ChainPeers)]
        (peer,) = chain.peers
        other = host_of[3 - partition]
        assert (peer.partition, peer.client_id, peer.url) == (3 - partition, other, f"ws://127.0.0.1:{9003 - partition}")
        assert peer.cert_pem == f"PEM of {other}"  # the neighbour's own certificate, as it reported it
        digest = hashlib.sha256(peer.token.encode()).hexdigest()
        accepted = {a.token_sha256 for a in host_cmds[other].allowed_peers if a.client_id == name}  # type: ignore[attr-defined]
        assert digest in accepted
    assert isinstance(bodies(handler, "owner")[-1], ConnectPeers)
