"""The stage host against rogue peers: step options, inputs checked before compute, fair state budgets,
transport errors and peers that drop in the middle of a message (over real WebSockets)."""

from __future__ import annotations

import asyncio
import gc
import logging
import struct

import pytest
import torch

from autograd_bridge.errors import RemoteStageError
from autograd_bridge.frames import Frame, MessageKind
from autograd_bridge.host import HostSettings, StageHost, serve_stage_host
from autograd_bridge.partition import even_stage_specs, split_model
from autograd_bridge.remote import ClientSettings, StageClient
from autograd_bridge.transport import memory_pipe

pytestmark = pytest.mark.usefixtures("single_thread")

RUN = "run-1"


@pytest.fixture
def stages(load_tiny):
    """Stages 0 and 1 of 3 of a tiny Llama (hidden size 64)."""
    model = load_tiny("llama")
    return split_model(model, even_stage_specs(model.config.num_hidden_layers, 3))


def _hidden(batch: int = 2, seq: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, seq, 64, dtype=dtype)


@pytest.mark.parametrize(
    "options",
    [{"lr": "1e308"}, {"lr": "inf"}, {"lr": "nan"}, {"lr": "11"}, {"grad_scale": "nan"}, {"lr": "-1"}],
)
async def test_step_options_must_be_finite_and_bounded(stages, options):
    """An OPTIMIZER_STEP with a learning rate no model survives (or a NaN scale) is refused and nothing steps."""
    host = StageHost({1: stages[1]}, run_id=RUN)
    before = [p.detach().clone() for p in stages[1].parameters()]
    reply = await host.handle(Frame(kind=MessageKind.OPTIMIZER_STEP, run_id=RUN, options=options))
    assert reply.error_code == "BAD_REQUEST" and host.steps_taken == 0
    assert all(torch.equal(a, b) for a, b in zip(before, stages[1].parameters(), strict=True))


@pytest.mark.parametrize(
    ("stage", "tensors", "code"),
    [
        (1, {"x": torch.empty(2, 0, 64)}, "BAD_SHAPE"),
        (1, {"x": torch.empty(0, 5, 64)}, "BAD_SHAPE"),
        (1, {"x": _hidden(dtype=torch.float16)}, "BAD_DTYPE"),
        (1, {"x": _hidden(dtype=torch.float64)}, "BAD_DTYPE"),
        (1, {"x": _hidden(), "attention_mask": torch.ones(2, 5, dtype=torch.complex64)}, "BAD_DTYPE"),
        (1, {"x": _hidden(), "position_ids": torch.zeros(2, 5)}, "BAD_DTYPE"),
        (1, {"x": _hidden(), "position_ids": torch.full((2, 5), 10**9)}, "BAD_INPUT"),
        (0, {"x": torch.full((2, 5), 10**6)}, "BAD_INPUT"),
        (0, {"x": torch.full((2, 5), -1)}, "BAD_INPUT"),
        (0, {"x": torch.zeros(2, 0, dtype=torch.int64)}, "BAD_SHAPE"),
    ],
)
async def test_inputs_are_checked_before_compute(stages, stage, tensors, code):
    """Empty tensors, other dtypes and out-of-range ids are refused with their own code, not a COMPUTE_ERROR."""
    host = StageHost({stage: stages[stage]}, run_id=RUN)
    for kind in (MessageKind.FORWARD, MessageKind.EVAL_FORWARD):
        reply = await host.handle(Frame(kind=kind, run_id=RUN, stage=stage, tensors=tensors))
        assert (reply.kind, reply.error_code) == (MessageKind.ERROR, code), reply.error_message
    assert host.held_micro_batches == 0


async def test_a_bad_backward_gradient_dtype_is_refused(stages):
    """A BACKWARD gradient of an integer dtype is refused before compute and the state is kept."""
    host = StageHost({1: stages[1]}, run_id=RUN)
    await host.handle(Frame(kind=MessageKind.FORWARD, run_id=RUN, stage=1, tensors={"x": _hidden()}))
    reply = await host.handle(Frame(kind=MessageKind.BACKWARD, run_id=RUN, stage=1,
                                    tensors={"grad": torch.ones(2, 5, 64, dtype=torch.int64)}))  # fmt: skip
    assert reply.error_code == "BAD_SHAPE" and host.held_micro_batches == 1


def _client(host: StageHost) -> tuple[StageClient, asyncio.Task]:
    owner_end, host_end = memory_pipe()
    task = asyncio.ensure_future(host.serve(host_end))
    return StageClient(owner_end, run_id=RUN, stage=1, settings=ClientSettings(timeout_s=5)), task


async def test_one_peer_at_its_limit_leaves_room_for_another(stages):
    """A peer holding its max_micro_batches states is refused; another peer's FORWARD still goes through."""
    host = StageHost({1: stages[1]}, run_id=RUN, settings=HostSettings(max_micro_batches=2))
    greedy, greedy_task = _client(host)
    other, other_task = _client(host)
    for mb in range(2):
        await greedy.forward(_hidden(), step=0, micro_batch=mb)
    with pytest.raises(RemoteStageError) as refused:
        await greedy.forward(_hidden(), step=0, micro_batch=2)
    assert refused.value.code == "STATE_LIMIT"
    y = await other.forward(_hidden(), step=0, micro_batch=9)
    assert y.shape == (2, 5, 64)
    for client, task in ((greedy, greedy_task), (other, other_task)):
        await client.close()
        await task


async def test_state_bytes_are_budgeted_per_peer_and_in_total(stages):
    """States are bounded in bytes: per peer, and over all peers together."""
    per_state = 2 * 2 * 5 * 64 * 4  # input and output of a (2, 5, 64) fp32 micro-batch
    settings = HostSettings(max_state_bytes_per_peer=2 * per_state, max_state_bytes=3 * per_state)
    host = StageHost({1: stages[1]}, run_id=RUN, settings=settings)
    first, first_task = _client(host)
    second, second_task = _client(host)
    for mb in range(2):
        await first.forward(_hidden(), step=0, micro_batch=mb)
    with pytest.raises(RemoteStageError, match="max_state_bytes_per_peer"):
        await first.forward(_hidden(), step=0, micro_batch=2)
    await second.forward(_hidden(), step=0, micro_batch=3)
    with pytest.raises(RemoteStageError, match="max_state_bytes="):
        await second.forward(_hidden(), step=0, micro_batch=4)
    assert host.held_state_bytes == 3 * per_state
    for client, task in ((first, first_task), (second, second_task)):
        await client.close()
        await task
    assert host.held_state_bytes == 0


async def _raw_websocket(url: str):  # type: ignore[no-untyped-def]
    from websockets.asyncio.client import connect

    return await connect(url, compression=None, max_size=None)


async def test_broken_framing_ends_the_peer_without_a_traceback(stages, caplog):
    """A message too short to hold its length closes that connection with a reason; no traceback is logged."""
    caplog.set_level(logging.INFO)
    host = StageHost({1: stages[1]}, run_id=RUN)
    server = await serve_stage_host(host)
    try:
        ws = await _raw_websocket(server.url)  # type: ignore[attr-defined]
        await ws.send(b"abc")
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1002 and "length" in (ws.close_reason or "")
    finally:
        await server.close()  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.exc_info is not None]
    assert not [r for r in caplog.records if "connection handler failed" in r.getMessage()]
    assert [r for r in caplog.records if "broke the message framing" in r.getMessage()]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
async def test_memory_of_a_message_cut_short_is_freed(stages):
    """Peers that announce 256 MiB, send 48 MiB and drop leave no buffer behind (RSS grows < 32 MiB over 3 drops)."""
    host = StageHost({1: stages[1]}, run_id=RUN)
    server = await serve_stage_host(host)
    chunk = bytes(1 << 20)
    gc.collect()
    gc.disable()  # as in a quiet server, where the cycle collector may not run for a long time
    try:
        before = _rss_bytes()
        for _ in range(3):
            ws = await _raw_websocket(server.url)  # type: ignore[attr-defined]
            sent = asyncio.Event()

            async def fragments(sent: asyncio.Event = sent):  # type: ignore[no-untyped-def]
                yield struct.pack("<Q", 256 << 20) + chunk
                for _ in range(47):
                    yield chunk
                sent.set()
                await asyncio.sleep(60)  # never finish the message

            sending = asyncio.ensure_future(ws.send(fragments()))
            await asyncio.wait_for(sent.wait(), 30)
            await asyncio.sleep(0.5)  # let the host copy what arrived
            ws.transport.abort()
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            await asyncio.sleep(0.5)
        grown = _rss_bytes() - before
    finally:
        gc.enable()
        await server.close()  # type: ignore[attr-defined]
    assert grown < 32 << 20, f"RSS grew {grown >> 20} MiB"
