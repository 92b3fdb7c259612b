"""proto/serde.py: what one side writes, the other reads back equal, and what the protocol forbids is refused."""

from __future__ import annotations

import pytest

from proto import control_pb2 as pb
from proto import messages as m
from proto import serde
from proto.serde import ProtocolError


def wire(message: pb.Command) -> pb.Command:
    """A message after a trip through its serialized bytes."""
    return pb.Command.FromString(message.SerializeToString())


def trip(command: m.Command) -> m.Command:
    """A command written by the server and read by the client."""
    return serde.command_from_proto(wire(serde.command_to_proto(command)))


PEM = "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"  # carried as given: a host's TLS certificate


def test_host_command_reaches_client_intact() -> None:
    """Every field of a HostRun survives server -> wire -> client."""
    body = m.HostRun(
        run_id="plan-1-p0",
        model_config='{"model_type": "llama"}',
        partitions=(
            m.PartitionAssignment(index=1, num_stages=3, layer_start=1, layer_end=3, weights_sha256="ab" * 32, weights_bytes=123, local=False),
        ),
        allowed_peers=(m.AllowedPeer(client_id="owner", token_sha256="cd" * 32),),
    )
    assert trip(m.Command(command_id=9, body=body)) == m.Command(command_id=9, body=body)


@pytest.mark.parametrize(
    "body",
    [
        m.ConnectPeers(run_id="r", peers=(m.PeerEndpoint(partition=1, client_id="h", url="wss://x:1", token="t", cert_pem=PEM),)),
        m.Train(run_id="r", round=3, steps=1000, start=2000, batch_size=4, seq_len=64, micro_batches=2, lr=1e-3,
                seed=7, val_fraction=0.2, eval_batch_size=16, tokenizer="/models/t", method="backprop"),
        m.Train(run_id="r", round=1, steps=640, batch_size=8, seq_len=64, tokenizer="t", time_budget_s=12.5),
        m.Upload(run_id="r", partitions=(1, 2), round=4),
        m.Upload(run_id="r", partitions=(0,), round=2, density=0.05, optimizer_state=False),
        m.StopRun(run_id="r", reason="replaced"),
        m.PrepareRun(run_id="r", finetune="lora", optimizer="sgd", lora=m.LoraSettings(r=4, alpha=8, targets=("q_proj",)),
                     seed=5, codec=m.CodecSettings(name="topk", values="bf16", scope="partition", error_feedback=True),
                     method="backprop"),
        m.PrepareRun(run_id="r", finetune="heads", seed=2,
                     heads=m.HeadSettings(fraction=0.25, choice="importance", adapter="lora", key="owner-1",
                                          schedule="redundancy")),
        m.PrepareRun(run_id="r", path="chain", activation_compression="int8"),
        m.ChainPeers(run_id="r", peers=(m.PeerEndpoint(partition=2, client_id="n", url="wss://n:2", token="mine", cert_pem=PEM),)),
        m.LoadPartitions(run_id="r", partitions=(
            m.PartitionAssignment(index=0, num_stages=1, layer_start=0, layer_end=4, weights_sha256="ef" * 32, weights_bytes=9, local=True),
        ), round=2),
    ],
)  # fmt: skip
def test_other_commands_reach_client_intact(body: m.CommandBody) -> None:
    """ConnectPeers, Train, Upload, StopRun, PrepareRun, LoadPartitions and ChainPeers survive the trip, every field typed."""
    assert trip(m.Command(command_id=1, body=body)).body == body


def test_command_of_unknown_kind_is_an_error_on_the_client() -> None:
    """A command with no body (a kind from a newer server) is refused, not guessed."""
    with pytest.raises(ProtocolError, match="does not know") as caught:
        serde.command_from_proto(pb.Command(command_id=3))
    assert caught.value.code == "UNIMPLEMENTED"


def test_registration_reaches_server_intact() -> None:
    """A client's registration arrives with its credential, info and declared fields."""
    profile = m.DeviceProfile(flops_per_s=2e9, memory_bytes=5, upload_bytes_per_s=7.0, max_micro_batch=4,
                              declared=frozenset({"upload_bytes_per_s", "max_micro_batch"}))  # fmt: skip
    info = m.ClientInfo(version="1", hostname="h", platform="p", has_data=True, data_bytes=10, bridge_host="10.0.0.2")
    request = serde.registration_to_proto(m.Registration(name="c1", join_token="tok", info=info, profile=profile))
    got = serde.registration_from_proto(pb.RegisterRequest.FromString(request.SerializeToString()), address="ipv4:x")
    assert got.join_token == "tok" and got.client_key is None and got.address == "ipv4:x"
    assert got.info == info
    assert got.profile.declared == frozenset({"upload_bytes_per_s", "max_micro_batch"}) and got.profile.upload_bytes_per_s == 7.0
    assert got.profile.max_micro_batch == 4


def test_a_key_wins_over_a_join_token() -> None:
    """Exactly one credential goes on the wire: the client's own key when it has one."""
    request = serde.registration_to_proto(m.Registration(name="c1", join_token="tok", client_key="key"))
    assert request.WhichOneof("credential") == "client_key"


def test_status_report_reaches_server_intact() -> None:
    """A status report with a run arrives equal on the server."""
    report = m.StatusReport(
        command_id=5,
        state=m.CommandState.DONE,
        message="ok",
        run=m.RunStatus(run_id="r", partitions=(1,), state=m.RunState.SERVING, bridge_url="wss://h:2", bridge_cert_pem=PEM),
    )
    msg = pb.StatusReport.FromString(serde.status_report_to_proto(report).SerializeToString())
    assert serde.status_report_from_proto(msg) == report


def test_a_round_report_of_many_steps_arrives_whole() -> None:
    """A RoundReport of 1,000 steps with bytes per peer survives the trip, every step in order."""
    steps = tuple(
        m.StepRecord(loss=1.0 + i / 1000, tokens=100 + i, seconds=0.01 * i,
                     peers=(m.PeerBytes(stage=1, sent=10 * i, received=20 * i), m.PeerBytes(stage=2, sent=i, received=2 * i)))
        for i in range(1000)
    )  # fmt: skip
    round_report = m.RoundReport(
        round=3, steps=steps, evaluation=m.Evaluation(loss=2.5, perplexity=12.18, tokens=4096), samples=4000,
        data_samples=123, seconds=9.5, stage_seconds=(0.1, 0.2, 0.3), step_seconds=0.6,
    )  # fmt: skip
    report = m.StatusReport(command_id=5, state=m.CommandState.DONE, round_report=round_report)
    msg = pb.StatusReport.FromString(serde.status_report_to_proto(report).SerializeToString())
    got = serde.status_report_from_proto(msg)
    assert got == report and len(got.round_report.steps) == 1000  # type: ignore[union-attr]


def test_a_round_report_without_evaluation_is_refused() -> None:
    """The evaluation is part of every round report."""
    msg = pb.StatusReport(command_id=1, state=pb.COMMAND_STATE_DONE, round_report=pb.RoundReport(round=1))
    with pytest.raises(ProtocolError, match="no evaluation"):
        serde.status_report_from_proto(msg)


def test_unknown_states_are_refused() -> None:
    """Enum values this side does not know are protocol errors."""
    with pytest.raises(ProtocolError):
        serde.status_report_from_proto(pb.StatusReport(command_id=1, state=99))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        serde.run_status_from_proto(pb.RunStatus(run_id="r", state=pb.RUN_STATE_UNSPECIFIED))


def test_upload_must_start_with_header() -> None:
    """A data chunk where the header belongs is refused, and so is a second header."""
    with pytest.raises(ProtocolError, match="header"):
        serde.weight_header_from_proto(pb.WeightChunk(data=b"x"))
    with pytest.raises(ProtocolError):
        serde.weight_data_from_proto(pb.WeightChunk(header=pb.WeightHeader(run_id="r")))


def test_model_config_that_is_not_text_is_refused() -> None:
    """HostRun's config.json must be UTF-8."""
    msg = pb.Command(command_id=2, host=pb.HostRun(run_id="r", model_config=b"\xff\xfe"))
    with pytest.raises(ProtocolError, match="UTF-8"):
        serde.command_from_proto(msg)


def test_weight_header_carries_trained_slices() -> None:
    """An upload's header names the slices it trained (heads mode), tensor by tensor, and arrives intact."""
    header = m.WeightHeader(
        run_id="r", partition=1, total_bytes=10, sha256="ab" * 32, round=3, slices=(
            m.TrainedSlices(tensor="model.layers.1.self_attn.q_proj.weight", dim=0, width=16, blocks=(0, 3)),
            m.TrainedSlices(tensor="model.norm.weight"),
        ),
    )  # fmt: skip
    wire = pb.WeightChunk.FromString(serde.weight_header_to_proto(header).SerializeToString())
    assert serde.weight_header_from_proto(wire) == header
