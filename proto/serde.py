"""Paired ``x_to_proto`` / ``x_from_proto`` functions: the only place protobuf meets the dataclasses.

Both the server and the client convert here, so a message is read and written one way.
A ``*_from_proto`` raises :class:`ProtocolError` for what the wire allows but the protocol
does not (an unknown enum value, a missing oneof, a command of a kind this side does not
know); each side turns it into its own error family at its edge. Range checks of the values
themselves belong to whoever uses them (the server's handler, the client's daemon).
"""

from __future__ import annotations

from proto import control_pb2 as pb

from .messages import (
    AllowedPeer,
    ChainPeers,
    ClientInfo,
    CodecSettings,
    Command,
    CommandBody,
    CommandState,
    ConnectPeers,
    DeviceProfile,
    Evaluation,
    HeadSettings,
    Heartbeat,
    HostRun,
    LoadPartitions,
    LoraSettings,
    PartitionAssignment,
    PeerBytes,
    PeerEndpoint,
    PrepareRun,
    ProbeResult,
    Registration,
    RoundProgress,
    RoundReport,
    RunState,
    RunStatus,
    Session,
    StatusReport,
    StepRecord,
    StopRun,
    Train,
    TrainedSlices,
    Upload,
    UploadReceipt,
    WeightHeader,
)


class ProtocolError(ValueError):
    """A message the wire carried but the protocol does not allow.

    ``code`` is the gRPC status name that fits it best (``INVALID_ARGUMENT`` by default).
    """

    def __init__(self, message: str, *, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code


_RUN_STATES = {
    RunState.PREPARING: pb.RUN_STATE_PREPARING,
    RunState.READY: pb.RUN_STATE_READY,
    RunState.SERVING: pb.RUN_STATE_SERVING,
    RunState.CONNECTED: pb.RUN_STATE_CONNECTED,
    RunState.TRAINING: pb.RUN_STATE_TRAINING,
    RunState.FAILED: pb.RUN_STATE_FAILED,
    RunState.STOPPED: pb.RUN_STATE_STOPPED,
}
_RUN_STATES_BACK = {v: k for k, v in _RUN_STATES.items()}
_COMMAND_STATES = {
    CommandState.ACCEPTED: pb.COMMAND_STATE_ACCEPTED,
    CommandState.DONE: pb.COMMAND_STATE_DONE,
    CommandState.FAILED: pb.COMMAND_STATE_FAILED,
}
_COMMAND_STATES_BACK = {v: k for k, v in _COMMAND_STATES.items()}


# ------------------------------------------------------------------------------ joining


def device_profile_to_proto(profile: DeviceProfile) -> pb.DeviceProfile:
    """A device's profile on the wire."""
    return pb.DeviceProfile(
        flops_per_s=profile.flops_per_s,
        memory_bytes=profile.memory_bytes,
        gpu_memory_bytes=profile.gpu_memory_bytes,
        device=profile.device,
        accelerator=profile.accelerator,
        upload_bytes_per_s=profile.upload_bytes_per_s,
        download_bytes_per_s=profile.download_bytes_per_s,
        rtt_s=profile.rtt_s,
        capacity=profile.capacity,
        declared=sorted(profile.declared),
        flops_method=profile.flops_method,
        max_micro_batch=profile.max_micro_batch,
    )


def device_profile_from_proto(msg: pb.DeviceProfile) -> DeviceProfile:
    """A client's reported profile."""
    return DeviceProfile(
        flops_per_s=msg.flops_per_s,
        memory_bytes=msg.memory_bytes,
        gpu_memory_bytes=msg.gpu_memory_bytes,
        device=msg.device or "cpu",
        accelerator=msg.accelerator,
        upload_bytes_per_s=msg.upload_bytes_per_s,
        download_bytes_per_s=msg.download_bytes_per_s,
        rtt_s=msg.rtt_s,
        capacity=msg.capacity,
        declared=frozenset(msg.declared),
        flops_method=msg.flops_method,
        max_micro_batch=msg.max_micro_batch,
    )


def client_info_to_proto(info: ClientInfo) -> pb.ClientInfo:
    """Facts about a client on the wire."""
    return pb.ClientInfo(
        version=info.version,
        hostname=info.hostname,
        platform=info.platform,
        has_data=info.has_data,
        data_bytes=info.data_bytes,
        bridge_host=info.bridge_host,
    )


def client_info_from_proto(msg: pb.ClientInfo) -> ClientInfo:
    """Facts a client sent about itself."""
    return ClientInfo(
        version=msg.version,
        hostname=msg.hostname,
        platform=msg.platform,
        has_data=msg.has_data,
        data_bytes=msg.data_bytes,
        bridge_host=msg.bridge_host,
    )


def registration_to_proto(registration: Registration) -> pb.RegisterRequest:
    """A join request with exactly one credential (the key wins when both are given)."""
    request = pb.RegisterRequest(
        name=registration.name,
        info=client_info_to_proto(registration.info),
        profile=device_profile_to_proto(registration.profile),
        protocol_version=registration.protocol_version,
    )
    if registration.client_key is not None:
        request.client_key = registration.client_key
    elif registration.join_token is not None:
        request.join_token = registration.join_token
    return request


def registration_from_proto(msg: pb.RegisterRequest, *, address: str = "") -> Registration:
    """A join request; ``address`` is the caller's address as the transport saw it."""
    credential = msg.WhichOneof("credential")
    return Registration(
        name=msg.name,
        join_token=msg.join_token if credential == "join_token" else None,
        client_key=msg.client_key if credential == "client_key" else None,
        info=client_info_from_proto(msg.info),
        profile=device_profile_from_proto(msg.profile),
        protocol_version=msg.protocol_version,
        address=address,
    )


def session_to_proto(session: Session) -> pb.RegisterReply:
    """What the client learns when it is let in."""
    return pb.RegisterReply(
        client_id=session.client_id,
        session_token=session.session_token,
        heartbeat_interval_s=session.heartbeat_interval_s,
        heartbeat_timeout_s=session.heartbeat_timeout_s,
        max_chunk_bytes=session.max_chunk_bytes,
        probe_max_seconds=session.probe_max_seconds,
    )


def session_from_proto(msg: pb.RegisterReply) -> Session:
    """What the server granted."""
    return Session(
        client_id=msg.client_id,
        session_token=msg.session_token,
        heartbeat_interval_s=msg.heartbeat_interval_s,
        heartbeat_timeout_s=msg.heartbeat_timeout_s,
        max_chunk_bytes=msg.max_chunk_bytes,
        probe_max_seconds=msg.probe_max_seconds,
    )


# ------------------------------------------------------------------------------ liveness


def run_status_to_proto(run: RunStatus) -> pb.RunStatus:
    """A client's view of one pipeline."""
    return pb.RunStatus(
        run_id=run.run_id,
        partitions=list(run.partitions),
        state=_RUN_STATES[run.state],
        bridge_url=run.bridge_url,
        message=run.message,
        bridge_cert_pem=run.bridge_cert_pem,
    )


def run_status_from_proto(msg: pb.RunStatus) -> RunStatus:
    """A client's view of one pipeline."""
    state = _RUN_STATES_BACK.get(msg.state)
    if state is None:
        raise ProtocolError(f"run {msg.run_id!r} has an unknown state {msg.state}")
    return RunStatus(
        run_id=msg.run_id,
        partitions=tuple(msg.partitions),
        state=state,
        bridge_url=msg.bridge_url,
        message=msg.message,
        bridge_cert_pem=msg.bridge_cert_pem,
    )


def heartbeat_to_proto(beat: Heartbeat) -> pb.HeartbeatRequest:
    """A heartbeat with the client's pipeline statuses."""
    return pb.HeartbeatRequest(
        runs=[run_status_to_proto(r) for r in beat.runs], free_memory_bytes=beat.free_memory_bytes
    )


def heartbeat_from_proto(msg: pb.HeartbeatRequest) -> Heartbeat:
    """A heartbeat with the client's pipeline statuses."""
    return Heartbeat(runs=tuple(run_status_from_proto(r) for r in msg.runs), free_memory_bytes=msg.free_memory_bytes)


def round_report_to_proto(report: RoundReport) -> pb.RoundReport:
    """An owner's round: every step and the evaluation."""
    ev = report.evaluation
    return pb.RoundReport(
        round=report.round,
        steps=[
            pb.StepRecord(
                loss=s.loss,
                tokens=s.tokens,
                seconds=s.seconds,
                peers=[pb.PeerBytes(stage=p.stage, sent=p.sent, received=p.received) for p in s.peers],
                lr=s.lr,
                grad_norm=s.grad_norm,
                output_norm=s.output_norm,
            )
            for s in report.steps
        ],
        evaluation=pb.Evaluation(loss=ev.loss, perplexity=ev.perplexity, tokens=ev.tokens),
        samples=report.samples,
        data_samples=report.data_samples,
        seconds=report.seconds,
        stage_seconds=list(report.stage_seconds),
        step_seconds=report.step_seconds,
    )


def round_report_from_proto(msg: pb.RoundReport) -> RoundReport:
    """An owner's round as it reported it (values unchecked: the receiver checks them)."""
    if not msg.HasField("evaluation"):
        raise ProtocolError(f"the report of round {msg.round} has no evaluation")
    ev = msg.evaluation
    return RoundReport(
        round=msg.round,
        steps=tuple(
            StepRecord(
                loss=s.loss,
                tokens=s.tokens,
                seconds=s.seconds,
                peers=tuple(PeerBytes(stage=p.stage, sent=p.sent, received=p.received) for p in s.peers),
                lr=s.lr,
                grad_norm=s.grad_norm,
                output_norm=s.output_norm,
            )
            for s in msg.steps
        ),
        evaluation=Evaluation(loss=ev.loss, perplexity=ev.perplexity, tokens=ev.tokens),
        samples=msg.samples,
        data_samples=msg.data_samples,
        seconds=msg.seconds,
        stage_seconds=tuple(msg.stage_seconds),
        step_seconds=msg.step_seconds,
    )


def status_report_to_proto(report: StatusReport) -> pb.StatusReport:
    """Progress on one command."""
    msg = pb.StatusReport(command_id=report.command_id, state=_COMMAND_STATES[report.state], message=report.message,
                          lost_peer=report.lost_peer)  # fmt: skip
    if report.run is not None:
        msg.run.CopyFrom(run_status_to_proto(report.run))
    if report.round_report is not None:
        msg.round_report.CopyFrom(round_report_to_proto(report.round_report))
    if report.progress is not None:
        p = report.progress
        msg.progress.CopyFrom(pb.RoundProgress(round=p.round, first_step=p.first_step, losses=list(p.losses),
                                               steps=p.steps, tokens=p.tokens, seconds=p.seconds))  # fmt: skip
    return msg


def status_report_from_proto(msg: pb.StatusReport) -> StatusReport:
    """Progress on one command."""
    state = _COMMAND_STATES_BACK.get(msg.state)
    if state is None:
        raise ProtocolError(f"status of command {msg.command_id} has an unknown state {msg.state}")
    return StatusReport(
        command_id=msg.command_id,
        state=state,
        message=msg.message,
        run=run_status_from_proto(msg.run) if msg.HasField("run") else None,
        round_report=round_report_from_proto(msg.round_report) if msg.HasField("round_report") else None,
        progress=_progress_from_proto(msg.progress) if msg.HasField("progress") else None,
        lost_peer=msg.lost_peer,
    )


def _progress_from_proto(msg: pb.RoundProgress) -> RoundProgress:
    return RoundProgress(round=msg.round, first_step=msg.first_step, losses=tuple(msg.losses), steps=msg.steps,
                         tokens=msg.tokens, seconds=msg.seconds)  # fmt: skip


# ------------------------------------------------------------------------------ commands


def _partition_to_proto(p: PartitionAssignment) -> pb.PartitionAssignment:
    return pb.PartitionAssignment(
        index=p.index,
        num_stages=p.num_stages,
        layer_start=p.layer_start,
        layer_end=p.layer_end,
        weights_sha256=p.weights_sha256,
        weights_bytes=p.weights_bytes,
        local=p.local,
    )


def _partition_from_proto(msg: pb.PartitionAssignment) -> PartitionAssignment:
    return PartitionAssignment(
        index=msg.index,
        num_stages=msg.num_stages,
        layer_start=msg.layer_start,
        layer_end=msg.layer_end,
        weights_sha256=msg.weights_sha256,
        weights_bytes=msg.weights_bytes,
        local=msg.local,
    )


_TRAIN_FIELDS = (
    "run_id", "round", "steps", "start", "batch_size", "seq_len", "micro_batches", "lr", "seed",
    "val_fraction", "eval_batch_size", "tokenizer", "method", "schedule", "warmup_steps", "total_steps",
    "min_lr", "clip_norm", "time_budget_s",
)  # fmt: skip


def _prepare_to_proto(body: PrepareRun) -> pb.PrepareRun:
    lora = pb.LoraSettings(r=body.lora.r, alpha=body.lora.alpha, targets=list(body.lora.targets))
    c = body.codec
    codec = pb.CodecSettings(name=c.name, values=c.values, scope=c.scope, error_feedback=c.error_feedback)
    h = body.heads
    heads = pb.HeadSettings(fraction=h.fraction, choice=h.choice, adapter=h.adapter, key=h.key, schedule=h.schedule)
    return pb.PrepareRun(
        run_id=body.run_id, finetune=body.finetune, optimizer=body.optimizer, lora=lora, seed=body.seed,
        codec=codec, method=body.method, heads=heads, method_options=dict(body.method_options),
        path=body.path, activation_compression=body.activation_compression,
    )  # fmt: skip


def _prepare_from_proto(msg: pb.PrepareRun) -> PrepareRun:
    lora = LoraSettings(r=msg.lora.r, alpha=msg.lora.alpha, targets=tuple(msg.lora.targets))
    c = msg.codec
    codec = CodecSettings(name=c.name, values=c.values, scope=c.scope, error_feedback=c.error_feedback)
    h = msg.heads
    heads = HeadSettings(fraction=h.fraction, choice=h.choice, adapter=h.adapter, key=h.key, schedule=h.schedule)
    return PrepareRun(
        run_id=msg.run_id, finetune=msg.finetune, optimizer=msg.optimizer, lora=lora, seed=msg.seed,
        codec=codec, method=msg.method, heads=heads, method_options=dict(msg.method_options),
        path=msg.path or "relay", activation_compression=msg.activation_compression or "none",
    )  # fmt: skip


def command_to_proto(command: Command) -> pb.Command:
    """A command on its way to a client."""
    body = command.body
    msg = pb.Command(command_id=command.command_id)
    if isinstance(body, HostRun):
        msg.host.CopyFrom(
            pb.HostRun(
                run_id=body.run_id,
                model_config=body.model_config.encode(),
                partitions=[_partition_to_proto(p) for p in body.partitions],
                allowed_peers=[
                    pb.AllowedPeer(client_id=a.client_id, token_sha256=a.token_sha256) for a in body.allowed_peers
                ],
            )
        )
    elif isinstance(body, ConnectPeers):
        peers = [_peer_to_proto(p) for p in body.peers]
        msg.connect.CopyFrom(pb.ConnectPeers(run_id=body.run_id, peers=peers))
    elif isinstance(body, ChainPeers):
        peers = [_peer_to_proto(p) for p in body.peers]
        msg.chain.CopyFrom(pb.ChainPeers(run_id=body.run_id, peers=peers))
    elif isinstance(body, Train):
        msg.train.CopyFrom(pb.Train(**{name: getattr(body, name) for name in _TRAIN_FIELDS}))
    elif isinstance(body, Upload):
        upload = pb.Upload(run_id=body.run_id, partitions=list(body.partitions), round=body.round, density=body.density,
                           optimizer_state=body.optimizer_state)  # fmt: skip
        msg.upload.CopyFrom(upload)
    elif isinstance(body, StopRun):
        msg.stop.CopyFrom(pb.StopRun(run_id=body.run_id, reason=body.reason))
    elif isinstance(body, PrepareRun):
        msg.prepare.CopyFrom(_prepare_to_proto(body))
    elif isinstance(body, LoadPartitions):
        partitions = [_partition_to_proto(p) for p in body.partitions]
        msg.load.CopyFrom(pb.LoadPartitions(run_id=body.run_id, partitions=partitions, round=body.round))
    else:  # pragma: no cover - the union above is exhaustive
        raise TypeError(f"not a command body: {type(body).__name__}")
    return msg


def _peer_to_proto(p: PeerEndpoint) -> pb.PeerEndpoint:
    return pb.PeerEndpoint(partition=p.partition, client_id=p.client_id, url=p.url, token=p.token, cert_pem=p.cert_pem)


def _peer_from_proto(p: pb.PeerEndpoint) -> PeerEndpoint:
    return PeerEndpoint(partition=p.partition, client_id=p.client_id, url=p.url, token=p.token, cert_pem=p.cert_pem)


def command_from_proto(msg: pb.Command) -> Command:
    """A command from the server."""
    kind = msg.WhichOneof("body")
    body: CommandBody
    if kind == "host":
        h = msg.host
        try:
            config = h.model_config.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"command {msg.command_id}: the model config is not UTF-8 text: {exc}") from exc
        body = HostRun(
            run_id=h.run_id,
            model_config=config,
            partitions=tuple(_partition_from_proto(p) for p in h.partitions),
            allowed_peers=tuple(AllowedPeer(client_id=a.client_id, token_sha256=a.token_sha256) for a in h.allowed_peers),
        )
    elif kind == "connect":
        peers = tuple(_peer_from_proto(p) for p in msg.connect.peers)
        body = ConnectPeers(run_id=msg.connect.run_id, peers=peers)
    elif kind == "chain":
        peers = tuple(_peer_from_proto(p) for p in msg.chain.peers)
        body = ChainPeers(run_id=msg.chain.run_id, peers=peers)
    elif kind == "train":
        body = Train(**{name: getattr(msg.train, name) for name in _TRAIN_FIELDS})
    elif kind == "upload":
        u = msg.upload
        body = Upload(run_id=u.run_id, partitions=tuple(u.partitions), round=u.round, density=u.density or 1.0,
                      optimizer_state=u.optimizer_state)  # fmt: skip
    elif kind == "stop":
        body = StopRun(run_id=msg.stop.run_id, reason=msg.stop.reason)
    elif kind == "prepare":
        body = _prepare_from_proto(msg.prepare)
    elif kind == "load":
        partitions = tuple(_partition_from_proto(p) for p in msg.load.partitions)
        body = LoadPartitions(run_id=msg.load.run_id, partitions=partitions, round=msg.load.round)
    else:
        raise ProtocolError(
            f"command {msg.command_id} is of a kind this client does not know; update the client", code="UNIMPLEMENTED"
        )
    return Command(command_id=msg.command_id, body=body)


# ------------------------------------------------------------------------------ data


def probe_result_to_proto(result: ProbeResult) -> pb.ProbeResult:
    """What the server saw of an upload probe."""
    return pb.ProbeResult(bytes=result.bytes, seconds=result.seconds)


def probe_result_from_proto(msg: pb.ProbeResult) -> ProbeResult:
    """What the server saw of an upload probe."""
    return ProbeResult(bytes=msg.bytes, seconds=msg.seconds)


def weight_header_to_proto(header: WeightHeader) -> pb.WeightChunk:
    """The first message of a weight stream."""
    return pb.WeightChunk(
        header=pb.WeightHeader(
            run_id=header.run_id,
            partition=header.partition,
            total_bytes=header.total_bytes,
            sha256=header.sha256,
            round=header.round,
            num_samples=header.num_samples,
            slices=[pb.TrainedSlices(tensor=t.tensor, dim=t.dim, width=t.width, blocks=list(t.blocks))
                    for t in header.slices],
        )
    )  # fmt: skip


def weight_header_from_proto(msg: pb.WeightChunk) -> WeightHeader:
    """The header that must open a weight stream."""
    if msg.WhichOneof("part") != "header":
        raise ProtocolError("a weight stream must start with a header message, not data", code="DATA_LOSS")
    h = msg.header
    return WeightHeader(
        run_id=h.run_id,
        partition=h.partition,
        total_bytes=h.total_bytes,
        sha256=h.sha256,
        round=h.round,
        num_samples=h.num_samples,
        slices=tuple(
            TrainedSlices(tensor=t.tensor, dim=t.dim, width=t.width, blocks=tuple(t.blocks)) for t in h.slices
        ),
    )


def weight_data_from_proto(msg: pb.WeightChunk) -> bytes:
    """The data of a chunk after the header."""
    if msg.WhichOneof("part") != "data":
        raise ProtocolError("a weight stream has one header, first; later messages carry data", code="DATA_LOSS")
    return msg.data


def upload_receipt_to_proto(receipt: UploadReceipt) -> pb.UploadReply:
    """The server's confirmation of a stored upload."""
    return pb.UploadReply(sha256=receipt.sha256, total_bytes=receipt.total_bytes)


def upload_receipt_from_proto(msg: pb.UploadReply) -> UploadReceipt:
    """The server's confirmation of a stored upload."""
    return UploadReceipt(sha256=msg.sha256, total_bytes=msg.total_bytes)
