"""Hosting a run's partitions: build the stages from checked weights, serve them to named peers.

The server names, per run, the peers a host must accept by the sha256 of a token it gave
each of them (the host never learns the tokens). A WebSocket handshake that presents no
token, or a token whose digest is not on the list, is refused before any frame is read.

:func:`start_stage_host` is the one place that starts the bridge's
:class:`~autograd_bridge.host.StageHost`; :func:`reach_peers` is the data owner's check that
every host it was given answers for the right run and stage.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proto.messages import AllowedPeer, PartitionAssignment, PeerEndpoint, RunState, RunStatus

from .errors import HostingError
from .tls import issue_host_certificate, peer_context, server_context

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServedStages:
    """A stage host listening for peers."""

    url: str  # wss://host:port peers connect to
    close: Callable[[], Awaitable[None]]  # stop listening and free the stages
    host: Any = None  # the StageHost serving them (its optimizer is rebuilt when LoRA is added)
    cert_pem: str = ""  # the certificate served at url (reported to the server, which vouches for it)


@dataclass(slots=True, kw_only=True)
class HostedRun:
    """Everything this client holds for one run."""

    run_id: str
    partitions: tuple[PartitionAssignment, ...]
    state: RunState = RunState.PREPARING
    message: str = ""
    stages: dict[int, Any] = field(default_factory=dict)  # partition -> StageModule
    served: ServedStages | None = None
    peers: tuple[PeerEndpoint, ...] = ()  # hosts this client (a data owner) reached
    optimizer: Any = None  # the optimizer of the stages this client runs itself (a data owner's ends)

    def status(self) -> RunStatus:
        """The run as reported to the server."""
        return RunStatus(
            run_id=self.run_id,
            partitions=tuple(p.index for p in self.partitions),
            state=self.state,
            bridge_url=self.served.url if self.served else "",
            message=self.message,
            bridge_cert_pem=self.served.cert_pem if self.served else "",
        )

    async def close(self) -> None:
        """Stop serving and drop the stages."""
        if self.served is not None:
            await self.served.close()
            self.served = None
        self.stages.clear()


def peer_authenticator(allowed: Sequence[AllowedPeer]) -> Callable[[str | None], bool]:
    """A check for the bridge's WebSocket handshake: only tokens whose sha256 the server listed."""
    digests = [bytes.fromhex(a.token_sha256) for a in allowed if len(a.token_sha256) == 64]

    def authenticate(token: str | None) -> bool:
        if not token:
            return False
        presented = hashlib.sha256(token.encode()).digest()
        # Compare against every digest, without stopping early, so timing says nothing.
        matches = [hmac.compare_digest(presented, d) for d in digests]
        return any(matches)

    return authenticate


def build_stages(
    config_json: str, partitions: Sequence[PartitionAssignment], files: Mapping[int, Path], workdir: Path
) -> dict[int, Any]:
    """Build each partition's stage from its own weight file (blocking; run it in a thread)."""
    from transformers import AutoConfig

    from autograd_bridge.partition import StageSpec, load_stage

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_json)
    try:
        config = AutoConfig.from_pretrained(workdir)
    except (OSError, ValueError, KeyError) as exc:
        raise HostingError(f"the server sent a model config this client cannot read: {exc}") from exc
    stages = {}
    for p in partitions:
        spec = StageSpec(index=p.index, num_stages=p.num_stages, layer_start=p.layer_start, layer_end=p.layer_end)
        try:
            stages[p.index] = load_stage(config, spec, [files[p.index]])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise HostingError(f"could not build partition {p.index}: {exc}") from exc
    return stages


async def start_stage_host(
    stages: Mapping[int, Any],
    *,
    run_id: str,
    allowed: Sequence[AllowedPeer],
    bind_host: str,
    port: int,
    public_host: str,
) -> ServedStages:
    """Serve ``stages`` for ``run_id`` over secure WebSockets to the peers in ``allowed`` only.

    The host serves ``wss://`` with a certificate made for ``public_host`` just now; peers trust
    it because the server passes it on with the URL (see :mod:`client.tls`).
    """
    from autograd_bridge.host import StageHost, serve_stage_host

    if not allowed:
        raise HostingError(f"run {run_id}: the server named no peers for the stages it asked this client to serve")
    certificate = issue_host_certificate(public_host)
    tls = server_context(certificate)
    host = StageHost(stages, run_id=run_id)
    try:
        server: Any = await serve_stage_host(host, bind_host, port, ssl=tls, authenticate=peer_authenticator(allowed))
    except OSError as exc:
        host.close()
        raise HostingError(f"could not listen for peers on {bind_host}:{port}: {exc}") from exc
    url = f"wss://{_url_host(public_host)}:{server.port}"

    async def close() -> None:
        await server.close()
        await host.aclose()

    log.info("run %s: serving stages %s at %s", run_id, sorted(stages), url)
    return ServedStages(url=url, close=close, host=host, cert_pem=certificate.cert_pem)


def _url_host(host: str) -> str:
    """``host`` as written in a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def chain_route(served: Mapping[int, Any], peers: Sequence[PeerEndpoint]) -> Any:
    """The bridge's ChainRoute of a host serving ``served`` from the server's neighbour list.

    A partition next to one served here goes to its host in ``peers``; one missing there (the
    owner's, or served here too) is not routed, and the bridge hands that result to the owner
    or to the next stage here.
    """
    from autograd_bridge.chain import ChainRoute, PeerAddress

    where = {p.partition: PeerAddress(url=p.url, token=p.token, ssl=peer_context(p.url, p.cert_pem)) for p in peers}
    nxt = {s: where[s + 1] for s in served if s + 1 in where and s + 1 not in served}
    prev = {s: where[s - 1] for s in served if s - 1 in where and s - 1 not in served}
    return ChainRoute(next=nxt, prev=prev)


async def reach_peers(run_id: str, peers: Sequence[PeerEndpoint], *, timeout_s: float = 30.0) -> None:
    """Connect to every peer with its token and check it serves the expected stage of ``run_id``."""
    from autograd_bridge.errors import BridgeError
    from autograd_bridge.remote import ClientSettings, StageClient

    settings = ClientSettings(timeout_s=timeout_s)
    for peer in peers:
        try:
            tls = peer_context(peer.url, peer.cert_pem)
            client = await StageClient.connect(
                peer.url, run_id=run_id, stage=peer.partition, token=peer.token, settings=settings, ssl=tls
            )
        except (BridgeError, OSError, HostingError) as exc:
            raise HostingError(
                f"could not reach the host of partition {peer.partition} ({peer.client_id} at {peer.url}): {exc}"
            ) from exc
        await client.close()
