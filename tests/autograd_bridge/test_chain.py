"""The chained path: hosts hand activations and gradients to each other over real WebSockets."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest
import torch

from autograd_bridge.chain import ChainRoute, PeerAddress
from autograd_bridge.errors import BridgeError, PeerLostError, RemoteStageError
from autograd_bridge.host import StageHost, serve_stage_host
from autograd_bridge.partition import StageModule, even_stage_specs, save_stage_weights, split_model
from autograd_bridge.paths import ChainPath
from autograd_bridge.pipeline import Pipeline, PipelineSettings
from autograd_bridge.remote import ClientSettings, StageClient
from autograd_bridge.runtime import EventLoopThread
from autograd_bridge.serve import StageHostProcess

from .bridge_helpers import grads_by_name
from .conftest import padded_batch

pytestmark = pytest.mark.usefixtures("single_thread")

OWNER_TOKEN = "owner-token"


def _token(i: int) -> str:
    return f"host-{i}-token"


@dataclass
class ChainSplit:
    """A U-shaped split whose middle stages are StageHosts on loopback, chained to each other."""

    runtime: EventLoopThread
    stages: list[StageModule]
    hosts: dict[int, StageHost] = field(default_factory=dict)
    servers: dict[int, object] = field(default_factory=dict)
    clients: dict[int, StageClient] = field(default_factory=dict)

    def chain(self) -> list[StageModule | StageClient]:
        return [self.clients.get(s.spec.index, s) for s in self.stages]

    def close(self) -> None:
        for client in self.clients.values():
            self.runtime.run(client.close())
        for i, host in self.hosts.items():
            self.runtime.run(self.servers[i].close())  # type: ignore[attr-defined]
            self.runtime.run(host.aclose())
        self.runtime.close()


def chain_split(model, num_stages: int) -> ChainSplit:
    """Split a copy of ``model``; host 1..K-2 each accept the owner and their neighbours only."""
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    copy.eval()
    specs = even_stage_specs(int(model.config.num_hidden_layers), num_stages)
    split = ChainSplit(runtime=EventLoopThread(), stages=split_model(copy, specs))
    middle = range(1, num_stages - 1)
    for i in middle:
        accepted = {OWNER_TOKEN} | {_token(j) for j in (i - 1, i + 1) if j in middle}
        split.hosts[i] = StageHost({i: split.stages[i]}, run_id="r")
        split.servers[i] = split.runtime.run(
            serve_stage_host(split.hosts[i], authenticate=lambda t, accepted=accepted: t in accepted)
        )
    urls = {i: split.servers[i].url for i in middle}  # type: ignore[attr-defined]
    for i in middle:
        route = ChainRoute(
            next={i: PeerAddress(url=urls[i + 1], token=_token(i))} if i + 1 in urls else {},
            prev={i: PeerAddress(url=urls[i - 1], token=_token(i))} if i - 1 in urls else {},
        )
        split.hosts[i].chain.set_route(route)
        split.clients[i] = split.runtime.run(
            StageClient.connect(urls[i], run_id="r", stage=i, token=OWNER_TOKEN)
        )
    return split


def _whole(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    out.loss.backward()
    return float(out.loss.detach()), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize(("micro_batches", "schedule"), [(1, "1f1b"), (3, "1f1b"), (3, "gpipe")])
def test_chained_split_matches_whole_model(load_tiny, micro_batches, schedule):
    """K=4 over chained hosts gives the whole model's loss and every gradient (fp32, 1e-5)."""
    model = load_tiny("llama", attn_implementation="eager")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="left", lengths=(12, 9, 5, 12, 7, 3))
    loss_whole, want = _whole(model, batch)
    split = chain_split(model, 4)
    try:
        settings = PipelineSettings(micro_batches=micro_batches, schedule=schedule, path="chain")
        pipeline = Pipeline(split.chain(), split.runtime, settings)
        result = pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)
        pipeline.close()
        assert abs(result.loss - loss_whole) < 1e-5
        got = grads_by_name(split.stages)
        assert set(got) == set(want)
        for name, g in want.items():
            assert torch.allclose(got[name], g, atol=1e-5, rtol=0), name
    finally:
        split.close()


def test_owner_touches_only_the_ends_of_the_chain(load_tiny):
    """The owner sends no activation to the second host and takes none from the first."""
    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    split = chain_split(model, 4)
    try:
        pipeline = Pipeline(split.chain(), split.runtime, PipelineSettings(path="chain"))
        pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)
        pipeline.close()
        activation = batch.input_ids.numel() * model.config.hidden_size * 4
        first, second = split.clients[1], split.clients[2]
        # Relayed, each host would take in and send back two activation-sized tensors per step.
        # Chained, host 1 sends the owner only its input gradient (not its output), and the owner
        # sends host 2 only the loss gradient (not its input).
        assert activation <= first.bytes_received < 1.5 * activation
        assert activation <= second.bytes_sent < 1.5 * activation
    finally:
        split.close()


def test_chained_and_relayed_steps_agree_bit_for_bit(load_tiny):
    """The same step on the chained and the relayed path gives identical losses and gradients (the tied embedding to rounding)."""
    model = load_tiny("gpt2")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    results = {}
    for path in ("relay", "chain"):
        split = chain_split(model, 4)
        try:
            pipeline = Pipeline(split.chain(), split.runtime, PipelineSettings(micro_batches=2, path=path))
            loss = pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels).loss
            val = pipeline.eval_loss(batch.input_ids, batch.attention_mask, batch.labels).loss
            pipeline.close()
            results[path] = (loss, val, grads_by_name(split.stages))
        finally:
            split.close()
    assert results["chain"][:2] == results["relay"][:2]
    for name, g in results["relay"][2].items():
        # GPT-2 ties its head to the embedding: that gradient sums four parts (two micro-batches x
        # embedding and head) in whatever order the backward passes finish, which varies from run
        # to run on either path, so it agrees to rounding only; every other gradient is bit for bit.
        if name == "transformer.wte.weight":
            # Rounding is relative to the parts, not to their sum (they can cancel), so the
            # tolerance scales with the largest entry; a wrong sum (a part missing) is far off.
            scale = float(g.abs().max())
            torch.testing.assert_close(results["chain"][2][name], g, rtol=1e-5, atol=1e-5 * scale)
        else:
            assert torch.equal(results["chain"][2][name], g), name


def test_host_refuses_a_peer_that_is_not_its_neighbour(load_tiny):
    """With K=5, the host of stage 3 may reach stage 2's host but not stage 1's."""
    model = load_tiny("llama", num_hidden_layers=5)
    split = chain_split(model, 5)
    try:
        url1 = split.servers[1].url  # type: ignore[attr-defined]
        url2 = split.servers[2].url  # type: ignore[attr-defined]
        with pytest.raises(PeerLostError, match="403"):
            split.runtime.run(StageClient.connect(url1, run_id="r", stage=1, token=_token(3)))
        neighbour = split.runtime.run(StageClient.connect(url2, run_id="r", stage=2, token=_token(3)))
        split.runtime.run(neighbour.close())
    finally:
        split.close()


def test_failing_stage_in_the_chain_is_named(load_tiny):
    """A stage that fails mid-chain is reported to the owner with its stage, step and micro-batch."""
    model = load_tiny("llama")
    batch = padded_batch(vocab_size=model.config.vocab_size, padding="right")
    split = chain_split(model, 4)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    try:
        split.stages[2].forward = broken  # type: ignore[method-assign]
        pipeline = Pipeline(split.chain(), split.runtime, PipelineSettings(path="chain"))
        with pytest.raises(
            RemoteStageError, match=r"stage 2 failed its forward of step 0 micro-batch 0.*simulated"
        ):
            pipeline.train_step(batch.input_ids, batch.attention_mask, batch.labels)
        pipeline.close()
        assert split.hosts[1].held_micro_batches == 0  # the owner released the step everywhere
    finally:
        split.close()


@pytest.mark.slow
def test_chained_host_that_dies_mid_step_is_named(tmp_path, load_tiny):
    """A host process killed between forward and backward is named, with step and micro-batch, within seconds."""
    model = load_tiny("llama")
    model.config.save_pretrained(tmp_path)
    specs = even_stage_specs(model.config.num_hidden_layers, 4)
    stages = split_model(model, specs)
    procs: dict[int, StageHostProcess] = {}
    try:
        for i in (1, 2):
            save_stage_weights(stages[i], tmp_path / f"s{i}.safetensors")
            procs[i] = StageHostProcess(
                tmp_path, [tmp_path / f"s{i}.safetensors"], [specs[i]], run_id="r", token=OWNER_TOKEN,
                peer_tokens=[_token(3 - i)],
            )  # fmt: skip
        procs[1].set_route({1: procs[2].url}, {}, token=_token(1))
        procs[2].set_route({}, {2: procs[1].url}, token=_token(2))

        async def scenario() -> tuple[float, BaseException]:
            settings = ClientSettings(timeout_s=60)
            c1, c2 = [
                await StageClient.connect(
                    procs[i].url, run_id="r", stage=i, token=OWNER_TOKEN, settings=settings
                )
                for i in (1, 2)
            ]
            path = ChainPath()
            x = torch.randn(2, 6, model.config.hidden_size)
            kw = {"step": 0, "micro_batch": 0, "attention_mask": None}
            assert await (await path.start_forward(c1, x, fed=True, collects=False, **kw)) is None
            y = await (await path.start_forward(c2, None, fed=False, collects=True, **kw))
            assert y is not None
            procs[1].kill()
            started = time.monotonic()
            with pytest.raises(BridgeError) as failed:
                pending = await path.start_backward(
                    c2, torch.ones_like(y), fed=True, collects=False, step=0, micro_batch=0
                )
                await pending
            elapsed = time.monotonic() - started
            await c1.close()
            await c2.close()
            return elapsed, failed.value

        elapsed, error = asyncio.run(scenario())
        assert elapsed < 10
        message = str(error)
        assert "stage 1" in message and procs[1].url in message
        assert "step 0 micro-batch 0" in message
    finally:
        for proc in procs.values():
            proc.close()
