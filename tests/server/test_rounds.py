"""The round state machine with each participation mode (cases 1, 2 and 3, and sampled), driven without any I/O."""

from __future__ import annotations

from server.training.participation import Parallel, Sampled, Sequential
from server.training.rounds import (
    Merge,
    Phase,
    PipelineInfo,
    RoundMachine,
    SendLoad,
    SendPrepare,
    SendTrain,
    SendUpload,
    Snapshot,
)
from server.training.spec import ParticipationSection

P0 = PipelineInfo(owner="a", holders={"a": (0, 2), "h": (1,)})
P1 = PipelineInfo(owner="b", holders={"b": (0, 2), "h": (1,)})
METRICS = {"losses": [2.0, 1.5], "val_loss": 1.4, "ppl": 4.0, "samples": 8, "data_samples": 30, "seconds": 0.1}


def prepared(machine: RoundMachine, pipelines: dict[str, PipelineInfo]) -> list[object]:
    """Connect ``pipelines`` and answer every prepare; returns the actions of the last answer."""
    actions = machine.pipelines_ready(pipelines)
    assert all(isinstance(a, SendPrepare) for a in actions)
    last: list[object] = []
    for action in actions:
        assert isinstance(action, SendPrepare)
        last = list(machine.command_done(action.bridge_run, action.client_id))
    return last


def finish_turn(machine: RoundMachine, runs: list[str], metrics: dict[str, object] = METRICS) -> list[object]:
    """Train and upload ``runs``; returns the Merge actions."""
    uploads: list[object] = []
    for run in runs:
        uploads += machine.train_done(run, metrics)
    merges: list[object] = []
    for upload in uploads:
        assert isinstance(upload, SendUpload)
        merges += machine.command_done(upload.bridge_run, upload.client_id)
    return merges


def test_every_holder_is_prepared_before_round_one() -> None:
    """Each (pipeline, holder) gets a prepare, and round 1 starts only after the last answer."""
    machine = RoundMachine(rounds=2)
    actions = machine.pipelines_ready({"p0": P0})
    assert actions == [SendPrepare(client_id="a", bridge_run="p0"), SendPrepare(client_id="h", bridge_run="p0")]
    assert machine.command_done("p0", "a") == [] and machine.phase == Phase.PREPARING
    assert machine.command_done("p0", "h") == [SendTrain(client_id="a", bridge_run="p0", round=1)]


def test_case1_uploads_merges_and_moves_on_without_loading() -> None:
    """In case 1 the only pipeline keeps its weights: after a merge the next round trains right away."""
    machine = RoundMachine(rounds=2)
    prepared(machine, {"p0": P0})
    uploads = machine.train_done("p0", METRICS)
    assert uploads == [
        SendUpload(client_id="a", bridge_run="p0", partitions=(0, 2), round=1),
        SendUpload(client_id="h", bridge_run="p0", partitions=(1,), round=1),
    ]
    assert machine.command_done("p0", "a") == []
    assert machine.command_done("p0", "h") == [Merge(round=1, bridge_runs=("p0",), weights={"p0": 30}, checkpoint=True)]
    assert machine.merged() == [SendTrain(client_id="a", bridge_run="p0", round=2)]
    finish_turn(machine, ["p0"])
    assert machine.merged() == [] and machine.phase == Phase.DONE and machine.round == 2


def test_case3_trains_in_parallel_merges_once_and_loads_everywhere() -> None:
    """Case 3: both owners train, one merge weighted by samples, then every holder loads before round 2."""
    machine = RoundMachine(rounds=2, participation=Parallel())
    assert prepared(machine, {"p0": P0, "p1": P1}) == [
        SendTrain(client_id="a", bridge_run="p0", round=1), SendTrain(client_id="b", bridge_run="p1", round=1)
    ]
    assert machine.train_done("p0", METRICS) == []  # waits for the other owner
    uploads = machine.train_done("p1", {**METRICS, "data_samples": 10})
    assert len(uploads) == 4
    merges = [m for u in uploads for m in machine.command_done(u.bridge_run, u.client_id)]  # type: ignore[union-attr]
    assert merges == [Merge(round=1, bridge_runs=("p0", "p1"), weights={"p0": 30, "p1": 10}, checkpoint=True)]
    loads = machine.merged()
    assert SendLoad(client_id="h", bridge_run="p1", partitions=(1,)) in loads and len(loads) == 4
    trains = [t for load in loads for t in machine.command_done(load.bridge_run, load.client_id)]  # type: ignore[union-attr]
    assert trains == [SendTrain(client_id="a", bridge_run="p0", round=2), SendTrain(client_id="b", bridge_run="p1", round=2)]


def test_case2_hands_over_between_owners() -> None:
    """Case 2: owner a trains, merges alone, then b loads a's weights and trains; the checkpoint comes after b."""
    machine = RoundMachine(rounds=1, participation=Sequential())
    assert prepared(machine, {"p0": P0, "p1": P1}) == [SendTrain(client_id="a", bridge_run="p0", round=1)]
    assert finish_turn(machine, ["p0"]) == [Merge(round=1, bridge_runs=("p0",), weights={"p0": 30}, checkpoint=False)]
    loads = machine.merged()
    assert loads == [SendLoad(client_id="b", bridge_run="p1", partitions=(0, 2)), SendLoad(client_id="h", bridge_run="p1", partitions=(1,))]
    machine.command_done("p1", "b")
    assert machine.command_done("p1", "h") == [SendTrain(client_id="b", bridge_run="p1", round=1)]
    assert finish_turn(machine, ["p1"]) == [Merge(round=1, bridge_runs=("p1",), weights={"p1": 30}, checkpoint=True)]
    assert machine.merged() == [] and machine.phase == Phase.DONE
    assert [(h["round"], h["owner"]) for h in machine.history] == [(1, "a"), (1, "b")]


def test_a_resumed_run_loads_the_checkpoint_first() -> None:
    """After resume_after(1) the first turn loads the global partitions, and training starts at round 2."""
    machine = RoundMachine(rounds=3)
    machine.resume_after(1)
    loads = prepared(machine, {"p0": P0})
    assert {type(a) for a in loads} == {SendLoad}
    machine.command_done("p0", "a")
    assert machine.command_done("p0", "h") == [SendTrain(client_id="a", bridge_run="p0", round=2)]


def test_repeated_and_out_of_order_reports_are_ignored() -> None:
    """A second training report, or one from a pipeline not training now, changes nothing."""
    machine = RoundMachine(rounds=1, participation=Sequential())
    prepared(machine, {"p0": P0, "p1": P1})
    assert machine.train_done("p1", METRICS) == []
    machine.train_done("p0", METRICS)
    assert machine.train_done("p0", METRICS) == [] and len(machine.history) == 1
    assert machine.merged() == []


def test_failure_and_stop_end_an_active_run_only() -> None:
    """A failure ends a run with its reason; a stop after that changes nothing."""
    machine = RoundMachine(rounds=3)
    prepared(machine, {"p0": P0})
    machine.failed("helper lost")
    machine.stop()
    assert machine.phase == Phase.FAILED and machine.error == "helper lost"
    assert machine.train_done("p0", METRICS) == []


def test_a_stopped_run_ignores_its_pipelines() -> None:
    """Stopping a waiting run means nothing is ever sent."""
    machine = RoundMachine(rounds=3)
    machine.stop()
    assert machine.pipelines_ready({"p0": P0}) == [] and machine.phase == Phase.STOPPED


def test_a_server_optimizer_run_uploads_the_first_pipeline_as_round_zero() -> None:
    """With snapshot_first, preparing ends in round-0 uploads from the first pipeline's holders only."""
    machine = RoundMachine(rounds=2, participation=Parallel(), snapshot_first=True)
    uploads = prepared(machine, {"p0": P0, "p1": P1})
    assert uploads == [
        SendUpload(client_id="a", bridge_run="p0", partitions=(0, 2), round=0),
        SendUpload(client_id="h", bridge_run="p0", partitions=(1,), round=0),
    ]
    assert machine.phase == Phase.UPLOADING and machine.round == 0


def test_the_snapshot_is_taken_once_every_holder_uploaded() -> None:
    """The Snapshot action names the first pipeline and comes only after its last holder answered."""
    machine = RoundMachine(rounds=2, participation=Parallel(), snapshot_first=True)
    prepared(machine, {"p0": P0, "p1": P1})
    assert machine.command_done("p0", "a") == []
    assert machine.command_done("p0", "h") == [Snapshot(round=0, bridge_run="p0")]
    assert machine.phase == Phase.MERGING and machine.round == 0


def test_round_one_trains_right_after_the_snapshot_without_loading() -> None:
    """Every pipeline still holds the starting state, so after the snapshot every owner trains round 1."""
    machine = RoundMachine(rounds=2, participation=Parallel(), snapshot_first=True)
    for upload in prepared(machine, {"p0": P0, "p1": P1}):
        assert isinstance(upload, SendUpload)
        machine.command_done(upload.bridge_run, upload.client_id)
    assert machine.merged() == [
        SendTrain(client_id="a", bridge_run="p0", round=1), SendTrain(client_id="b", bridge_run="p1", round=1)
    ]


def test_after_the_snapshot_rounds_merge_and_load_as_usual() -> None:
    """Round 1 of a snapshot run ends in an ordinary checkpointing Merge, then every holder loads."""
    machine = RoundMachine(rounds=2, participation=Parallel(), snapshot_first=True)
    for upload in prepared(machine, {"p0": P0, "p1": P1}):
        assert isinstance(upload, SendUpload)
        machine.command_done(upload.bridge_run, upload.client_id)
    machine.merged()
    assert finish_turn(machine, ["p0", "p1"]) == [
        Merge(round=1, bridge_runs=("p0", "p1"), weights={"p0": 30, "p1": 30}, checkpoint=True)
    ]
    loads = machine.merged()
    assert len(loads) == 4 and all(isinstance(a, SendLoad) for a in loads)


def test_training_reports_during_the_snapshot_are_ignored() -> None:
    """A stray training report while round 0 uploads changes nothing."""
    machine = RoundMachine(rounds=2, participation=Parallel(), snapshot_first=True)
    prepared(machine, {"p0": P0, "p1": P1})
    assert machine.train_done("p0", METRICS) == [] and machine.history == []
    assert machine.merged() == [] and machine.phase == Phase.UPLOADING


def test_a_resumed_server_optimizer_run_takes_no_snapshot() -> None:
    """A run resumed from a checkpoint has its global state: it loads it and trains, with no round-0 upload."""
    machine = RoundMachine(rounds=3, participation=Parallel(), snapshot_first=True)
    machine.resume_after(1)
    loads = prepared(machine, {"p0": P0, "p1": P1})
    assert loads and all(isinstance(a, SendLoad) for a in loads)


def test_a_one_stage_pipeline_trains_beside_a_three_stage_one() -> None:
    """An owner holding its whole model (partition 0 only) uploads, merges and loads beside a pipeline cut in three."""
    whole = PipelineInfo(owner="c", holders={"c": (0,)})
    machine = RoundMachine(rounds=2, participation=Parallel())
    assert prepared(machine, {"p0": P0, "p2": whole}) == [
        SendTrain(client_id="a", bridge_run="p0", round=1), SendTrain(client_id="c", bridge_run="p2", round=1)
    ]
    uploads = machine.train_done("p0", METRICS) + machine.train_done("p2", {**METRICS, "data_samples": 10})
    assert SendUpload(client_id="c", bridge_run="p2", partitions=(0,), round=1) in uploads and len(uploads) == 3
    merges = [m for u in uploads for m in machine.command_done(u.bridge_run, u.client_id)]  # type: ignore[union-attr]
    assert merges == [Merge(round=1, bridge_runs=("p0", "p2"), weights={"p0": 30, "p2": 10}, checkpoint=True)]
    loads = machine.merged()
    assert SendLoad(client_id="c", bridge_run="p2", partitions=(0,)) in loads and len(loads) == 3


def test_a_one_stage_pipeline_alone_never_loads() -> None:
    """With one owner holding the whole model, rounds follow each other with an upload and a merge, no load."""
    machine = RoundMachine(rounds=2)
    prepared(machine, {"p0": PipelineInfo(owner="a", holders={"a": (0,)})})
    assert finish_turn(machine, ["p0"]) == [Merge(round=1, bridge_runs=("p0",), weights={"p0": 30}, checkpoint=True)]
    assert machine.merged() == [SendTrain(client_id="a", bridge_run="p0", round=2)]


# -- sampled participation -----------------------------------------------------------------

FOUR = {f"p{i}": PipelineInfo(owner=f"o{i}", holders={f"o{i}": (0,), f"h{i}": (1,)}) for i in range(4)}
SAMPLES = {"p0": 10, "p1": 20, "p2": 30, "p3": 40}


def drive(machine: RoundMachine, pipelines: dict[str, PipelineInfo]) -> list[object]:
    """Answer every action as the clients and the server would, until the run ends; every action, in order."""
    log: list[object] = []
    queue: list[object] = list(machine.pipelines_ready(pipelines))
    while queue:
        action = queue.pop(0)
        log.append(action)
        if isinstance(action, SendTrain):
            queue += machine.train_done(action.bridge_run, {**METRICS, "data_samples": SAMPLES[action.bridge_run]})
        elif isinstance(action, (Merge, Snapshot)):
            queue += machine.merged()
        else:
            assert isinstance(action, (SendPrepare, SendLoad, SendUpload))
            queue += machine.command_done(action.bridge_run, action.client_id)
    assert machine.phase == Phase.DONE
    return log


def by_round(log: list[object]) -> dict[int, list[object]]:
    """The actions of each round, from its first SendLoad or SendTrain to its Merge (a load opens the round it precedes)."""
    rounds: dict[int, list[object]] = {}
    pending: list[object] = []
    for action in log:
        if isinstance(action, SendLoad):
            pending.append(action)
        elif isinstance(action, (SendTrain, SendUpload, Merge)) and action.round > 0:
            rounds.setdefault(action.round, []).extend(pending)
            pending = []
            rounds[action.round].append(action)
    return rounds


def test_sampled_trains_merges_and_loads_only_the_drawn_owners() -> None:
    """Half of four owners over 3 rounds: Train, Upload and Merge name the drawn pipelines only, weighted by their samples;
    a pipeline that sat a round out loads the global state before it trains again."""
    mode = Sampled(ParticipationSection(mode="sampled", fraction=0.5), seed=0)
    drawn = {r: mode.turns(r, list(FOUR))[0] for r in (1, 2, 3)}
    assert drawn == {1: ("p0", "p2"), 2: ("p1", "p3"), 3: ("p0", "p2")}  # p1 and p3 sit round 1 out, p0 and p2 round 2
    machine = RoundMachine(rounds=3, participation=mode)
    rounds = by_round(drive(machine, FOUR))
    for r, actions in rounds.items():
        trained = [a.bridge_run for a in actions if isinstance(a, SendTrain)]
        assert trained == list(drawn[r])
        assert [a.client_id for a in actions if isinstance(a, SendTrain)] == [FOUR[run].owner for run in drawn[r]]
        assert {a.bridge_run for a in actions if isinstance(a, (SendUpload, SendLoad))} <= set(drawn[r])
        merges = [a for a in actions if isinstance(a, Merge)]
        weights = {run: SAMPLES[run] for run in drawn[r]}
        assert merges == [Merge(round=r, bridge_runs=drawn[r], weights=weights, checkpoint=True)]
    # Round 1 starts from the state every pipeline holds; later rounds load first, each holder of each drawn pipeline.
    assert not any(isinstance(a, SendLoad) for a in rounds[1])
    for r in (2, 3):
        loads = [a for a in rounds[r] if isinstance(a, SendLoad)]
        assert {(a.bridge_run, a.client_id) for a in loads} == {(run, c) for run in drawn[r] for c in FOUR[run].holders}
        first_train = next(i for i, a in enumerate(rounds[r]) if isinstance(a, SendTrain))
        assert all(isinstance(a, SendLoad) for a in rounds[r][:first_train]) and len(loads) == first_train
    assert [(h["round"], h["owner"]) for h in machine.history] == [
        (1, "o0"), (1, "o2"), (2, "o1"), (2, "o3"), (3, "o0"), (3, "o2")
    ]


def test_a_drawn_pipeline_that_merged_alone_trains_on_without_loading_with_fedavg() -> None:
    """One owner a round, FedAvg: the one that trained the last round holds the global state; the other loads it."""
    mode = Sampled(ParticipationSection(mode="sampled", count=1), seed=5)
    assert [mode.turns(r, ["p0", "p1"])[0] for r in (1, 2, 3)] == [("p0",), ("p0",), ("p1",)]
    rounds = by_round(drive(RoundMachine(rounds=3, participation=mode), {"p0": FOUR["p0"], "p1": FOUR["p1"]}))
    assert not any(isinstance(a, SendLoad) for a in rounds[1] + rounds[2])
    assert [a for a in rounds[3] if isinstance(a, SendLoad)] == [
        SendLoad(client_id="h1", bridge_run="p1", partitions=(1,)),
        SendLoad(client_id="o1", bridge_run="p1", partitions=(0,)),
    ]


def test_a_server_optimizer_step_from_one_copy_is_loaded_by_that_copys_pipeline() -> None:
    """With a server optimizer the merge of one copy is a step from the round's start, not the copy: it is loaded too."""
    mode = Sampled(ParticipationSection(mode="sampled", count=1), seed=5)
    log = drive(RoundMachine(rounds=3, participation=mode, snapshot_first=True), {"p0": FOUR["p0"], "p1": FOUR["p1"]})
    rounds = by_round(log)
    assert not any(isinstance(a, SendLoad) for a in rounds[1])
    assert {a.bridge_run for a in rounds[2] if isinstance(a, SendLoad)} == {"p0"}  # p0 trained round 1 alone, and loads
    assert {a.bridge_run for a in rounds[3] if isinstance(a, SendLoad)} == {"p1"}


def test_the_snapshot_comes_from_the_first_pipeline_even_when_it_is_not_drawn() -> None:
    """A server optimizer's round 0 is uploaded by the first pipeline; round 1 then trains the drawn one without loading."""
    mode = Sampled(ParticipationSection(mode="sampled", count=1), seed=1)
    assert mode.turns(1, ["p0", "p1"]) == [("p1",)]
    log = drive(RoundMachine(rounds=1, participation=mode, snapshot_first=True), {"p0": FOUR["p0"], "p1": FOUR["p1"]})
    after_prepare = [a for a in log if not isinstance(a, SendPrepare)]
    assert after_prepare[:4] == [
        SendUpload(client_id="h0", bridge_run="p0", partitions=(1,), round=0),
        SendUpload(client_id="o0", bridge_run="p0", partitions=(0,), round=0),
        Snapshot(round=0, bridge_run="p0"),
        SendTrain(client_id="o1", bridge_run="p1", round=1),
    ]
    assert log[-1] == Merge(round=1, bridge_runs=("p1",), weights={"p1": 20}, checkpoint=True)


def test_a_single_pipeline_merged_by_a_server_optimizer_loads_before_each_round() -> None:
    """Parallel with one owner and a server optimizer: its copy was stepped from, so round 2 starts with a load."""
    rounds = by_round(drive(RoundMachine(rounds=2, participation=Parallel(), snapshot_first=True), {"p0": FOUR["p0"]}))
    assert {a.bridge_run for a in rounds[2] if isinstance(a, SendLoad)} == {"p0"}
