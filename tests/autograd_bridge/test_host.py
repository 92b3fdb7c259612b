"""The stage host answers bad requests with clear errors, bounds its state, and keeps serving."""

from __future__ import annotations

import asyncio

import pytest
import torch

from autograd_bridge.errors import BridgeTimeoutError, PeerLostError, RemoteStageError
from autograd_bridge.frames import Frame, MessageKind, decode_frame, encode_frame
from autograd_bridge.host import HostSettings, StageHost
from autograd_bridge.partition import even_stage_specs, split_model
from autograd_bridge.remote import ClientSettings, StageClient
from autograd_bridge.transport import memory_pipe

pytestmark = pytest.mark.usefixtures("single_thread")

RUN = "run-1"


@pytest.fixture
def middle_stage(load_tiny):
    """Stage 1 of 3 of a tiny Llama (hidden size 64)."""
    model = load_tiny("llama")
    return split_model(model, even_stage_specs(model.config.num_hidden_layers, 3))[1]


def _hidden(stage, batch: int = 2, seq: int = 5) -> torch.Tensor:
    return torch.randn(batch, seq, stage.config.hidden_size)


async def _serve(stage, settings: HostSettings | None = None) -> tuple[StageHost, StageClient, asyncio.Task]:
    host = StageHost({1: stage}, run_id=RUN, settings=settings)
    owner_end, host_end = memory_pipe()
    task = asyncio.ensure_future(host.serve(host_end))
    return host, StageClient(owner_end, run_id=RUN, stage=1, settings=ClientSettings(timeout_s=5)), task


async def test_forward_backward_round_trip_returns_input_gradient(middle_stage):
    """FORWARD then BACKWARD returns dL/dx of the stage's input and frees the state."""
    host, client, task = await _serve(middle_stage)
    x = _hidden(middle_stage)
    y = await client.forward(x, step=0, micro_batch=0)
    assert y.shape == x.shape
    assert host.held_micro_batches == 1
    grad = await client.backward(torch.ones_like(y), step=0, micro_batch=0)
    x_local = x.clone().requires_grad_(True)
    middle_stage(x_local).backward(torch.ones_like(y))
    assert grad is not None and torch.allclose(grad, x_local.grad, atol=1e-6)
    assert host.held_micro_batches == 0
    await client.close()
    await task


async def test_garbage_bytes_get_an_error_frame_and_the_host_keeps_serving(middle_stage):
    """Random bytes are answered with BAD_FRAME; the next valid request still works."""
    host = StageHost({1: middle_stage}, run_id=RUN)
    reply = await host.handle_bytes(b"not a frame at all")
    assert reply.kind == MessageKind.ERROR and reply.error_code == "BAD_FRAME"
    truncated = b"".join(bytes(p) for p in encode_frame(Frame(kind=MessageKind.FORWARD, run_id=RUN, stage=1,
                                                              tensors={"x": _hidden(middle_stage)})))[:-7]  # fmt: skip
    reply = await host.handle_bytes(truncated)
    assert reply.error_code == "BAD_FRAME" and "byte" in reply.error_message
    ok = await host.handle(Frame(kind=MessageKind.HELLO, run_id=RUN))
    assert ok.kind == MessageKind.ACK and ok.options["stages"] == "1"


@pytest.mark.parametrize(
    ("frame_kwargs", "code"),
    [
        ({"kind": MessageKind.FORWARD, "run_id": "other-run", "stage": 1}, "UNKNOWN_RUN"),
        ({"kind": MessageKind.FORWARD, "run_id": RUN, "stage": 7}, "UNKNOWN_STAGE"),
        ({"kind": MessageKind.FORWARD_RESULT, "run_id": RUN, "stage": 1}, "UNEXPECTED_KIND"),
        ({"kind": MessageKind.BACKWARD, "run_id": RUN, "stage": 1, "micro_batch": 9}, "UNKNOWN_MICRO_BATCH"),
    ],
)
async def test_requests_for_unknown_things_are_refused_with_their_code(middle_stage, frame_kwargs, code):
    """Unknown runs, stages, kinds and micro-batches each get their own error code."""
    host = StageHost({1: middle_stage}, run_id=RUN)
    frame_kwargs = dict(frame_kwargs)
    frame_kwargs.setdefault("tensors", {"x": _hidden(middle_stage), "grad": _hidden(middle_stage)})
    reply = await host.handle(Frame(request_id=5, **frame_kwargs))
    assert reply.kind == MessageKind.ERROR
    assert reply.error_code == code
    assert reply.request_id == 5


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ({"x": torch.randn(2, 5, 63)}, "(B, T, 64)"),
        ({"x": torch.randint(0, 9, (2, 5))}, "float dtype"),
        ({"x": torch.randn(2, 5, 64), "attention_mask": torch.ones(2, 4)}, "attention_mask must be (B, T)"),
        ({"y": torch.randn(2, 5, 64)}, "named 'x'"),
    ],
)
async def test_wrong_shapes_and_dtypes_are_refused(middle_stage, tensors, fragment):
    """A stage input of the wrong shape or dtype is refused before any compute."""
    host = StageHost({1: middle_stage}, run_id=RUN)
    reply = await host.handle(Frame(kind=MessageKind.FORWARD, run_id=RUN, stage=1, tensors=tensors))
    assert reply.kind == MessageKind.ERROR
    assert fragment in reply.error_message
    assert host.held_micro_batches == 0


async def test_backward_with_a_gradient_of_the_wrong_shape_is_refused_and_state_kept(middle_stage):
    """A wrong-shaped gradient is refused; the state stays, so a correct retry succeeds."""
    host, client, task = await _serve(middle_stage)
    y = await client.forward(_hidden(middle_stage), step=0, micro_batch=0)
    with pytest.raises(RemoteStageError, match="grad must match"):
        await client.backward(torch.ones(1, 2, 3), step=0, micro_batch=0)
    assert host.held_micro_batches == 1
    assert await client.backward(torch.ones_like(y), step=0, micro_batch=0) is not None
    await client.close()
    await task


async def test_state_is_bounded(middle_stage):
    """Beyond max_micro_batches a FORWARD is refused with STATE_LIMIT, and RELEASE frees the state."""
    host, client, task = await _serve(middle_stage, HostSettings(max_micro_batches=2))
    for mb in range(2):
        await client.forward(_hidden(middle_stage), step=3, micro_batch=mb)
    with pytest.raises(RemoteStageError) as err:
        await client.forward(_hidden(middle_stage), step=3, micro_batch=2)
    assert err.value.code == "STATE_LIMIT"
    await client.release(3)
    assert host.held_micro_batches == 0
    await client.forward(_hidden(middle_stage), step=3, micro_batch=2)
    await client.close()
    await task


async def test_duplicate_forward_is_refused(middle_stage):
    """The same (step, micro-batch) cannot go forward twice."""
    _host, client, task = await _serve(middle_stage)
    await client.forward(_hidden(middle_stage), step=0, micro_batch=0)
    with pytest.raises(RemoteStageError) as err:
        await client.forward(_hidden(middle_stage), step=0, micro_batch=0)
    assert err.value.code == "DUPLICATE"
    await client.close()
    await task


async def test_expired_state_is_dropped(middle_stage):
    """State older than state_timeout_s is dropped and its BACKWARD says why."""
    _host, client, task = await _serve(middle_stage, HostSettings(state_timeout_s=0.05))
    y = await client.forward(_hidden(middle_stage), step=0, micro_batch=0)
    await asyncio.sleep(0.1)
    await client.forward(_hidden(middle_stage), step=0, micro_batch=1)  # any FORWARD sweeps
    with pytest.raises(RemoteStageError, match="older than") as err:
        await client.backward(torch.ones_like(y), step=0, micro_batch=0)
    assert err.value.code == "UNKNOWN_MICRO_BATCH"
    await client.close()
    await task


async def test_peer_going_away_drops_its_state(middle_stage):
    """When the owner's connection closes, the host frees the micro-batches it held for it."""
    host, client, task = await _serve(middle_stage)
    await client.forward(_hidden(middle_stage), step=0, micro_batch=0)
    assert host.held_micro_batches == 1
    await client.close()
    await asyncio.wait_for(task, 5)
    assert host.held_micro_batches == 0


async def test_a_host_that_never_answers_times_out_with_a_clear_error():
    """A request to a silent peer fails with BridgeTimeoutError naming the stage and the step."""
    owner_end, _silent = memory_pipe()
    client = StageClient(owner_end, run_id=RUN, stage=2, settings=ClientSettings(timeout_s=0.2))
    with pytest.raises(BridgeTimeoutError, match=r"stage 2 .* step 4 micro-batch 1 within 0.2 s"):
        await client.forward(torch.randn(1, 2, 8), step=4, micro_batch=1)
    await client.close()


async def test_a_peer_that_vanishes_fails_pending_requests_promptly():
    """Closing the host's end while a request is pending raises PeerLostError, not a hang."""
    owner_end, host_end = memory_pipe()
    client = StageClient(owner_end, run_id=RUN, stage=1, settings=ClientSettings(timeout_s=30))

    async def vanish() -> None:
        await host_end.recv()
        await host_end.close()

    vanisher = asyncio.ensure_future(vanish())
    with pytest.raises(PeerLostError, match="went away"):
        await asyncio.wait_for(client.forward(torch.randn(1, 2, 8), step=0, micro_batch=0), 5)
    await vanisher
    with pytest.raises(PeerLostError):
        await client.forward(torch.randn(1, 2, 8), step=0, micro_batch=1)
    await client.close()


async def test_gradients_and_weights_come_back_under_whole_model_names(middle_stage):
    """GET_GRADS and GET_WEIGHTS return tensors named as in the whole model."""
    _host, client, task = await _serve(middle_stage)
    y = await client.forward(_hidden(middle_stage), step=0, micro_batch=0)
    await client.backward(torch.ones_like(y), step=0, micro_batch=0)
    grads = await client.named_grads()
    weights = await client.named_weights()
    names = {n for n, _ in middle_stage.named_model_parameters()}
    assert set(grads) == names == set(weights)
    assert all(n.startswith("model.layers.") for n in names)
    await client.close()
    await task


async def test_optimizer_step_with_a_bad_learning_rate_is_refused(middle_stage):
    """OPTIMIZER_STEP validates its options."""
    host = StageHost({1: middle_stage}, run_id=RUN)
    reply = await host.handle(Frame(kind=MessageKind.OPTIMIZER_STEP, run_id=RUN, options={"lr": "fast"}))
    assert reply.error_code == "BAD_REQUEST"
    assert host.steps_taken == 0


def test_error_frames_survive_the_wire():
    """An ERROR frame encodes and decodes with its code and message."""
    from autograd_bridge.frames import error_frame

    frame = error_frame(Frame(kind=MessageKind.FORWARD, request_id=3, run_id=RUN), "STATE_LIMIT", "full")
    back = decode_frame(bytearray(b"".join(bytes(p) for p in encode_frame(frame))))
    assert (back.kind, back.request_id, back.error_code, back.error_message) == (
        MessageKind.ERROR, 3, "STATE_LIMIT", "full",
    )  # fmt: skip


def test_reset_optimizer_can_switch_the_kind(middle_stage):
    """A host rebuilt with "sgd" steps with SGD from then on; an unknown kind is refused and nothing changes."""
    host = StageHost({1: middle_stage}, run_id="r")
    assert isinstance(host.optimizer, torch.optim.AdamW)
    host.reset_optimizer("sgd")
    assert isinstance(host.optimizer, torch.optim.SGD) and host.settings.optimizer == "sgd"
    with pytest.raises(ValueError, match="'adamw' or 'sgd'"):
        host.reset_optimizer("adam")  # type: ignore[arg-type]
    assert isinstance(host.optimizer, torch.optim.SGD)
    host.close()
