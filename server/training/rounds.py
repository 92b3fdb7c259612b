"""The round state machine of a training run, without any I/O.

The machine takes events (the plan's pipelines are connected, a client finished a command,
the server merged the uploads, the operator stopped the run) and returns the actions the
caller must carry out. The caller (:mod:`server.training.run_manager`) turns actions into commands and
files; tests drive the machine directly.

A plan has one pipeline per data owner (its bridge run id); each pipeline may be cut into
its own number of partitions, one included. A round is a sequence of *turns*, which the
run's :class:`~server.training.participation.Participation` decides (one turn with the one
pipeline; one turn per owner in order; one turn with every pipeline, or with a subset drawn
for the round). In a turn some pipelines train, then every client holding one of their
partitions uploads what it trains, and the server merges each partition's copies (FedAvg
weighted by samples, where one copy merges to itself, or a server optimizer's step) into
the new global partitions.

Before a turn the pipelines that do not hold the global partitions already load them
(``SendLoad``): after a merge of several copies every pipeline, after a hand-over the next
owner's, a pipeline that sat the last turn out, when one pipeline trains turn after turn
none (unless a server optimizer stepped from its one copy), and after a resume from a
checkpoint every one. The last merge of a round is written as the round's checkpoint.

A server optimizer (FedAdam, FedYogi, FedAdagrad) steps from the state the copies started
from, which the server does not have before round 1: LoRA adapters are made on the clients
(drawn from the seed and each tensor's name, so every pipeline starts equal, whatever its
cuts) and full fine-tuning starts from the
base weights. A fresh run made with ``snapshot_first`` therefore takes a *snapshot* after
preparing: the holders of the first pipeline upload "round 0" (``SendUpload``), and
``Snapshot`` tells the caller to take that upload as the global state as it is, without
merging. Every pipeline still holds that state, so round 1 trains without loading. A resumed
run has its checkpoint as the global state and takes no snapshot.

::

    waiting --pipelines_ready--> preparing --all prepared-->
        [snapshot_first, fresh: uploading round 0 --all uploaded--> merging (Snapshot) --merged-->]
        [loading] --> training --all trained--> uploading --all uploaded--> merging (Merge) --merged-->
            next turn ([loading] training) | round done: next round | done
    any active phase --failed--> failed;  --stop--> stopped
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.training.participation import Participation, Single


class Phase(enum.StrEnum):
    """Where a run stands."""

    WAITING = "waiting"  # for a plan whose pipelines are connected
    PREPARING = "preparing"  # holders set their stages up (LoRA adapters)
    LOADING = "loading"  # pipelines load the global partitions
    TRAINING = "training"
    UPLOADING = "uploading"  # (round 0: the snapshot of the starting state)
    MERGING = "merging"  # the server merges (and, at a round's end, writes the checkpoint), or takes the snapshot
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"


ACTIVE = (Phase.WAITING, Phase.PREPARING, Phase.LOADING, Phase.TRAINING, Phase.UPLOADING, Phase.MERGING)


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineInfo:
    """One pipeline of the plan."""

    owner: str  # its data owner
    holders: Mapping[str, tuple[int, ...]]  # client id -> the partitions it holds in this pipeline


@dataclass(frozen=True, slots=True, kw_only=True)
class SendPrepare:
    """Tell a holder how the run trains (before the first round)."""

    client_id: str
    bridge_run: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SendLoad:
    """Tell a holder to load the global version of its partitions of ``bridge_run``."""

    client_id: str
    bridge_run: str
    partitions: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SendTrain:
    """Tell an owner to train ``round``."""

    client_id: str  # the data owner
    bridge_run: str  # its pipeline
    round: int  # 1-based


@dataclass(frozen=True, slots=True, kw_only=True)
class SendUpload:
    """Ask a holder to upload what its partitions train, as it is at the end of this turn."""

    client_id: str
    bridge_run: str
    partitions: tuple[int, ...]
    round: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Merge:
    """Merge each partition's uploaded copies from ``bridge_runs``; at a round's end, checkpoint."""

    round: int
    bridge_runs: tuple[str, ...]  # the pipelines that trained this turn
    weights: Mapping[str, int]  # bridge run -> its FedAvg weight (the samples behind its copy, as local work counts them)
    checkpoint: bool  # the last turn of the round: write the round's checkpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Take ``bridge_run``'s upload of ``round`` (0) as the global state as it is, without merging."""

    round: int  # always 0: the state before the first round
    bridge_run: str  # the pipeline whose holders uploaded it (every pipeline starts equal)


Action = SendPrepare | SendLoad | SendTrain | SendUpload | Merge | Snapshot


@dataclass(slots=True)
class RoundMachine:
    """One run's progress through its rounds."""

    rounds: int  # the last round to train
    participation: Participation = field(default_factory=Single)  # who trains in each turn of a round
    # Upload the starting state as round 0 before round 1 of a fresh run (server optimizers
    # need the state each round starts from to form their pseudo-gradient). Their merge of
    # one copy is a step from that state, not the copy: its pipeline loads the result too.
    snapshot_first: bool = False
    round: int = 0  # the round in progress (1-based), or the last finished one; 0 before the first
    phase: Phase = Phase.WAITING
    error: str = ""
    pipelines: dict[str, PipelineInfo] = field(default_factory=dict)  # bridge run -> pipeline
    turns: list[tuple[str, ...]] = field(default_factory=list)  # this round's, from the participation
    turn: int = 0  # index into turns
    # The pipelines holding the global partitions: None when every pipeline does (they all
    # start from the same weights); () when none does (resumed from a checkpoint).
    holding: tuple[str, ...] | None = None
    pending: set[tuple[str, str]] = field(default_factory=set)  # (bridge run, client) still to answer
    weights: dict[str, int] = field(default_factory=dict)  # bridge run -> samples, this turn
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per owner and turn: its metrics

    @property
    def active(self) -> bool:
        """Whether the run still has work ahead."""
        return self.phase in ACTIVE

    def resume_after(self, round: int) -> None:
        """Continue after checkpointed ``round``: the pipelines must load the checkpoint first."""
        if self.phase != Phase.WAITING:
            raise ValueError("a run can only be resumed before it starts")
        self.round, self.holding = round, ()

    # -- events ----------------------------------------------------------------------------

    def pipelines_ready(self, pipelines: Mapping[str, PipelineInfo]) -> list[Action]:
        """The plan's pipelines are connected: prepare every holder."""
        if self.phase != Phase.WAITING:
            return []
        if not pipelines:
            raise ValueError("a run needs at least one pipeline")
        self.pipelines = dict(pipelines)
        if self.round >= self.rounds:
            self.phase = Phase.DONE
            return []
        self.phase = Phase.PREPARING
        self.pending = {(run, c) for run, p in self.pipelines.items() for c in p.holders}
        return [SendPrepare(client_id=c, bridge_run=run) for run, c in sorted(self.pending)]

    def command_done(self, bridge_run: str, client_id: str) -> list[Action]:
        """A prepare, load or upload command finished on ``client_id``."""
        if self.phase not in (Phase.PREPARING, Phase.LOADING, Phase.UPLOADING):
            return []
        self.pending.discard((bridge_run, client_id))
        if self.pending:
            return []
        if self.phase == Phase.PREPARING:
            if self.snapshot_first and self.round == 0:
                return self._snapshot()
            return self._next_round()
        if self.phase == Phase.LOADING:
            return self._train()
        self.phase = Phase.MERGING
        if self.round == 0:
            return [Snapshot(round=0, bridge_run=self._first_pipeline())]
        group = self.turns[self.turn]
        return [
            Merge(
                round=self.round,
                bridge_runs=group,
                weights={run: self.weights.get(run, 0) for run in group},
                checkpoint=self.turn == len(self.turns) - 1,
            )
        ]

    def train_done(self, bridge_run: str, metrics: Mapping[str, Any]) -> list[Action]:
        """An owner trained and evaluated: once the turn's owners all have, gather the partitions."""
        if self.phase != Phase.TRAINING or bridge_run not in self.turns[self.turn]:
            return []
        if all(run != bridge_run for run, _ in self.pending):
            return []  # a repeated report
        self.pending = {(run, c) for run, c in self.pending if run != bridge_run}
        owner = self.pipelines[bridge_run].owner
        self.history.append({"round": self.round, "turn": self.turn, "owner": owner, "bridge_run": bridge_run, **metrics})
        # The run's local work weighs each copy ("weight": the samples behind it); else the owner's data.
        self.weights[bridge_run] = int(metrics.get("weight", metrics.get("data_samples", metrics.get("samples", 0))))
        if self.pending:
            return []
        self.phase = Phase.UPLOADING
        group = self.turns[self.turn]
        self.pending = {(run, c) for run in group for c in self.pipelines[run].holders}
        return [
            SendUpload(client_id=c, bridge_run=run, partitions=self.pipelines[run].holders[c], round=self.round)
            for run, c in sorted(self.pending)
        ]

    def merged(self) -> list[Action]:
        """The server merged the turn's copies (and wrote the checkpoint at a round's end), or took the snapshot."""
        if self.phase != Phase.MERGING:
            return []
        if self.round == 0:
            return self._next_round()  # the snapshot: every pipeline still holds the global state
        self.holding = self.turns[self.turn]
        if self.turn + 1 < len(self.turns):
            self.turn += 1
            return self._begin_turn()
        if self.round >= self.rounds:
            self.phase = Phase.DONE
            return []
        return self._next_round()

    def failed(self, reason: str) -> None:
        """Something the run needs broke; the run ends (resume it from its last checkpoint)."""
        if self.active:
            self.phase, self.error = Phase.FAILED, reason

    def stop(self, reason: str = "stopped by the operator") -> None:
        """The operator stopped the run."""
        if self.active:
            self.phase, self.error = Phase.STOPPED, reason

    # -- steps -----------------------------------------------------------------------------

    def _next_round(self) -> list[Action]:
        self.round += 1
        self.turn = 0
        self.turns = self.participation.turns(self.round, list(self.pipelines))
        assert self.turns and all(self.turns), f"{self.participation.name} gave round {self.round} an empty turn"
        return self._begin_turn()

    def _first_pipeline(self) -> str:
        """The pipeline whose holders upload the starting state (every pipeline starts equal)."""
        return next(iter(self.pipelines))

    def _snapshot(self) -> list[Action]:
        """Round 0: the first pipeline's holders upload what their partitions train, untrained."""
        first = self._first_pipeline()
        holders = self.pipelines[first].holders
        self.phase = Phase.UPLOADING
        self.pending = {(first, c) for c in holders}
        return [SendUpload(client_id=c, bridge_run=first, partitions=holders[c], round=0) for c in sorted(holders)]

    def _begin_turn(self) -> list[Action]:
        group = self.turns[self.turn]
        self.weights = {}
        merged_to_itself = not self.snapshot_first and self.holding is not None and len(self.holding) == 1
        if self.holding is None or (merged_to_itself and group == self.holding):
            return self._train()  # these pipelines hold the global partitions already
        self.phase = Phase.LOADING
        self.pending = {(run, c) for run in group for c in self.pipelines[run].holders}
        return [
            SendLoad(client_id=c, bridge_run=run, partitions=self.pipelines[run].holders[c])
            for run, c in sorted(self.pending)
        ]

    def _train(self) -> list[Action]:
        group = self.turns[self.turn]
        self.phase = Phase.TRAINING
        self.pending = {(run, self.pipelines[run].owner) for run in group}
        return [SendTrain(client_id=self.pipelines[run].owner, bridge_run=run, round=self.round) for run in group]
