"""Paired ``x_to_proto`` / ``x_from_proto`` functions: the only place the client touches protobuf.

A command the client cannot read (an unknown kind from a newer server) raises
:class:`~client.errors.ControlCallError` so the daemon reports it as failed instead of guessing.
"""

from __future__ import annotations

from proto import control_pb2 as pb

from .errors import ControlCallError
from .messages import (
    AllowedPeer,
    ClientInfo,
    Command,
    CommandBody,
    CommandState,
    ConnectPeers,
    DeviceProfile,
    HostRun,
    LoadPartitions,
    PartitionAssignment,
    PeerEndpoint,
    PrepareRun,
    RunState,
    RunStatus,
    Session,
    StatusReport,
    StopRun,
    Train,
    Upload,
    WeightHeader,
)

_RUN_STATES = {
    RunState.PREPARING: pb.RUN_STATE_PREPARING,
    RunState.READY: pb.RUN_STATE_READY,
    RunState.SERVING: pb.RUN_STATE_SERVING,
    RunState.CONNECTED: pb.RUN_STATE_CONNECTED,
    RunState.TRAINING: pb.RUN_STATE_TRAINING,
    RunState.FAILED: pb.RUN_STATE_FAILED,
    RunState.STOPPED: pb.RUN_STATE_STOPPED,
}
_COMMAND_STATES = {
    CommandState.ACCEPTED: pb.COMMAND_STATE_ACCEPTED,
    CommandState.DONE: pb.COMMAND_STATE_DONE,
    CommandState.FAILED: pb.COMMAND_STATE_FAILED,
}


def device_profile_to_proto(profile: DeviceProfile) -> pb.DeviceProfile:
    """This device's profile on its way to the server."""
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


def client_info_to_proto(info: ClientInfo) -> pb.ClientInfo:
    """Facts about this client."""
    return pb.ClientInfo(
        version=info.version,
        hostname=info.hostname,
        platform=info.platform,
        has_data=info.has_data,
        data_bytes=info.data_bytes,
        bridge_host=info.bridge_host,
    )


def register_request_to_proto(
    *,
    name: str,
    join_token: str | None,
    client_key: str | None,
    info: ClientInfo,
    profile: DeviceProfile,
) -> pb.RegisterRequest:
    """A registration with exactly one credential (the key wins when both are given)."""
    request = pb.RegisterRequest(
        name=name,
        info=client_info_to_proto(info),
        profile=device_profile_to_proto(profile),
        protocol_version=1,
    )
    if client_key is not None:
        request.client_key = client_key
    elif join_token is not None:
        request.join_token = join_token
    return request


def session_from_proto(msg: pb.RegisterReply) -> Session:
    """What the server granted."""
    return Session(
        client_id=msg.client_id,
        token=msg.session_token,
        heartbeat_interval_s=msg.heartbeat_interval_s,
        heartbeat_timeout_s=msg.heartbeat_timeout_s,
        max_chunk_bytes=msg.max_chunk_bytes,
        probe_max_seconds=msg.probe_max_seconds,
    )


def run_status_to_proto(run: RunStatus) -> pb.RunStatus:
    """This client's view of one run."""
    return pb.RunStatus(
        run_id=run.run_id,
        partitions=list(run.partitions),
        state=_RUN_STATES[run.state],
        bridge_url=run.bridge_url,
        message=run.message,
    )


def status_report_to_proto(report: StatusReport) -> pb.StatusReport:
    """Progress on one command."""
    msg = pb.StatusReport(command_id=report.command_id, state=_COMMAND_STATES[report.state], message=report.message)
    if report.run is not None:
        msg.run.CopyFrom(run_status_to_proto(report.run))
    return msg


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


def command_from_proto(msg: pb.Command) -> Command:
    """A command from the server."""
    kind = msg.WhichOneof("body")
    body: CommandBody
    if kind == "host":
        h = msg.host
        body = HostRun(
            run_id=h.run_id,
            model_config_json=h.model_config_json,
            partitions=tuple(_partition_from_proto(p) for p in h.partitions),
            allowed_peers=tuple(AllowedPeer(client_id=a.client_id, token_sha256=a.token_sha256) for a in h.allowed_peers),
        )
    elif kind == "connect":
        body = ConnectPeers(
            run_id=msg.connect.run_id,
            peers=tuple(
                PeerEndpoint(partition=p.partition, client_id=p.client_id, url=p.url, token=p.token)
                for p in msg.connect.peers
            ),
        )
    elif kind == "train":
        body = Train(run_id=msg.train.run_id, settings_json=msg.train.settings_json)
    elif kind == "upload":
        body = Upload(run_id=msg.upload.run_id, partitions=tuple(msg.upload.partitions), round=msg.upload.round)
    elif kind == "stop":
        body = StopRun(run_id=msg.stop.run_id, reason=msg.stop.reason)
    elif kind == "prepare":
        body = PrepareRun(run_id=msg.prepare.run_id, settings_json=msg.prepare.settings_json)
    elif kind == "load":
        body = LoadPartitions(
            run_id=msg.load.run_id,
            partitions=tuple(_partition_from_proto(p) for p in msg.load.partitions),
            round=msg.load.round,
        )
    else:
        raise ControlCallError(
            f"command {msg.command_id} is of a kind this client does not know; update the client",
            code="UNIMPLEMENTED",
        )
    return Command(command_id=msg.command_id, body=body)


def weight_header_from_proto(msg: pb.WeightChunk) -> WeightHeader:
    """The header that opens a weight stream."""
    if msg.WhichOneof("part") != "header":
        raise ControlCallError("the server's weight stream did not start with a header", code="DATA_LOSS")
    h = msg.header
    return WeightHeader(
        run_id=h.run_id,
        partition=h.partition,
        total_bytes=h.total_bytes,
        sha256=h.sha256,
        round=h.round,
        num_samples=h.num_samples,
    )


def weight_header_to_proto(header: WeightHeader) -> pb.WeightChunk:
    """The first message of an upload."""
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
