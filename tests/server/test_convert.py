"""Conversions at the gRPC edge: what the server writes, the client reads back equal, and vice versa."""

from __future__ import annotations

import pytest

from client import convert as client_convert
from client import messages as cm
from proto import control_pb2 as pb
from server import convert
from server import messages as sm
from server.errors import InvalidRequestError


def wire(message: pb.Command) -> pb.Command:
    """A message after a trip through its serialized bytes."""
    return pb.Command.FromString(message.SerializeToString())


def test_host_command_reaches_client_intact() -> None:
    """Every field of a HostRun survives server -> wire -> client."""
    body = sm.HostRun(
        run_id="plan-1-p0",
        model_config_json='{"model_type": "llama"}',
        partitions=(
            sm.PartitionAssignment(index=1, num_stages=3, layer_start=1, layer_end=3, weights_sha256="ab" * 32, weights_bytes=123, local=False),
        ),
        allowed_peers=(sm.AllowedPeer(client_id="owner", token_sha256="cd" * 32),),
    )
    got = client_convert.command_from_proto(wire(convert.command_to_proto(sm.Command(command_id=9, body=body))))
    assert got == cm.Command(
        command_id=9,
        body=cm.HostRun(
            run_id="plan-1-p0",
            model_config_json='{"model_type": "llama"}',
            partitions=(cm.PartitionAssignment(index=1, num_stages=3, layer_start=1, layer_end=3, weights_sha256="ab" * 32, weights_bytes=123, local=False),),
            allowed_peers=(cm.AllowedPeer(client_id="owner", token_sha256="cd" * 32),),
        ),
    )


@pytest.mark.parametrize(
    ("server_body", "client_body"),
    [
        (
            sm.ConnectPeers(run_id="r", peers=(sm.PeerEndpoint(partition=1, client_id="h", url="ws://x:1", token="t"),)),
            cm.ConnectPeers(run_id="r", peers=(cm.PeerEndpoint(partition=1, client_id="h", url="ws://x:1", token="t"),)),
        ),
        (sm.Train(run_id="r", settings_json='{"lr": 1}'), cm.Train(run_id="r", settings_json='{"lr": 1}')),
        (sm.Upload(run_id="r", partitions=(1, 2), round=4), cm.Upload(run_id="r", partitions=(1, 2), round=4)),
        (sm.StopRun(run_id="r", reason="replaced"), cm.StopRun(run_id="r", reason="replaced")),
    ],
)
def test_other_commands_reach_client_intact(server_body: sm.CommandBody, client_body: cm.CommandBody) -> None:
    """ConnectPeers, Train, Upload and StopRun survive the trip."""
    got = client_convert.command_from_proto(wire(convert.command_to_proto(sm.Command(command_id=1, body=server_body))))
    assert got.body == client_body


def test_command_of_unknown_kind_is_an_error_on_the_client() -> None:
    """A command with no body (a kind from a newer server) is refused, not guessed."""
    from client.errors import ControlCallError

    with pytest.raises(ControlCallError, match="does not know"):
        client_convert.command_from_proto(pb.Command(command_id=3))


def test_registration_reaches_server_intact() -> None:
    """A client's registration arrives with its credential, info and declared fields."""
    profile = cm.DeviceProfile(flops_per_s=2e9, memory_bytes=5, upload_bytes_per_s=7.0, declared=frozenset({"upload_bytes_per_s"}))
    info = cm.ClientInfo(version="1", hostname="h", platform="p", has_data=True, data_bytes=10, bridge_host="10.0.0.2")
    request = client_convert.register_request_to_proto(name="c1", join_token="tok", client_key=None, info=info, profile=profile)
    got = convert.registration_from_proto(pb.RegisterRequest.FromString(request.SerializeToString()), address="ipv4:x")
    assert got.join_token == "tok" and got.client_key is None
    assert got.info == sm.ClientInfo(version="1", hostname="h", platform="p", has_data=True, data_bytes=10, bridge_host="10.0.0.2")
    assert got.profile.declared == frozenset({"upload_bytes_per_s"}) and got.profile.upload_bytes_per_s == 7.0


def test_status_report_reaches_server_intact() -> None:
    """A status report with a run arrives equal on the server."""
    report = cm.StatusReport(
        command_id=5,
        state=cm.CommandState.DONE,
        message="ok",
        run=cm.RunStatus(run_id="r", partitions=(1,), state=cm.RunState.SERVING, bridge_url="ws://h:2"),
    )
    msg = pb.StatusReport.FromString(client_convert.status_report_to_proto(report).SerializeToString())
    got = convert.status_report_from_proto(msg)
    assert got == sm.StatusReport(
        command_id=5,
        state=sm.CommandState.DONE,
        message="ok",
        run=sm.RunStatus(run_id="r", partitions=(1,), state=sm.RunState.SERVING, bridge_url="ws://h:2"),
    )


def test_unknown_states_are_invalid_requests() -> None:
    """Enum values the server does not know are refused."""
    with pytest.raises(InvalidRequestError):
        convert.status_report_from_proto(pb.StatusReport(command_id=1, state=99))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        convert.run_status_from_proto(pb.RunStatus(run_id="r", state=pb.RUN_STATE_UNSPECIFIED))


def test_upload_must_start_with_header() -> None:
    """A data chunk where the header belongs is an invalid request."""
    with pytest.raises(InvalidRequestError, match="header"):
        convert.weight_header_from_proto(pb.WeightChunk(data=b"x"))
    with pytest.raises(InvalidRequestError):
        convert.weight_data_from_proto(pb.WeightChunk(header=pb.WeightHeader(run_id="r")))
