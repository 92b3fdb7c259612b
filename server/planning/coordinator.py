"""Turns the registry into work: plan when the clients change, then deliver the plan.

A plan (a :class:`~server.control.state.Deployment`, id ``plan-<generation>``) has one pipeline per
data owner, and each pipeline is delivered as its own bridge run ``plan-<generation>-p<i>``, so
a client hosting stages of two pipelines keeps their state apart:

1. every client with partitions in a pipeline gets a ``HostRun`` for it (its partitions, whose
   weights it fetches by hash, and the digest of the token of the one peer it must accept);
2. each host answers with the URL of its stage host once it serves;
3. when every host of a pipeline serves, its data owner gets ``ConnectPeers`` (URLs and its
   token), and reports back once it reached them all; every host gets ``ChainPeers``: the
   URLs of the hosts of the partitions next to its own, which it lets in by their tokens'
   digests in its ``HostRun``, so a run on the chained path sends activations host to host.

Partitions a data owner holds in its own pipeline run there (``local``); the owner connects to
the hosts of the others (the bridge's star topology: only the owner talks to stage hosts). A
pipeline the owner holds alone (one stage, or two both on the owner) has no host to wait for:
its owner gets a ``HostRun`` with only local partitions and, at once, a ``ConnectPeers``
without peers. Pipelines of one plan may have different stage counts (an owner training the
whole model alone beside owners that split with helpers), so every count is taken per run.

When the ready clients change, the coordinator waits ``settle_s`` for the registry to calm
down, plans again, and only if the assignment differs stops the old run and delivers a new one.
A host that does not serve within ``serve_timeout_s`` of a plan's delivery is left out of
planning (until it registers again) and the plan is redone without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from proto.messages import (
    AllowedPeer,
    ChainPeers,
    CommandState,
    ConnectPeers,
    HostRun,
    PartitionAssignment,
    PeerEndpoint,
    RunState,
    StatusReport,
    StopRun,
)
from server.config import PlanningSettings
from server.control.handler import ControlHandler
from server.control.state import ClientRecord, ClientStatus, Deployment, PlanRow, plan_key
from server.errors import PlanningError

log = logging.getLogger(__name__)


class ModelSource(Protocol):
    """The model a server plans for: its config and its partitions' weights."""

    def config_json(self) -> str:
        """The model's config as JSON (what ``transformers`` writes to config.json)."""

    def write_stage(self, *, index: int, num_stages: int, layer_start: int, layer_end: int, path: Path) -> None:
        """Write one partition's weights as safetensors to ``path``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanOutcome:
    """What a planning function returns: one row per partition, and facts about the solve."""

    rows: tuple[PlanRow, ...]
    summary: dict[str, Any] = field(default_factory=dict)


# Given the ready clients and the data owners among them, a plan (or PlanningError).
PlanFunction = Callable[[Sequence[ClientRecord], Sequence[str]], PlanOutcome]


class Coordinator:
    """Plans on changes and delivers plans through the handler's command streams."""

    def __init__(
        self,
        handler: ControlHandler,
        *,
        model: ModelSource | None,
        plan: PlanFunction | None,
        settings: PlanningSettings,
        scratch_dir: Path,
    ) -> None:
        self.handler = handler
        self.state = handler.state
        self.model = model
        self.plan = plan
        self.settings = settings
        self.scratch_dir = Path(scratch_dir)
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self._tokens: dict[str, str] = {}  # run id -> the token of that pipeline's owner
        self._chain_tokens: dict[tuple[str, str], str] = {}  # (run id, host) -> its token for its neighbours
        self._stage_cache: dict[tuple[int, int, int, int], Path] = {}
        # Plan ids continue after those a persistent state remembers: a new plan never reuses an old one's.
        previous = self.state.get_deployment()
        self._generations = itertools.count(1 + (previous.generation if previous is not None else 0))
        self._benched: dict[str, float] = {}  # client id -> registered_at of the session that never served
        self._watchdog: asyncio.Task[None] | None = None

    # -- ControlListener -----------------------------------------------------------------

    def membership_changed(self) -> None:
        """The ready clients changed: plan again once they settle."""
        self._changed.set()

    def status_reported(self, client_id: str, report: StatusReport) -> None:
        """Follow a plan's delivery: collect host URLs, connect the owners, note who is connected."""
        deployment = self.state.get_deployment()
        run = report.run
        if deployment is None or run is None or run.run_id not in deployment.run_ids():
            return
        if report.state == CommandState.FAILED or run.state == RunState.FAILED:
            reason = report.message or run.message
            log.warning("client %s failed run %s: %s", client_id, run.run_id, reason)
            self.state.set_deployment(replace(deployment, state="failed", error=f"{client_id} ({run.run_id}): {reason}"))
            return
        if run.state == RunState.SERVING and run.bridge_url:
            urls = {k: dict(v) for k, v in deployment.bridge_urls.items()}
            urls.setdefault(run.run_id, {})[client_id] = run.bridge_url
            # The certificate this client reported over its own session: the one its peers trust.
            certs = {k: dict(v) for k, v in deployment.bridge_certs.items()}
            certs.setdefault(run.run_id, {})[client_id] = run.bridge_cert_pem
            deployment = replace(deployment, bridge_urls=urls, bridge_certs=certs)
            self.state.set_deployment(deployment)
            self._connect_owner_when_served(deployment, run.run_id)
        elif run.state == RunState.CONNECTED and client_id in deployment.owners:
            connected = tuple(sorted({*deployment.connected, client_id}))
            done = set(connected) >= set(deployment.owners)
            state = "connected" if done else deployment.state
            self.state.set_deployment(replace(deployment, connected=connected, state=state))

    # -- the planning loop ---------------------------------------------------------------

    def start(self) -> None:
        """Start planning in the background (plans once right away)."""
        self._changed.set()
        self._loop_task = asyncio.get_running_loop().create_task(self._planning_loop())

    async def close(self) -> None:
        """Stop planning."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    async def _planning_loop(self) -> None:
        while True:
            await self._changed.wait()
            # Settle: wait until nothing changed for settle_s, so a burst of joins is one plan.
            while True:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), self.settings.settle_s)
                except TimeoutError:
                    break
            try:
                await self.replan()
            except Exception as exc:  # the loop must outlive one bad plan; the error is shown as the plan's
                log.exception("planning failed")
                self._fail(self.state.get_deployment(), [], f"planning failed unexpectedly: {exc}")

    async def replan(self) -> Deployment:
        """Plan for the ready clients now; deliver the plan if it differs from the current one."""
        async with self._lock:
            current = self.state.get_deployment()
            ready = [c for c in self.state.list_clients() if c.status == ClientStatus.READY and not self._is_benched(c)]
            owners = [c.client_id for c in ready if c.info.has_data]
            if self.model is None or self.plan is None:
                return self._fail(current, ready, "no model is configured; set [model] path (or --model)")
            began = time.perf_counter()
            try:
                outcome = await asyncio.to_thread(self.plan, ready, owners)
            except PlanningError as exc:
                return self._fail(current, ready, str(exc))
            # How long planning took (profiles, cuts and the solve): a fact of the plan, and a metric.
            outcome = replace(outcome, summary={**outcome.summary, "plan_s": round(time.perf_counter() - began, 6)})
            if current is not None and self._still_valid(current, outcome):
                return current
            try:
                return await self._deliver(current, ready, outcome)
            except (OSError, ValueError, RuntimeError) as exc:
                log.exception("could not prepare the plan's weights")
                return self._fail(current, ready, f"preparing partition weights failed: {exc}")

    def _still_valid(self, current: Deployment, outcome: PlanOutcome) -> bool:
        if not current.plan_id or current.state in ("failed", "retired"):  # retired: a run trained on it
            return False
        if current.assignment() != tuple(plan_key(r) for r in outcome.rows):
            return False
        participants = {r.client_id for r in current.rows}
        return all(
            (c := self.state.get_client(p)) is not None and c.status == ClientStatus.READY for p in participants
        )

    def _fail(self, current: Deployment | None, ready: Sequence[ClientRecord], error: str) -> Deployment:
        if current is not None and current.plan_id:
            self._stop(current, reason=error)
        deployment = Deployment(
            generation=next(self._generations),
            plan_id="",
            created_at=time.time(),
            clients=tuple(c.client_id for c in ready),
            error=error,
            state="none",
        )
        self.state.set_deployment(deployment)
        log.info("no plan: %s", error)
        return deployment

    def _stop(self, deployment: Deployment, *, reason: str) -> None:
        for row_run, client_id in sorted({(r.run_id, r.client_id) for r in deployment.rows}):
            client = self.state.get_client(client_id)
            if client is not None and client.status in (ClientStatus.READY, ClientStatus.MEASURING):
                self.handler.send_command(client_id, StopRun(run_id=row_run, reason=reason))
        for run_id in deployment.run_ids():
            self.handler.weights.forget_run(run_id)
        self._tokens.clear()
        self._chain_tokens.clear()

    async def _deliver(self, current: Deployment | None, ready: Sequence[ClientRecord], outcome: PlanOutcome) -> Deployment:
        assert self.model is not None  # replan() checked
        generation = next(self._generations)
        plan_id = f"plan-{generation}"
        config_json = await asyncio.to_thread(self.model.config_json)
        named = [replace(r, run_id=f"{plan_id}-p{r.pipeline}") for r in outcome.rows]
        rows = await asyncio.to_thread(self._prepare_weights, named)
        if current is not None and current.plan_id:
            self._stop(current, reason=f"replaced by {plan_id}")
        owners = tuple(dict.fromkeys(r.owner_id for r in rows))
        self._tokens = {run_id: secrets.token_urlsafe(32) for run_id in {r.run_id for r in rows}}
        # Each host's own token per pipeline, shown to its neighbours on the chained path.
        self._chain_tokens = {(r.run_id, r.client_id): secrets.token_urlsafe(32) for r in rows if not r.local}
        deployment = Deployment(
            generation=generation,
            plan_id=plan_id,
            created_at=time.time(),
            rows=rows,
            owners=owners,
            clients=tuple(c.client_id for c in ready),
            summary=dict(outcome.summary),
            state="planned",
        )
        self.state.set_deployment(deployment)
        for run_id in deployment.run_ids():
            run_rows = [r for r in rows if r.run_id == run_id]
            owner = run_rows[0].owner_id
            digest = hashlib.sha256(self._tokens[run_id].encode()).hexdigest()
            for client_id in sorted({r.client_id for r in run_rows}):
                mine = [r for r in run_rows if r.client_id == client_id]
                serves = any(not r.local for r in mine)
                self.handler.send_command(
                    client_id,
                    HostRun(
                        run_id=run_id,
                        model_config=config_json,
                        partitions=tuple(_assignment(r, len(run_rows)) for r in mine),
                        allowed_peers=(
                            (AllowedPeer(client_id=owner, token_sha256=digest), *self._neighbour_digests(run_rows, client_id))
                            if serves
                            else ()
                        ),
                    ),
                )
        log.info("%s: %s", plan_id, ", ".join(f"{r.run_id}/s{r.partition}->{r.client_id}" for r in rows))
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_serving(plan_id))
        for run_id in deployment.run_ids():
            deployment = self._connect_owner_when_served(deployment, run_id)
        return deployment

    def _is_benched(self, client: ClientRecord) -> bool:
        return self._benched.get(client.client_id) == client.registered_at

    async def _watch_serving(self, plan_id: str) -> None:
        """After ``serve_timeout_s``, leave out the hosts of ``plan_id`` that do not serve yet, and replan."""
        await asyncio.sleep(self.settings.serve_timeout_s)
        deployment = self.state.get_deployment()
        if deployment is None or deployment.plan_id != plan_id or deployment.state not in ("planned", "serving"):
            return
        silent = sorted(
            {r.client_id for r in deployment.rows if not r.local and r.client_id not in deployment.bridge_urls.get(r.run_id, {})}
        )
        if not silent:
            return
        for client_id in silent:
            client = self.state.get_client(client_id)
            if client is not None:
                self._benched[client_id] = client.registered_at
        log.warning("%s: %s did not serve within %g s; planning without them", plan_id, ", ".join(silent),
                    self.settings.serve_timeout_s)  # fmt: skip
        self.state.set_deployment(replace(deployment, state="failed",
                                          error=f"{', '.join(silent)} did not serve within {self.settings.serve_timeout_s:g} s"))  # fmt: skip
        self._changed.set()

    def _prepare_weights(self, rows: Sequence[PlanRow]) -> tuple[PlanRow, ...]:
        """Write (or reuse) each partition's weights and let its client download them."""
        assert self.model is not None
        prepared = []
        for row in rows:
            num_stages = sum(1 for r in rows if r.run_id == row.run_id)
            key = (row.partition, num_stages, row.layer_start, row.layer_end)
            blob = self._stage_cache.get(key)
            if blob is None or not blob.exists():
                self.scratch_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=self.scratch_dir, suffix=".safetensors", delete=False) as tmp:
                    path = Path(tmp.name)
                self.model.write_stage(
                    index=row.partition,
                    num_stages=num_stages,
                    layer_start=row.layer_start,
                    layer_end=row.layer_end,
                    path=path,
                )
                stored = self.handler.weights.add(row.run_id, row.partition, path, clients=[row.client_id])
                self._stage_cache[key] = stored.path
            else:
                stored = self.handler.weights.stored_at(blob)
                self.handler.weights.alias(row.run_id, row.partition, stored, clients=[row.client_id])
            prepared.append(replace(row, weights_sha256=stored.sha256, weights_bytes=stored.size))
        return tuple(prepared)

    def _connect_owner_when_served(self, deployment: Deployment, run_id: str) -> Deployment:
        """Send the pipeline's owner its peers once every host of ``run_id`` serves."""
        rows = [r for r in deployment.rows if r.run_id == run_id]
        urls = deployment.bridge_urls.get(run_id, {})
        hosts = {r.client_id for r in rows if not r.local}
        if deployment.state not in ("planned", "serving") or not hosts <= set(urls) or run_id not in self._tokens:
            return deployment
        owner = rows[0].owner_id
        certs = deployment.bridge_certs.get(run_id, {})
        token = self._tokens[run_id]
        peers = tuple(
            PeerEndpoint(partition=r.partition, client_id=r.client_id, url=urls[r.client_id], token=token,
                         cert_pem=certs.get(r.client_id, ""))
            for r in rows
            if not r.local
        )  # fmt: skip
        for host in sorted(hosts):
            neighbours = self._neighbours(rows, host, urls, certs)
            self.handler.send_command(host, ChainPeers(run_id=run_id, peers=neighbours))
        self.handler.send_command(owner, ConnectPeers(run_id=run_id, peers=peers))
        del self._tokens[run_id]  # sent once; the owner keeps it from here
        served = all(
            {r.client_id for r in deployment.rows if r.run_id == other and not r.local}
            <= set(deployment.bridge_urls.get(other, {}))
            for other in deployment.run_ids()
        )
        updated = replace(deployment, state="serving" if served else deployment.state)
        self.state.set_deployment(updated)
        return updated


    def _neighbour_digests(self, run_rows: Sequence[PlanRow], client_id: str) -> tuple[AllowedPeer, ...]:
        """The hosts next to ``client_id``'s partitions in the pipeline, as peers it lets in."""
        return tuple(
            AllowedPeer(client_id=r.client_id, token_sha256=hashlib.sha256(token.encode()).hexdigest())
            for r in _neighbour_rows(run_rows, client_id)
            if (token := self._chain_tokens.get((r.run_id, r.client_id))) is not None
        )

    def _neighbours(
        self, run_rows: Sequence[PlanRow], client_id: str, urls: dict[str, str], certs: dict[str, str]
    ) -> tuple[PeerEndpoint, ...]:
        """Where ``client_id``'s neighbouring partitions are hosted (and their certificates), with ``client_id``'s own token."""
        token = self._chain_tokens.get((run_rows[0].run_id, client_id), "")
        return tuple(
            PeerEndpoint(partition=r.partition, client_id=r.client_id, url=urls[r.client_id], token=token,
                         cert_pem=certs.get(r.client_id, ""))
            for r in _neighbour_rows(run_rows, client_id)
        )  # fmt: skip


def _neighbour_rows(run_rows: Sequence[PlanRow], client_id: str) -> list[PlanRow]:
    """Rows of other hosts whose partition is next to one ``client_id`` serves."""
    served = {r.partition for r in run_rows if r.client_id == client_id and not r.local}
    return [
        r
        for r in run_rows
        if not r.local and r.client_id != client_id and ({r.partition - 1, r.partition + 1} & served)
    ]


def _assignment(row: PlanRow, num_stages: int) -> PartitionAssignment:
    return PartitionAssignment(
        index=row.partition,
        num_stages=num_stages,
        layer_start=row.layer_start,
        layer_end=row.layer_end,
        weights_sha256=row.weights_sha256,
        weights_bytes=row.weights_bytes,
        local=row.local,
    )
