"""TLS between a stage host and its peers: each peer trusts exactly the certificate the server vouched for.

Real TLS over loopback: a daemon-style stage host serves wss:// with a certificate made for
its advertised address; a peer holding that certificate gets in, a peer given any other
certificate (another host's, or one for another name) is refused during the handshake.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import pytest

from autograd_bridge.errors import PeerLostError
from autograd_bridge.websocket import WebSocketConnection, connect_websocket, serve_websocket
from client.errors import HostingError
from client.hosting import build_stages, reach_peers, start_stage_host
from client.tls import issue_host_certificate, peer_context, pinned_context, server_context
from proto.messages import AllowedPeer, PeerEndpoint
from tests.client.test_hosting import MIDDLE

TOKEN = "owner-token"
RUN = "plan-1-p0"


def peer(url: str, cert_pem: str) -> PeerEndpoint:
    return PeerEndpoint(partition=1, client_id="host", url=url, token=TOKEN, cert_pem=cert_pem)


async def test_only_the_vouched_certificate_is_trusted(
    stage_files: tuple[str, dict[int, Path]], tmp_path: Path
) -> None:
    """The host's own certificate gets the owner in; another self-signed one for the same address is refused."""
    config_json, files = stage_files
    stages = build_stages(config_json, [MIDDLE], files, tmp_path)
    allowed = [AllowedPeer(client_id="owner", token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest())]
    served = await start_stage_host(
        stages, run_id=RUN, allowed=allowed, bind_host="127.0.0.1", port=0, public_host="127.0.0.1"
    )
    try:
        assert served.url.startswith("wss://") and "BEGIN CERTIFICATE" in served.cert_pem
        await reach_peers(RUN, [peer(served.url, served.cert_pem)])
        # Same name, different key: what another machine at that address would show.
        impostor = issue_host_certificate("127.0.0.1")
        with pytest.raises(HostingError, match="certificate"):
            await reach_peers(RUN, [peer(served.url, impostor.cert_pem)])
        with pytest.raises(HostingError, match="no usable certificate"):  # wss:// with nothing vouched for
            await reach_peers(RUN, [peer(served.url, "")])
        with pytest.raises(PeerLostError):  # plain ws:// to a TLS port does not get through
            await connect_websocket(served.url.replace("wss://", "ws://"), token=TOKEN)
    finally:
        await served.close()


async def test_an_owner_refuses_a_peer_that_serves_plain_ws(
    stage_files: tuple[str, dict[int, Path]], tmp_path: Path
) -> None:
    """A live host on plain ws:// serving the right stage and taking the token is still not reached."""
    from autograd_bridge.host import StageHost, serve_stage_host
    from client.hosting import peer_authenticator

    config_json, files = stage_files
    host = StageHost(build_stages(config_json, [MIDDLE], files, tmp_path), run_id=RUN)
    allowed = [AllowedPeer(client_id="owner", token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest())]
    server = await serve_stage_host(host, "127.0.0.1", 0, authenticate=peer_authenticator(allowed))
    try:
        plain = f"ws://127.0.0.1:{server.port}"
        await (await connect_websocket(plain, token=TOKEN)).close()  # reachable: only TLS is missing
        with pytest.raises(HostingError, match="does not serve TLS"):
            await reach_peers(RUN, [peer(plain, issue_host_certificate("127.0.0.1").cert_pem)])
    finally:
        await server.close()
        host.close()


async def test_a_host_showing_a_certificate_for_another_name_is_refused() -> None:
    """The vouched-for certificate itself, served from an address not in its SAN, fails the hostname check."""
    elsewhere = issue_host_certificate("10.11.12.13")

    async def handler(conn: WebSocketConnection) -> None:
        return None

    server = await serve_websocket(handler, "127.0.0.1", 0, ssl=server_context(elsewhere))
    try:
        url = f"wss://127.0.0.1:{server.port}"
        with pytest.raises(PeerLostError, match="not accepted"):
            await connect_websocket(url, ssl=pinned_context(elsewhere.cert_pem))
        local = issue_host_certificate("localhost")  # a DNS name goes in a DNS SAN
        assert "BEGIN CERTIFICATE" in local.cert_pem
    finally:
        await server.close()


def test_peer_context_pins_wss_only() -> None:
    """wss:// gets a context that requires and checks the certificate; ws:// (no TLS) and junk are refused."""
    cert = issue_host_certificate("127.0.0.1")
    context = peer_context("wss://127.0.0.1:1", cert.cert_pem)
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    with pytest.raises(HostingError, match="does not serve TLS"):
        peer_context("ws://127.0.0.1:1", cert.cert_pem)
    with pytest.raises(HostingError, match="cannot be read"):
        pinned_context("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
