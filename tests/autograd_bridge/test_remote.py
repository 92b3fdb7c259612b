"""The stage client over real WebSockets: TLS, tokens, and compressed activations."""

from __future__ import annotations

import ssl

import pytest
import torch
import trustme

from autograd_bridge.errors import PeerLostError
from autograd_bridge.host import HostSettings, StageHost, serve_stage_host
from autograd_bridge.partition import even_stage_specs, split_model
from autograd_bridge.pipeline import Pipeline
from autograd_bridge.remote import ClientSettings, StageClient

from .bridge_helpers import grads_by_name, memory_split
from .conftest import padded_batch

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def middle(load_tiny):
    model = load_tiny("llama")
    return split_model(model, even_stage_specs(model.config.num_hidden_layers, 3))[1]


async def test_stage_over_wss_with_a_ca_and_a_token(middle):
    """A host served over TLS answers a client that trusts its CA and presents the run token."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    host = StageHost({1: middle}, run_id="r")
    server = await serve_stage_host(host, ssl=server_ctx, authenticate=lambda t: t == "tok")
    try:
        url = server.url
        assert url.startswith("wss://")
        client = await StageClient.connect(url, run_id="r", stage=1, ssl=client_ctx, token="tok")
        x = torch.randn(2, 5, middle.config.hidden_size)
        y = await client.forward(x, step=0, micro_batch=0)
        assert torch.allclose(y, middle(x), atol=1e-6)
        await client.close()
        with pytest.raises(PeerLostError):
            await StageClient.connect(url, run_id="r", stage=1, token="tok")  # no CA: refused
    finally:
        await server.close()
        host.close()


@pytest.mark.parametrize(("compression", "loss_tol", "grad_tol"), [("fp16", 1e-4, 5e-3), ("int8", 1e-3, 0.1)])
def test_compressed_activations_and_gradients_stay_within_a_bounded_error(
    load_tiny, compression, loss_tol, grad_tol
):
    """With fp16/int8 compression both ways, loss and gradients stay close to the exact ones."""
    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    exact = memory_split(model, 4)
    try:
        pipeline = Pipeline(exact.chain(), exact.runtime)
        want_loss = pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels).loss
        want = grads_by_name(exact.stages)
        pipeline.close()
    finally:
        exact.close()
    lossy = memory_split(
        model, 4,
        host_settings=HostSettings(compression=compression),
        client_settings=ClientSettings(compression=compression),
    )  # fmt: skip
    try:
        pipeline = Pipeline(lossy.chain(), lossy.runtime)
        got_loss = pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels).loss
        got = grads_by_name(lossy.stages)
        pipeline.close()
    finally:
        lossy.close()
    # Measured: fp16 moves the loss by ~1e-5 and gradients by ~7e-4 (relative norm); int8 by
    # ~2e-5 and ~2e-2. Zero would mean the setting did nothing.
    assert abs(got_loss - want_loss) < loss_tol
    worst = max(float((got[n] - g).norm() / (g.norm() + 1e-12)) for n, g in want.items())
    assert 0 < worst < grad_tol, worst
