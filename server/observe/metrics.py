"""``GET /metrics`` of the admin API: the server in the Prometheus text format.

Nothing is counted as it happens: a collector reads the control state and the run records
when Prometheus scrapes, so ``/metrics`` says what the admin API's JSON says (run values come
from :meth:`RunRecord.to_json <server.training.store.RunRecord.to_json>`), a restarted server
that resumes a run counts its earlier rounds again, and each admin app has its own registry.

========================================  =======  ===========================================
titanic_clients                           gauge    clients by ``state`` (measuring, ready, lost, left)
titanic_client_heartbeat_age_seconds      gauge    seconds since a ``client``'s last call
titanic_client_bytes_total                counter  bytes a ``client`` uploaded to / downloaded from the
                                                   server in a ``run`` (``direction``)
titanic_run_state                         gauge    1 for the ``state`` a ``run`` is in, 0 for the others
titanic_run_rounds                        gauge    rounds a ``run`` trains
titanic_run_rounds_done_total             counter  rounds a ``run`` finished (merged and checkpointed)
titanic_run_steps_done_total              counter  steps the owners of a ``run`` trained
titanic_owner_round_steps                 gauge    steps of an ``owner``'s latest round in a ``run``
titanic_owner_round_steps_done            gauge    ... of them done
titanic_owner_loss                        gauge    ... the training loss of its last step
titanic_owner_tokens_per_second           gauge    ... its training rate
titanic_owner_eta_seconds                 gauge    ... seconds it has left at that rate
titanic_bridge_bytes_total                counter  bytes an ``owner``'s bridge moved to / from remote
                                                   ``stage`` in a ``run`` (``direction`` sent, received)
titanic_plan_generation                   gauge    plans made (and failures to plan) so far
titanic_plan_seconds                      gauge    how long making the current plan took
titanic_plan_solve_seconds                gauge    ... of which the assignment solver
========================================  =======  ===========================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from server.control.state import ClientStatus, ControlState
from server.training.rounds import Phase
from server.training.run_manager import RunManager

__all__ = ["ServerCollector", "metrics_handler", "metrics_registry"]


class ServerCollector(Collector):
    """Every ``titanic_`` metric, read from ``state`` and ``runs`` at each scrape."""

    def __init__(self, state: ControlState, runs: RunManager | None, *, clock: Callable[[], float]) -> None:
        self.state = state
        self.runs = runs
        self.clock = clock  # the clock clients' last_seen is on (the handler's)

    def collect(self) -> Iterator[Metric]:
        yield from self._clients()
        yield from self._plan()
        runs = [r.to_json() for r in self.runs.list_runs()] if self.runs is not None else []
        yield from _runs(runs)
        yield from _owners(runs)
        yield from _traffic(runs)

    def _clients(self) -> Iterator[Metric]:
        clients = self.state.list_clients()
        by_state = GaugeMetricFamily("titanic_clients", "Registered clients by state.", labels=["state"])
        counts = Counter(str(c.status) for c in clients)
        for status in ClientStatus:
            by_state.add_metric([str(status)], counts[str(status)])
        yield by_state
        age = GaugeMetricFamily(
            "titanic_client_heartbeat_age_seconds",
            "Seconds since the client's last call (heartbeat or any other); lost and departed clients too.",
            labels=["client"],
        )
        now = self.clock()
        for c in clients:
            age.add_metric([c.client_id], max(0.0, now - c.last_seen))
        yield age

    def _plan(self) -> Iterator[Metric]:
        deployment = self.state.get_deployment()
        yield GaugeMetricFamily(
            "titanic_plan_generation", "Plans the server made, and failures to plan, so far.",
            value=deployment.generation if deployment else 0,
        )  # fmt: skip
        summary = deployment.summary if deployment else {}
        if "plan_s" in summary:
            yield GaugeMetricFamily(
                "titanic_plan_seconds",
                "Seconds the current plan took to make: client profiles, the cuts and the solve (measured by the coordinator).",
                value=summary["plan_s"],
            )
        if "solve_ms" in summary:
            yield GaugeMetricFamily(
                "titanic_plan_solve_seconds", "Seconds the assignment solver took for the current plan.",
                value=summary["solve_ms"] / 1e3,
            )  # fmt: skip


def _runs(runs: list[dict[str, Any]]) -> Iterator[Metric]:
    state = GaugeMetricFamily("titanic_run_state", "1 for the state the run is in, 0 for the others.", labels=["run", "state"])
    rounds = GaugeMetricFamily("titanic_run_rounds", "Rounds the run trains.", labels=["run"])
    done = CounterMetricFamily(
        "titanic_run_rounds_done", "Rounds the run finished: merged and checkpointed.", labels=["run"]
    )
    steps = CounterMetricFamily(
        "titanic_run_steps_done",
        "Steps the run's owners trained: every step of their round reports, plus the steps of the rounds in progress.",
        labels=["run"],
    )
    for run in runs:
        run_id = run["run_id"]
        for phase in Phase:
            state.add_metric([run_id, str(phase)], 1.0 if run["state"] == str(phase) else 0.0)
        rounds.add_metric([run_id], run["rounds"])
        done.add_metric([run_id], len(run["checkpoints"]))
        steps.add_metric([run_id], steps_done(run))
    yield from (state, rounds, done, steps)


def steps_done(run: Mapping[str, Any]) -> int:
    """Steps a run's owners trained (its JSON): their reported rounds, and the rounds in progress.

    A finished round stays in ``live`` until the owner's next one starts; it counts once.
    """
    reported = {(h["round"], h["owner"]) for h in run["history"]}
    in_progress = sum(now["done"] for owner, now in run["live"].items() if (now["round"], owner) not in reported)
    return sum(len(h["losses"]) for h in run["history"]) + in_progress


def _owners(runs: list[dict[str, Any]]) -> Iterator[Metric]:
    labels = ["run", "owner"]
    gauges = {
        "steps": GaugeMetricFamily("titanic_owner_round_steps", "Steps of the owner's latest round.", labels=labels),
        "done": GaugeMetricFamily("titanic_owner_round_steps_done", "Steps of the owner's latest round done.", labels=labels),
        "loss": GaugeMetricFamily("titanic_owner_loss", "Training loss of the owner's latest step.", labels=labels),
        "tokens_per_s": GaugeMetricFamily(
            "titanic_owner_tokens_per_second", "Target tokens per second of the owner's latest round.", labels=labels
        ),
        "eta_s": GaugeMetricFamily(
            "titanic_owner_eta_seconds", "Seconds the owner's round has left at its rate (absent before its first step).",
            labels=labels,
        ),
    }  # fmt: skip
    for run in runs:
        for owner, now in sorted(run["live"].items()):
            values = {**now, "loss": now["losses"][-1] if now["losses"] else None}
            for key, gauge in gauges.items():
                if values[key] is not None:
                    gauge.add_metric([run["run_id"], owner], values[key])
    yield from gauges.values()


def _traffic(runs: list[dict[str, Any]]) -> Iterator[Metric]:
    moved = CounterMetricFamily(
        "titanic_client_bytes",
        "Bytes a client uploaded to the server (direction=uploaded: its trained partitions) or downloaded "
        "from it (downloaded: merged partitions), encoded as they crossed the network, over the run's rounds.",
        labels=["run", "client", "direction"],
    )
    bridge = CounterMetricFamily(
        "titanic_bridge_bytes",
        "Bytes the owner's autograd bridge sent to (direction=sent) or received from (received) a remote stage: "
        "boundary tensors, forward and backward, over the rounds the owner reported. The server sees the owners' "
        "round reports only, not bridge frames or their errors: a bridge error fails the run (titanic_run_state).",
        labels=["run", "owner", "stage", "direction"],
    )
    for run in runs:
        totals: Counter[tuple[str, str]] = Counter()
        for row in run["traffic"]:
            for direction in ("uploaded", "downloaded"):
                totals[(row["client"], direction)] += row[direction]
        for (client, direction), size in sorted(totals.items()):
            moved.add_metric([run["run_id"], client, direction], size)
        sizes: Counter[tuple[str, str, str]] = Counter()
        for h in run["history"]:
            for direction, key in (("sent", "bytes_sent"), ("received", "bytes_received")):
                for stage, size in h[key].items():
                    sizes[(h["owner"], stage, direction)] += size
        for (owner, stage, direction), size in sorted(sizes.items()):
            bridge.add_metric([run["run_id"], owner, stage, direction], size)
    yield from (moved, bridge)


def metrics_registry(state: ControlState, runs: RunManager | None, *, clock: Callable[[], float]) -> CollectorRegistry:
    """A registry of its own holding one :class:`ServerCollector`."""
    registry = CollectorRegistry()
    registry.register(ServerCollector(state, runs, clock=clock))
    return registry


def metrics_handler(registry: CollectorRegistry) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler of ``GET /metrics``: ``registry`` in the format the scraper accepts (text or OpenMetrics)."""

    async def metrics(request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(registry), headers={"Content-Type": content_type})

    return metrics
