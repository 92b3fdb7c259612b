"""Hosting stages for named peers only, over the bridge's real WebSocket transport."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from autograd_bridge.errors import PeerLostError
from client.errors import HostingError
from client.hosting import build_stages, peer_authenticator, reach_peers, start_stage_host
from client.tls import pinned_context
from proto.messages import AllowedPeer, PartitionAssignment, PeerEndpoint

OWNER_TOKEN = "token-the-server-gave-the-owner"


def allowed(*tokens: str) -> list[AllowedPeer]:
    return [AllowedPeer(client_id=f"peer{i}", token_sha256=hashlib.sha256(t.encode()).hexdigest()) for i, t in enumerate(tokens)]


def test_authenticator_accepts_only_listed_tokens() -> None:
    """Only a token whose digest the server listed passes; others and no token fail."""
    check = peer_authenticator(allowed(OWNER_TOKEN, "second-peer-token"))
    assert check(OWNER_TOKEN) and check("second-peer-token")
    assert not check("guessed-token") and not check(None) and not check("")


MIDDLE = PartitionAssignment(index=1, num_stages=3, layer_start=1, layer_end=3, weights_sha256="0" * 64, weights_bytes=0, local=False)


def test_stage_is_built_from_its_own_file(stage_files: tuple[str, dict[int, Path]], tmp_path: Path) -> None:
    """build_stages gives the middle stage with exactly its two blocks' parameters."""
    config_json, files = stage_files
    stages = build_stages(config_json, [MIDDLE], files, tmp_path)
    names = [name for name, _ in stages[1].named_model_parameters()]
    assert names and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in names)


async def test_only_the_named_peer_gets_in(stage_files: tuple[str, dict[int, Path]], tmp_path: Path) -> None:
    """The owner's token reaches the stage; no token and a wrong token are refused at the handshake."""
    from autograd_bridge.websocket import connect_websocket

    config_json, files = stage_files
    stages = build_stages(config_json, [MIDDLE], files, tmp_path)
    served = await start_stage_host(
        stages, run_id="plan-1-p0", allowed=allowed(OWNER_TOKEN), bind_host="127.0.0.1", port=0, public_host="127.0.0.1"
    )
    try:
        assert served.url.startswith("wss://127.0.0.1:")
        await reach_peers("plan-1-p0", [PeerEndpoint(partition=1, client_id="me", url=served.url, token=OWNER_TOKEN, cert_pem=served.cert_pem)])
        with pytest.raises(PeerLostError, match="401"):
            await connect_websocket(served.url, ssl=pinned_context(served.cert_pem))
        with pytest.raises(HostingError, match="403"):
            await reach_peers("plan-1-p0", [PeerEndpoint(partition=1, client_id="me", url=served.url, token="guessed-token", cert_pem=served.cert_pem)])
    finally:
        await served.close()


async def test_reaching_a_host_of_another_stage_fails(stage_files: tuple[str, dict[int, Path]], tmp_path: Path) -> None:
    """A host that serves a different stage than the peer expects is reported, not trusted."""
    config_json, files = stage_files
    stages = build_stages(config_json, [MIDDLE], files, tmp_path)
    served = await start_stage_host(
        stages, run_id="plan-1-p0", allowed=allowed(OWNER_TOKEN), bind_host="127.0.0.1", port=0, public_host="127.0.0.1"
    )
    try:
        with pytest.raises(HostingError, match="partition 2"):
            await reach_peers("plan-1-p0", [PeerEndpoint(partition=2, client_id="me", url=served.url, token=OWNER_TOKEN, cert_pem=served.cert_pem)])
    finally:
        await served.close()


async def test_serving_without_named_peers_is_refused(stage_files: tuple[str, dict[int, Path]], tmp_path: Path) -> None:
    """A host told to serve with nobody allowed refuses rather than serve everyone."""
    config_json, files = stage_files
    stages = build_stages(config_json, [MIDDLE], files, tmp_path)
    with pytest.raises(HostingError, match="no peers"):
        await start_stage_host(stages, run_id="r", allowed=[], bind_host="127.0.0.1", port=0, public_host="127.0.0.1")
