"""What a holder uploads: values, or its sparse change since it loaded, with error feedback when asked."""

from __future__ import annotations

import zlib

import pytest
import torch

from autograd_bridge.codecs import decode_update
from autograd_bridge.finetune import FinetuneSettings
from client.trainer import Updates, prepare_from_command
from proto.messages import CodecSettings, PrepareRun, Upload


class Stage(torch.nn.Module):
    """A stand-in for a StageModule: one trainable weight under a whole-model name."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(10))

    def model_state(self) -> dict[str, torch.Tensor]:
        return {"model.layers.0.w": self.weight}

    def named_model_parameters(self):  # type: ignore[no-untyped-def]
        yield "model.layers.0.w", self.weight


def prepared(codec: str, error_feedback: bool = False):  # type: ignore[no-untyped-def]
    return prepare_from_command(
        PrepareRun(run_id="p", codec=CodecSettings(name=codec, error_feedback=error_feedback))
    )


def test_a_dense_run_uploads_values_and_round_zero_is_always_whole() -> None:
    """With the dense codec an upload is the trained values; the starting state (round 0) is values too."""
    stage = Stage()
    updates = Updates(prepared("dense"))
    updates.mark_start(0, stage)
    with torch.no_grad():
        stage.weight.copy_(torch.arange(10.0))
    sent = decode_update(updates.encode(0, stage, None, Upload(run_id="p", partitions=(0,), round=1)))
    assert torch.equal(sent["model.layers.0.w"], torch.arange(10.0))
    whole = decode_update(
        Updates(prepared("topk")).encode(0, stage, None, Upload(run_id="p", partitions=(0,), round=0))
    )
    assert torch.equal(whole["model.layers.0.w"], torch.arange(10.0))


def test_a_sparse_run_uploads_its_top_k_change_since_the_last_load() -> None:
    """trained - start, keeping the largest magnitudes at the upload's density."""
    stage = Stage()
    with torch.no_grad():
        stage.weight.copy_(torch.ones(10))
    updates = Updates(prepared("topk"))
    updates.mark_start(0, stage)  # what the server sent
    change = torch.tensor([0.0, -5.0, 1.0, 0.1, 4.0, 0.0, 0.2, -0.3, 0.0, 3.0])
    with torch.no_grad():
        stage.weight.add_(change)
    sent = decode_update(
        updates.encode(0, stage, None, Upload(run_id="p", partitions=(0,), round=1, density=0.3))
    )
    assert torch.equal(
        sent["model.layers.0.w"], torch.tensor([0.0, -5.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 3.0])
    )


@pytest.mark.parametrize("feedback", [False, True])
def test_error_feedback_sends_what_the_last_upload_left_out(feedback: bool) -> None:
    """With error feedback the residual of one round joins the next round's change; without it, it is lost."""
    stage = Stage()
    updates = Updates(prepared("topk", error_feedback=feedback))
    updates.mark_start(0, stage)
    with torch.no_grad():
        stage.weight.copy_(torch.tensor([10.0, 2.0, 0, 0, 0, 0, 0, 0, 0, 0]))
    first = decode_update(
        updates.encode(0, stage, None, Upload(run_id="p", partitions=(0,), round=1, density=0.1))
    )
    assert first["model.layers.0.w"].tolist()[:2] == [10.0, 0.0]
    updates.mark_start(0, stage)  # the next round starts where this one ended; it changes one entry a little
    with torch.no_grad():
        stage.weight[5] += 1.0
    second = decode_update(
        updates.encode(0, stage, None, Upload(run_id="p", partitions=(0,), round=2, density=0.1))
    )
    kept = second["model.layers.0.w"]
    # With feedback the 2.0 left out in round 1 outweighs this round's 1.0 and goes now.
    assert (kept[1].item(), kept[5].item()) == ((2.0, 0.0) if feedback else (0.0, 1.0))


def test_finetune_settings_reach_the_updates() -> None:
    """The prepared run carries its codec choice; the density comes with each upload."""
    run = prepared("topk", error_feedback=True)
    assert (run.codec, run.error_feedback, run.codec_choice.scope) == ("topk", True, "partition")
    assert run.upload_codec(0.5).sends_changes and isinstance(run.settings, FinetuneSettings)


class WideStage(Stage):
    """A stage with one 64k-entry trainable weight: adapters' size, where seeds pay off."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(256, 256))


def test_a_seeds_run_uploads_the_pairs_a_forward_gradient_holder_applied() -> None:
    """The upload is seeds and coefficients (a few hundred bytes, not 256 KiB); the server's decode is the change."""
    from autograd_bridge.methods.perturbation import ParameterSpace, replay

    stage = WideStage()
    updates = Updates(prepared("seeds"))
    updates.mark_start(0, stage)
    start = stage.weight.detach().clone()
    space = ParameterSpace.of_stages([stage])
    steps = [[(11, 0.5), (12, -0.25)], [(13, 0.125)]]
    for pairs in steps:
        space.apply(pairs)
    data = updates.encode(0, stage, None, Upload(run_id="p", partitions=(0,), round=1))
    dense = decode_update(
        Updates(prepared("dense")).encode(0, stage, None, Upload(run_id="p", partitions=(0,), round=1))
    )
    assert len(data) * 100 < 4 * stage.weight.numel()
    change = decode_update(data)["model.layers.0.w"]
    assert torch.allclose(change, dense["model.layers.0.w"] - start, atol=1e-6, rtol=0)
    # Any holder of the starting tensors rebuilds the trained ones bit for bit from the same pairs.
    assert torch.equal(replay({"model.layers.0.w": start}, steps)["model.layers.0.w"], stage.weight.detach())


def test_a_seeds_run_sends_other_changes_dense() -> None:
    """A change no seeded step explains (a backprop holder, or one that also stepped otherwise) goes as the tensors."""
    from autograd_bridge.methods.perturbation import ParameterSpace

    stage = WideStage()
    updates = Updates(prepared("seeds"))
    updates.mark_start(0, stage)
    ParameterSpace.of_stages([stage]).apply([(5, 1.0)])
    with torch.no_grad():
        stage.weight[0, 0] += 3.0
    data = updates.encode(0, stage, None, Upload(run_id="p", partitions=(0,), round=1))
    assert torch.equal(decode_update(data)["model.layers.0.w"], stage.weight.detach())  # start was zero
    assert len(data) > 4 * stage.weight.numel()


_HUGE_LAYOUT = torch.frombuffer(
    bytearray(zlib.compress(b'{"version":1,"tensors":[["w","float32",[1073741824,64]]]}')), dtype=torch.uint8
)
_BOMB = torch.frombuffer(bytearray(zlib.compress(b" " * (17 * 2**20))), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda s: s.update(alphas=torch.tensor([float("nan")], dtype=torch.float64)), "finite"),
        (lambda s: s.update(steps=torch.tensor([2])), "add up"),
        (lambda s: s.update(layout=_HUGE_LAYOUT), "more than this server rebuilds"),
        (lambda s: s.update(layout=_BOMB), "inflates past"),
    ],
)
def test_a_malformed_seeds_upload_is_refused_before_any_rebuild(edit, says) -> None:
    """Network input: inconsistent counts, NaN coefficients or absurd sizes are ValueErrors naming the problem."""
    from safetensors.torch import load

    from autograd_bridge.codecs.container import pack
    from autograd_bridge.codecs.seeds import SeedsCodec

    good = SeedsCodec().encode_steps([[(1, 0.5)]], {"w": torch.zeros(4)})
    stored = load(good)
    edit(stored)
    with pytest.raises(ValueError, match=says):
        decode_update(pack(stored, "seeds"))
