"""The gRPC edge over a real loopback connection: status codes, chunking, TLS."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
import trustme

from client.channel import ControlChannel
from client.errors import RegistrationRefusedError, SessionEndedError, TlsVerificationError, WeightsError
from proto import control_pb2 as pb
from proto import control_pb2_grpc as pb_grpc
from proto.messages import ClientInfo, DeviceProfile, RunStatus
from server.config import TlsSettings
from server.control.servicer import SESSION_METADATA_KEY

from .support import JOIN_TOKEN, running_app, server_config

INFO = ClientInfo(version="t", hostname="h", platform="p", has_data=False, data_bytes=0, bridge_host="127.0.0.1")
PROFILE = DeviceProfile(flops_per_s=1e9, memory_bytes=1 << 30)


async def test_register_and_heartbeat_over_grpc(tmp_path: Path) -> None:
    """A client registers with the join token and its heartbeats are accepted."""
    async with running_app(server_config(tmp_path)) as app, ControlChannel(app.control_address) as channel:
        session = await channel.register(name="c1", join_token=JOIN_TOKEN, client_key=None, info=INFO, profile=PROFILE)
        interval = await channel.heartbeat([RunStatus(run_id="r1")], 123, timeout_s=5)
        assert session.client_id == "c1" and interval == pytest.approx(app.config.control.heartbeat_interval_s)
        assert app.state.get_client("c1").free_memory_bytes == 123  # type: ignore[union-attr]


async def test_wrong_token_is_unauthenticated(tmp_path: Path) -> None:
    """A wrong join token answers UNAUTHENTICATED with the reason, raised as RegistrationRefusedError."""
    async with running_app(server_config(tmp_path)) as app, ControlChannel(app.control_address) as channel:
        with pytest.raises(RegistrationRefusedError, match="join token is not valid"):
            await channel.register(name="c1", join_token="wrong-token", client_key=None, info=INFO, profile=PROFILE)
        stub = pb_grpc.ControlStub(channel._channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Register(pb.RegisterRequest(name="c1", join_token="wrong-token", protocol_version=1))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_call_without_session_is_unauthenticated(tmp_path: Path) -> None:
    """A call with a made-up session token is refused with UNAUTHENTICATED."""
    async with running_app(server_config(tmp_path)) as app, ControlChannel(app.control_address) as channel:
        stub = pb_grpc.ControlStub(channel._channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Ping(pb.PingRequest(nonce=1), metadata=((SESSION_METADATA_KEY, "made-up"),))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "register again" in (raised.value.details() or "")


async def test_session_ends_after_a_newer_registration(tmp_path: Path) -> None:
    """An old session's calls raise SessionEndedError once the name registered again."""
    async with (
        running_app(server_config(tmp_path)) as app,
        ControlChannel(app.control_address) as first,
        ControlChannel(app.control_address) as second,
    ):
        await first.register(name="c1", join_token=JOIN_TOKEN, client_key=None, info=INFO, profile=PROFILE)
        await second.register(name="c1", join_token=JOIN_TOKEN, client_key=None, info=INFO, profile=PROFILE)
        with pytest.raises(SessionEndedError):
            await first.heartbeat([], 0, timeout_s=5)


async def test_probes_measure_both_directions(tmp_path: Path) -> None:
    """Upload and download probes move bytes for about the asked time and report it."""
    async with running_app(server_config(tmp_path)) as app, ControlChannel(app.control_address) as channel:
        await channel.register(name="c1", join_token=JOIN_TOKEN, client_key=None, info=INFO, profile=PROFILE)
        up_bytes, up_s = await channel.probe_upload(0.3, 64 * 1024)
        down_bytes, down_s = await channel.probe_download(0.3, 64 * 1024)
        rtt = await channel.rtt(3)
    assert up_bytes > 0 and down_bytes > 0
    assert 0.1 < up_s < 2.0 and 0.1 < down_s < 2.0
    assert 0 < rtt < 0.5


async def test_partition_download_is_chunked_and_checked(tmp_path: Path) -> None:
    """A 2.5 MiB partition arrives in chunks of at most max_chunk_bytes with a matching sha256."""
    async with running_app(server_config(tmp_path / "server")) as app, ControlChannel(app.control_address) as channel:
        await channel.register(name="c1", join_token=JOIN_TOKEN, client_key=None, info=INFO, profile=PROFILE)
        data = bytes(range(256)) * (10 * 1024 + 3)
        source = tmp_path / "stage.safetensors"
        source.write_bytes(data)
        assert app.handler is not None
        app.handler.weights.add("r1", 1, source, clients=["c1"])
        dest = tmp_path / "got.safetensors"
        header = await channel.download_partition("r1", 1, dest)
    assert dest.read_bytes() == data
    assert header.sha256 == hashlib.sha256(data).hexdigest() and header.total_bytes == len(data)


async def test_damaged_partition_is_detected(tmp_path: Path) -> None:
    """Bytes that change on disk after hashing fail the client's check."""
    async with running_app(server_config(tmp_path / "server")) as app, ControlChannel(app.control_address) as channel:
        await channel.register(name="c1", join_token=JOIN_TOKEN, client_key=None, info=INFO, profile=PROFILE)
        source = tmp_path / "stage.safetensors"
        source.write_bytes(b"a" * 5000)
        assert app.handler is not None
        stored = app.handler.weights.add("r1", 0, source, clients=["c1"])
        stored.path.write_bytes(b"b" * 5000)  # same size, different bytes
        with pytest.raises(WeightsError, match="damaged"):
            await channel.download_partition("r1", 0, tmp_path / "got")


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


def tls_settings(tmp_path: Path, ca: trustme.CA) -> TlsSettings:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return TlsSettings(cert=cert_path, key=key_path)


async def test_tls_with_the_right_ca(tmp_path: Path, certificate_authority: trustme.CA) -> None:
    """A client given the CA that signed the server's certificate registers over TLS."""
    config = server_config(tmp_path, tls=tls_settings(tmp_path, certificate_authority))
    async with running_app(config) as app:
        async with ControlChannel(app.control_address, tls=True, ca_pem=certificate_authority.cert_pem.bytes()) as channel:
            session = await channel.register(name="c1", join_token=JOIN_TOKEN, client_key=None, info=INFO, profile=PROFILE)
        assert session.client_id == "c1"


async def test_tls_with_another_ca_is_refused(tmp_path: Path, certificate_authority: trustme.CA) -> None:
    """A client trusting a different CA refuses the server's certificate."""
    config = server_config(tmp_path, tls=tls_settings(tmp_path, certificate_authority))
    async with running_app(config) as app:
        async with ControlChannel(app.control_address, tls=True, ca_pem=trustme.CA().cert_pem.bytes()) as channel:
            with pytest.raises(TlsVerificationError, match="--ca"):
                await channel.register(name="c1", join_token=JOIN_TOKEN, client_key=None, info=INFO, profile=PROFILE)
        assert app.state.list_clients() == []
