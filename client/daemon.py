"""The client daemon: join, measure, stay alive, follow commands, and come back after outages.

One *session* is one registration: register (with the compute profile), then at the same
time send heartbeats, read the command stream, and measure the link and report the full
profile. A session ends when the server goes away or ends it; the daemon then waits with
exponential backoff and registers again. A new session starts from nothing: runs of an
earlier one are closed, because a server that forgot the session forgot its runs too.

Errors decide what happens next by their class (see :mod:`client.errors`): a refused
registration or an unverifiable certificate ends the daemon (``run`` raises it), an
unreachable server or an ended session reconnects, and a failed command is reported as failed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import platform
import random
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from autograd_bridge.codecs import decode_update
from autograd_bridge.errors import BridgeTimeoutError, PeerLostError
from proto.messages import (
    ChainPeers,
    ClientInfo,
    Command,
    CommandState,
    ConnectPeers,
    DeviceProfile,
    HostRun,
    LoadPartitions,
    PrepareRun,
    RoundProgress,
    RoundReport,
    RunState,
    RunStatus,
    Session,
    StatusReport,
    StepRecord,
    StopRun,
    Train,
    Upload,
    WeightHeader,
    file_sha256,
)

from . import __version__
from .channel import ControlChannel
from .config import ClientConfig
from .errors import ClientError, HostingError, PeerGoneError, ServerUnavailableError, SessionEndedError
from .hosting import HostedRun, build_stages, chain_route, reach_peers, start_stage_host
from .profiling import (
    ComputeMeasurement,
    LinkMeasurement,
    available_memory_bytes,
    compute_profile,
    link_declared,
    measure_compute,
    measure_link,
    training_device,
    with_link,
)
from .trainer import (
    OwnerTrainer,
    Preparation,
    Updates,
    build_owner_optimizer,
    check_train,
    load_trained_state,
    prepare_from_command,
    tie_owner_stages,
)
from .weights import fetch_partition

log = logging.getLogger(__name__)

_COMMAND_ID: contextvars.ContextVar[int] = contextvars.ContextVar("command_id")
_PROGRESS_EVERY_S = 0.5  # a training owner reports its new step losses at most this often

CommandResult = RunStatus | None | tuple[RunStatus, RoundReport]


def data_size(path: Path | None) -> int:
    """Bytes of the data at ``path`` (a file or a folder); 0 without data."""
    if path is None:
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class ClientDaemon:
    """Runs sessions against the server until stopped."""

    def __init__(self, config: ClientConfig, *, unit_random: Callable[[], float] = random.random) -> None:
        self.config = config
        self.runs: dict[str, HostedRun] = {}
        self.session: Session | None = None
        self.profile: DeviceProfile | None = None
        self._unit_random = unit_random
        self._attempt = 0
        self._seen: set[int] = set()
        self._host_tasks: dict[str, asyncio.Task[None]] = {}
        self._command_tasks: set[asyncio.Task[None]] = set()
        self._trainers: dict[str, OwnerTrainer] = {}  # run id -> its training pipeline (data owners only)
        self._prepared: dict[str, Preparation] = {}  # run id -> how its stages train (from PrepareRun)
        self._updates: dict[str, Updates] = {}  # run id -> what its partitions held when last loaded
        self._ca_pem = config.tls.ca.read_bytes() if config.tls.ca else None
        # One handler per command kind; each answers with the pipeline's status (Train: and its round report).
        self._handlers: dict[type, Callable[[ControlChannel, Any], Awaitable[CommandResult]]] = {
            HostRun: self._host,
            ConnectPeers: self._connect,
            ChainPeers: self._chain,
            PrepareRun: self._prepare,
            LoadPartitions: self._load,
            Train: self._train,
            Upload: self._upload,
            StopRun: self._stop_run,
        }

    # -- the outer loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set.

        Raises RegistrationRefusedError or TlsVerificationError when retrying cannot help.
        """
        compute = await asyncio.to_thread(self._measure_compute)
        base_profile = compute_profile(compute, self.config.declare, capacity=self.config.client.capacity)
        log.info("compute: %.3g FLOP/s (%s)", base_profile.flops_per_s, base_profile.flops_method)
        try:
            while not stop.is_set():
                try:
                    async with self._channel() as channel:
                        await self._session(channel, base_profile, stop)
                except (ServerUnavailableError, SessionEndedError) as exc:
                    delay = self.config.reconnect.delay(self._attempt, self._unit_random())
                    self._attempt += 1
                    log.warning("%s; reconnecting in %.1f s", exc, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
        finally:
            await self._close_runs()
        log.info("stopped")

    def _measure_compute(self) -> ComputeMeasurement:
        declared = self.config.declare.values()
        if "flops_per_s" in declared:
            device = training_device(self.config.profile)
            return ComputeMeasurement(
                flops_per_s=float(declared["flops_per_s"]), device=device, accelerator="", method="declared"
            )
        return measure_compute(self.config.profile)

    def _channel(self) -> ControlChannel:
        tls = self.config.tls
        return ControlChannel(
            self.config.client.server, tls=tls.active, ca_pem=self._ca_pem, server_name=tls.server_name
        )

    def _info(self) -> ClientInfo:
        data = self.config.client.data
        return ClientInfo(
            version=__version__,
            hostname=socket.gethostname(),
            platform=platform.platform(),
            has_data=data is not None,
            data_bytes=data_size(data),
            bridge_host=self.config.bridge.public_host,
        )

    # -- one session ---------------------------------------------------------------------

    async def _session(self, channel: ControlChannel, base_profile: DeviceProfile, stop: asyncio.Event) -> None:
        c = self.config.client
        session = await channel.register(
            name=c.name, join_token=c.token, client_key=c.key, info=self._info(), profile=base_profile
        )
        self.session = session
        self._attempt = 0
        log.info("registered as %s with %s", session.client_id, channel.target)
        await self._close_runs()  # a new session starts from nothing
        self._seen.clear()
        stopping = asyncio.ensure_future(stop.wait())
        workers = {
            asyncio.ensure_future(self._heartbeats(channel, session)),
            asyncio.ensure_future(self._follow_commands(channel)),
            asyncio.ensure_future(self._report_profile(channel, session, base_profile)),
        }
        try:
            while True:
                done, _ = await asyncio.wait({stopping, *workers}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    with contextlib.suppress(ClientError):
                        await channel.leave("shutting down")
                    return
                for task in done:
                    workers.discard(task)
                    task.result()  # a worker that failed ends the session with its error
        finally:
            for task in (stopping, *workers, *self._command_tasks):
                task.cancel()
            await asyncio.gather(stopping, *workers, *self._command_tasks, return_exceptions=True)
            self._command_tasks.clear()

    async def _report_profile(self, channel: ControlChannel, session: Session, base: DeviceProfile) -> None:
        declare = self.config.declare
        if link_declared(declare):
            nothing = LinkMeasurement(upload_bytes_per_s=0.0, download_bytes_per_s=0.0, rtt_s=0.0)
            profile = with_link(base, nothing, declare)  # every link field is declared and replaces these
        else:
            link = await measure_link(channel, self.config.profile, max_seconds=session.probe_max_seconds)
            profile = with_link(base, link, declare)
        self.profile = profile
        await channel.report_profile(profile)
        log.info(
            "profile reported: up %.3g MB/s, down %.3g MB/s, rtt %.2f ms",
            profile.upload_bytes_per_s / 1e6,
            profile.download_bytes_per_s / 1e6,
            profile.rtt_s * 1e3,
        )

    async def _heartbeats(self, channel: ControlChannel, session: Session) -> None:
        interval = session.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            runs = [r.status() for r in self.runs.values()]
            interval = await channel.heartbeat(runs, available_memory_bytes(), timeout_s=session.heartbeat_timeout_s)

    async def _follow_commands(self, channel: ControlChannel) -> None:
        async for command in channel.commands():
            if command.command_id in self._seen:
                continue
            self._seen.add(command.command_id)
            await channel.report_status(StatusReport(command_id=command.command_id, state=CommandState.ACCEPTED))
            self._spawn(self._execute(channel, command))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._command_tasks.add(task)
        task.add_done_callback(self._command_tasks.discard)
        return task

    # -- commands ------------------------------------------------------------------------

    async def _execute(self, channel: ControlChannel, command: Command) -> None:
        _COMMAND_ID.set(command.command_id)  # this task's command, for the progress a handler reports
        body = command.body
        try:
            handler = self._handlers.get(type(body))
            if handler is None:
                raise HostingError(f"unknown command {type(body).__name__}")
            result = await handler(channel, body)
            status, report_of_round = result if isinstance(result, tuple) else (result, None)
        except (ServerUnavailableError, SessionEndedError):
            return  # the session is ending; the next one starts over
        except Exception as exc:  # reported as FAILED: the server would otherwise wait for this command forever
            if isinstance(exc, ClientError | OSError):
                log.warning("command %d (%s) failed: %s", command.command_id, type(body).__name__, exc)
            else:
                log.exception("command %d (%s) failed unexpectedly", command.command_id, type(body).__name__)
            run = self.runs.get(body.run_id)
            if run is not None and not isinstance(body, StopRun):
                run.state, run.message = RunState.FAILED, str(exc)
            failed_run = run.status() if run is not None else None
            lost = exc.peer if isinstance(exc, PeerGoneError) else ""
            report = StatusReport(
                command_id=command.command_id, state=CommandState.FAILED, message=str(exc), run=failed_run, lost_peer=lost
            )
        else:
            report = StatusReport(
                command_id=command.command_id, state=CommandState.DONE, run=status, round_report=report_of_round
            )
        with contextlib.suppress(ServerUnavailableError, SessionEndedError):
            await channel.report_status(report)

    async def _host(self, channel: ControlChannel, cmd: HostRun) -> RunStatus:
        old = self.runs.pop(cmd.run_id, None)
        if old is not None:
            await old.close()
        run = HostedRun(run_id=cmd.run_id, partitions=cmd.partitions)
        self.runs[cmd.run_id] = run
        task = asyncio.current_task()
        assert task is not None  # internal: always called from a task
        self._host_tasks[cmd.run_id] = task  # type: ignore[assignment]
        try:
            cache = self.config.cache_dir
            files = {p.index: await fetch_partition(channel, cmd.run_id, p, cache) for p in cmd.partitions}
            workdir = cache / "runs" / cmd.run_id
            run.stages = await asyncio.to_thread(build_stages, cmd.model_config, cmd.partitions, files, workdir)
            tie_owner_stages({p.index: run.stages[p.index] for p in cmd.partitions if p.local})
            served = {p.index: run.stages[p.index] for p in cmd.partitions if not p.local}
            if served:
                bridge = self.config.bridge
                run.served = await start_stage_host(
                    served,
                    run_id=cmd.run_id,
                    allowed=cmd.allowed_peers,
                    bind_host=bridge.host,
                    port=bridge.port,
                    public_host=bridge.public_host,
                )
                run.state = RunState.SERVING
            else:
                run.state = RunState.READY
        finally:
            self._host_tasks.pop(cmd.run_id, None)
        return run.status()

    async def _connect(self, channel: ControlChannel, cmd: ConnectPeers) -> RunStatus:
        preparing = self._host_tasks.get(cmd.run_id)
        if preparing is not None:
            # The owner's own stages may still be loading; connecting is the step after that.
            await asyncio.wait({preparing})
        run = self.runs.get(cmd.run_id)
        if run is None:
            raise HostingError(f"run {cmd.run_id} is not known here; the server sent ConnectPeers before HostRun")
        if run.state == RunState.FAILED:
            raise HostingError(f"run {cmd.run_id} failed here before connecting: {run.message}")
        await reach_peers(cmd.run_id, cmd.peers)
        run.peers = cmd.peers
        run.state = RunState.CONNECTED
        log.info("run %s: reached %d peer(s)", cmd.run_id, len(cmd.peers))
        return run.status()

    async def _chain(self, channel: ControlChannel, cmd: ChainPeers) -> RunStatus:
        """Tell this client's stage host where the neighbouring partitions are (the chained path)."""
        preparing = self._host_tasks.get(cmd.run_id)
        if preparing is not None:
            await asyncio.wait({preparing})
        run = self.runs.get(cmd.run_id)
        if run is None or run.served is None or run.served.host is None:
            raise HostingError(f"run {cmd.run_id} is not served here; the server sent ChainPeers before HostRun")
        run.served.host.chain.set_route(chain_route(run.served.host.stages, cmd.peers))
        log.info("run %s: %d neighbouring host(s)", cmd.run_id, len(cmd.peers))
        return run.status()

    async def _upload(self, channel: ControlChannel, cmd: Upload) -> RunStatus:
        from autograd_bridge.partition import save_stage_weights

        run = self.runs.get(cmd.run_id)
        if run is None:
            raise HostingError(f"run {cmd.run_id} is not hosted here")
        chunk = self.session.max_chunk_bytes if self.session else 1 << 20
        updates = self._updates.get(cmd.run_id)
        if not (0 < cmd.density <= 1):
            raise HostingError(f"upload density must be in (0, 1], got {cmd.density!r}")
        for index in cmd.partitions:
            stage = run.stages.get(index)
            if stage is None:
                raise HostingError(f"partition {index} of run {cmd.run_id} is not hosted here")
            with tempfile.TemporaryDirectory(prefix="titanic-upload-") as tmp:
                path = Path(tmp) / "stage.safetensors"
                if updates is None:
                    await asyncio.to_thread(save_stage_weights, stage, path)
                else:  # a training run: what its finetune mode trains (or its change), in the run's codec
                    optimizer = self._optimizer_for(run, index)
                    data = await asyncio.to_thread(updates.encode, index, stage, optimizer, cmd)
                    await asyncio.to_thread(path.write_bytes, data)
                sha = await asyncio.to_thread(file_sha256, path)
                prepared = self._prepared.get(cmd.run_id)
                slices = tuple(prepared.finetune.trained_slices(stage).values()) if prepared is not None else ()
                header = WeightHeader(run_id=cmd.run_id, partition=index, total_bytes=path.stat().st_size, sha256=sha,
                                      round=cmd.round, slices=slices)  # fmt: skip
                await channel.upload_partition(header, path, chunk)
        prepared = self._prepared.get(cmd.run_id)
        if prepared is not None:  # the round is over here: what trains next (heads mode draws new heads)
            await asyncio.to_thread(prepared.finetune.begin_round, run.stages, cmd.round + 1)
        return run.status()

    async def _prepare(self, channel: ControlChannel, cmd: PrepareRun) -> RunStatus:
        """Set the run's stages up for training (LoRA adapters when asked) before its first round."""
        preparing = self._host_tasks.get(cmd.run_id)
        if preparing is not None:
            await asyncio.wait({preparing})
        run = self.runs.get(cmd.run_id)
        if run is None or run.state == RunState.FAILED:
            raise HostingError(f"run {cmd.run_id} is not hosted here; the server sent PrepareRun too early")
        prepared = prepare_from_command(cmd)
        earlier = self._prepared.get(cmd.run_id)
        if earlier is not None:
            if earlier.key != prepared.key:
                raise HostingError(f"run {cmd.run_id} was prepared differently before; replan to change it")
            if (earlier.path, earlier.compression) != (prepared.path, prepared.compression):
                # How activations travel may change between runs on one plan: rebuild the owner's pipeline.
                self._prepared[cmd.run_id] = replace(earlier, path=prepared.path, compression=prepared.compression)
                self._set_compression(run, prepared.compression)
                await self._close_trainer(cmd.run_id)
            return run.status()
        try:
            await asyncio.to_thread(prepared.finetune.prepare, run.stages, prepared.settings)
        except ValueError as exc:
            raise HostingError(str(exc)) from exc
        if run.served is not None and run.served.host is not None:
            # Over what the stages train now (the adapters, say), with the run's optimizer.
            run.served.host.reset_optimizer(prepared.optimizer)
        self._set_compression(run, prepared.compression)
        local = [run.stages[p.index] for p in run.partitions if p.local]
        run.optimizer = build_owner_optimizer(local, prepared.optimizer)  # before any Load, which may bring its state
        self._prepared[cmd.run_id] = prepared
        updates = self._updates[cmd.run_id] = Updates(prepared)
        for index, stage in run.stages.items():
            updates.mark_start(index, stage)
        return run.status()

    @staticmethod
    def _set_compression(run: HostedRun, compression: str) -> None:
        if run.served is not None and run.served.host is not None:
            run.served.host.set_compression(compression)

    def _optimizer_for(self, run: HostedRun, index: int) -> Any:
        """The optimizer that trains partition ``index`` here: the stage host's, or the owner's own."""
        host = run.served.host if run.served is not None else None
        if host is not None and index in host.stages:
            return host.optimizer
        return run.optimizer

    async def _load(self, channel: ControlChannel, cmd: LoadPartitions) -> RunStatus:
        """Replace the trained tensors of some partitions with the server's merged ones."""
        run = self.runs.get(cmd.run_id)
        prepared = self._prepared.get(cmd.run_id)
        if run is None or prepared is None:
            raise HostingError(f"run {cmd.run_id} is not prepared for training here")
        for p in cmd.partitions:
            stage = run.stages.get(p.index)
            if stage is None:
                raise HostingError(f"partition {p.index} of run {cmd.run_id} is not hosted here")
            path = await fetch_partition(channel, cmd.run_id, p, self.config.cache_dir / "merged")
            try:
                tensors = await asyncio.to_thread(decode_update, path.read_bytes())
            except ValueError as exc:
                raise HostingError(f"partition {p.index} of run {cmd.run_id}: {exc}") from exc
            optimizer = self._optimizer_for(run, p.index)
            await asyncio.to_thread(load_trained_state, stage, tensors, prepared.finetune, optimizer)
            self._updates[cmd.run_id].mark_start(p.index, stage)
        return run.status()

    async def _train(self, channel: ControlChannel, cmd: Train) -> tuple[RunStatus, RoundReport]:
        """Train one round through the run's pipeline; its report goes back with the status."""
        received = time.perf_counter()  # a time budget counts from here: setting the trainer up is part of the round
        data = self.config.client.data
        if data is None:
            raise HostingError("this client has no data to train on; start it with --data")
        run = self.runs.get(cmd.run_id)
        if run is None or run.state not in (RunState.CONNECTED, RunState.TRAINING):
            raise HostingError(f"run {cmd.run_id} is not connected here; the server sent Train too early")
        prepared = self._prepared.get(cmd.run_id)
        if prepared is None:  # PrepareRun builds the optimizer of the owner's stages
            raise HostingError(f"run {cmd.run_id} is not prepared for training here; the server sent Train before PrepareRun")
        settings = check_train(cmd)
        if settings.method != prepared.method.name:
            raise HostingError(f"run {cmd.run_id} was prepared for {prepared.method.name}, not {settings.method}")
        run.state = RunState.TRAINING
        try:
            trainer = self._trainers.get(cmd.run_id)
            if trainer is None:
                trainer = await asyncio.to_thread(
                    partial(OwnerTrainer, path=prepared.path, compression=prepared.compression),
                    cmd.run_id, run.stages, run.peers, data, settings, run.optimizer, prepared.method,
                )  # fmt: skip
                self._trainers[cmd.run_id] = trainer
            progress = _ProgressReporter(channel, _COMMAND_ID.get(), settings, asyncio.get_running_loop())
            report = await asyncio.to_thread(trainer.train_round, settings, progress.step_done, received=received)
            await progress.flush()
        except (PeerLostError, BridgeTimeoutError) as exc:
            raise _peer_gone(run, exc) from exc
        finally:
            if run.state == RunState.TRAINING:
                run.state = RunState.CONNECTED
        log.info("run %s round %d: val ppl %.3f", cmd.run_id, settings.round, report.evaluation.perplexity)
        return run.status(), report

    async def _close_trainer(self, run_id: str) -> None:
        trainer = self._trainers.pop(run_id, None)
        if trainer is not None:
            await asyncio.to_thread(trainer.close)

    async def _stop_run(self, channel: ControlChannel, cmd: StopRun) -> RunStatus:
        await self._close_trainer(cmd.run_id)
        self._prepared.pop(cmd.run_id, None)
        self._updates.pop(cmd.run_id, None)
        task = self._host_tasks.pop(cmd.run_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        run = self.runs.pop(cmd.run_id, None)
        if run is not None:
            await run.close()
        log.info("run %s stopped: %s", cmd.run_id, cmd.reason)
        return RunStatus(run_id=cmd.run_id, state=RunState.STOPPED, message=cmd.reason)

    async def _close_runs(self) -> None:
        for task in list(self._host_tasks.values()):
            task.cancel()
        self._host_tasks.clear()
        for run_id in list(self._trainers):
            await self._close_trainer(run_id)
        self._prepared.clear()
        self._updates.clear()
        runs, self.runs = self.runs, {}
        for run in runs.values():
            await run.close()


class _ProgressReporter:
    """Sends a Train command's step losses to the server while the round trains (from the training thread)."""

    def __init__(self, channel: ControlChannel, command_id: int, settings: Train, loop: asyncio.AbstractEventLoop) -> None:
        self.channel, self.command_id, self.settings, self.loop = channel, command_id, settings, loop
        self.began = time.perf_counter()
        self.last_sent = self.began
        self.pending: list[float] = []  # losses not reported yet
        self.first = 0  # the step of pending[0]
        self.tokens = 0
        self.sending: concurrent.futures.Future[None] | None = None

    def step_done(self, step: int, record: StepRecord) -> None:
        """Called after every step, on the training thread; sends at most every _PROGRESS_EVERY_S."""
        if not self.pending:
            self.first = step
        self.pending.append(record.loss)
        self.tokens += record.tokens
        now = time.perf_counter()
        if now - self.last_sent >= _PROGRESS_EVERY_S and (self.sending is None or self.sending.done()):
            self.last_sent = now
            self.sending = asyncio.run_coroutine_threadsafe(self._send(self._take()), self.loop)

    def _take(self) -> RoundProgress:
        s = self.settings
        progress = RoundProgress(round=s.round, first_step=self.first, losses=tuple(self.pending), steps=s.steps,
                                 tokens=self.tokens, seconds=time.perf_counter() - self.began)  # fmt: skip
        self.pending = []
        return progress

    async def _send(self, progress: RoundProgress) -> None:
        report = StatusReport(command_id=self.command_id, state=CommandState.ACCEPTED, progress=progress)
        with contextlib.suppress(ClientError):  # progress is a courtesy: the round report carries every step anyway
            await self.channel.report_status(report)

    async def flush(self) -> None:
        """Send what is left once the round is done, so the live curve is complete before the report arrives."""
        if self.sending is not None:
            await asyncio.wrap_future(self.sending)
        if self.pending:
            await self._send(self._take())


def _peer_gone(run: HostedRun, exc: PeerLostError | BridgeTimeoutError) -> PeerGoneError:
    """The failure of a Train whose stage host went away, naming that host's client."""
    names = {p.partition: p.client_id for p in run.peers}
    peer = names.get(exc.stage, "") if exc.stage is not None else ""
    what = "stopped answering" if isinstance(exc, BridgeTimeoutError) else "went away"
    who = f"{peer} (stage {exc.stage})" if peer else "a stage host"
    return PeerGoneError(f"{who} {what} during training of run {run.run_id}: {exc}", peer=peer)
