"""Paired ``x_from_proto`` / ``x_to_proto`` functions: the only place the server touches protobuf.

Functions that read a message from a client raise :class:`~server.errors.InvalidRequestError`
for what the wire allows but the protocol does not (an unknown enum value, a missing oneof).
Range checks of the values themselves belong to the handler.
"""

from __future__ import annotations

from proto import control_pb2 as pb

from .errors import InvalidRequestError
from .messages import (
    ClientInfo,
    Command,
    CommandState,
    ConnectPeers,
    DeviceProfile,
    Heartbeat,
    HostRun,
    LoadPartitions,
    PartitionAssignment,
    PrepareRun,
    ProbeResult,
    Registration,
    RegistrationResult,
    RunState,
    RunStatus,
    StatusReport,
    StopRun,
    Train,
    Upload,
    UploadReceipt,
    WeightHeader,
)

_RUN_STATES = {
    pb.RUN_STATE_PREPARING: RunState.PREPARING,
    pb.RUN_STATE_READY: RunState.READY,
    pb.RUN_STATE_SERVING: RunState.SERVING,
    pb.RUN_STATE_CONNECTED: RunState.CONNECTED,
    pb.RUN_STATE_TRAINING: RunState.TRAINING,
    pb.RUN_STATE_FAILED: RunState.FAILED,
    pb.RUN_STATE_STOPPED: RunState.STOPPED,
}
_COMMAND_STATES = {
    pb.COMMAND_STATE_ACCEPTED: CommandState.ACCEPTED,
    pb.COMMAND_STATE_DONE: CommandState.DONE,
    pb.COMMAND_STATE_FAILED: CommandState.FAILED,
}


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
    )


def device_profile_to_proto(profile: DeviceProfile) -> pb.DeviceProfile:
    """The inverse of :func:`device_profile_from_proto` (used by tests and tools)."""
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


def registration_result_to_proto(result: RegistrationResult) -> pb.RegisterReply:
    """What the client learns when it is let in."""
    return pb.RegisterReply(
        client_id=result.client_id,
        session_token=result.session_token,
        heartbeat_interval_s=result.heartbeat_interval_s,
        heartbeat_timeout_s=result.heartbeat_timeout_s,
        max_chunk_bytes=result.max_chunk_bytes,
        probe_max_seconds=result.probe_max_seconds,
    )


def run_status_from_proto(msg: pb.RunStatus) -> RunStatus:
    """A client's view of one run."""
    state = _RUN_STATES.get(msg.state)
    if state is None:
        raise InvalidRequestError(f"run {msg.run_id!r} has an unknown state {msg.state}")
    return RunStatus(
        run_id=msg.run_id,
        partitions=tuple(msg.partitions),
        state=state,
        bridge_url=msg.bridge_url,
        message=msg.message,
    )


def heartbeat_from_proto(msg: pb.HeartbeatRequest) -> Heartbeat:
    """A heartbeat with the client's run statuses."""
    return Heartbeat(
        runs=tuple(run_status_from_proto(r) for r in msg.runs),
        free_memory_bytes=msg.free_memory_bytes,
    )


def status_report_from_proto(msg: pb.StatusReport) -> StatusReport:
    """Progress on one command."""
    state = _COMMAND_STATES.get(msg.state)
    if state is None:
        raise InvalidRequestError(f"status of command {msg.command_id} has an unknown state {msg.state}")
    return StatusReport(
        command_id=msg.command_id,
        state=state,
        message=msg.message,
        run=run_status_from_proto(msg.run) if msg.HasField("run") else None,
    )


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


def command_to_proto(command: Command) -> pb.Command:
    """A command on its way to a client."""
    body = command.body
    msg = pb.Command(command_id=command.command_id)
    if isinstance(body, HostRun):
        msg.host.CopyFrom(
            pb.HostRun(
                run_id=body.run_id,
                model_config_json=body.model_config_json,
                partitions=[_partition_to_proto(p) for p in body.partitions],
                allowed_peers=[
                    pb.AllowedPeer(client_id=a.client_id, token_sha256=a.token_sha256)
                    for a in body.allowed_peers
                ],
            )
        )
    elif isinstance(body, ConnectPeers):
        msg.connect.CopyFrom(
            pb.ConnectPeers(
                run_id=body.run_id,
                peers=[
                    pb.PeerEndpoint(partition=p.partition, client_id=p.client_id, url=p.url, token=p.token)
                    for p in body.peers
                ],
            )
        )
    elif isinstance(body, Train):
        msg.train.CopyFrom(pb.Train(run_id=body.run_id, settings_json=body.settings_json))
    elif isinstance(body, Upload):
        msg.upload.CopyFrom(pb.Upload(run_id=body.run_id, partitions=list(body.partitions), round=body.round))
    elif isinstance(body, StopRun):
        msg.stop.CopyFrom(pb.StopRun(run_id=body.run_id, reason=body.reason))
    elif isinstance(body, PrepareRun):
        msg.prepare.CopyFrom(pb.PrepareRun(run_id=body.run_id, settings_json=body.settings_json))
    elif isinstance(body, LoadPartitions):
        msg.load.CopyFrom(
            pb.LoadPartitions(
                run_id=body.run_id, partitions=[_partition_to_proto(p) for p in body.partitions], round=body.round
            )
        )
    else:  # pragma: no cover - the union above is exhaustive
        raise TypeError(f"not a command body: {type(body).__name__}")
    return msg


def probe_result_to_proto(result: ProbeResult) -> pb.ProbeResult:
    """What the server saw of an upload probe."""
    return pb.ProbeResult(bytes=result.bytes, seconds=result.seconds)


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
        )
    )


def weight_header_from_proto(msg: pb.WeightChunk) -> WeightHeader:
    """The header that must open an upload stream."""
    if msg.WhichOneof("part") != "header":
        raise InvalidRequestError("an upload must start with a header message, not data")
    h = msg.header
    return WeightHeader(
        run_id=h.run_id,
        partition=h.partition,
        total_bytes=h.total_bytes,
        sha256=h.sha256,
        round=h.round,
        num_samples=h.num_samples,
    )


def weight_data_from_proto(msg: pb.WeightChunk) -> bytes:
    """The data of a chunk after the header."""
    if msg.WhichOneof("part") != "data":
        raise InvalidRequestError("an upload has one header, first; later messages carry data")
    return msg.data


def upload_receipt_to_proto(receipt: UploadReceipt) -> pb.UploadReply:
    """The server's confirmation of a stored upload."""
    return pb.UploadReply(sha256=receipt.sha256, total_bytes=receipt.total_bytes)
