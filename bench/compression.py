"""Activation compression (``[training] activation_compression``): its effect on the loss and the bytes.

The same model, from the same seeded start, trains the same batches over a K-stage split on
the chained path (real ``StageHost``s on loopback WebSockets, the owner holding the first and
last stage) once per compression of the activations and gradients between stages: ``none``
(float32), ``fp16`` and ``int8`` (one float32 scale per row). Each run reports its validation
loss after training and the frame bytes per step between the owner and the hosts; compression
is the only difference, so the loss gap is what compression costs.

    python -m bench.compression --quick    # tiny Llama (4 x 64, GPT-2 BPE cut to 512 tokens), 12 steps, ~1 minute
    python -m bench.compression            # the same model, 60 steps

The last line: ``loss_none=.. loss_fp16=.. loss_int8=.. delta_fp16_pct=.. delta_int8_pct=..
bytes_fp16=.. bytes_int8=..`` with ``delta_*_pct = 100 * (loss_* - loss_none) / loss_none``
(validation loss) and ``bytes_*`` the owner's bridge bytes per step relative to ``none``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from autograd_bridge.chain import ChainRoute, PeerAddress
from autograd_bridge.frames import COMPRESSIONS
from autograd_bridge.host import HostSettings, StageHost, serve_stage_host
from autograd_bridge.models import load_tokenizer, tiny_config
from autograd_bridge.partition import even_stage_specs, split_model
from autograd_bridge.pipeline import Pipeline, PipelineSettings
from autograd_bridge.remote import ClientSettings, StageClient
from autograd_bridge.runtime import EventLoopThread
from client.data import DataSettings, OwnerDataset, load_texts
from client.training import build_local_optimizer, evaluate, run_steps
from testbed.demo_data import write_owner_splits
from testbed.tiny_model import truncated_gpt2_tokenizer


@dataclass(frozen=True, slots=True, kw_only=True)
class CompressionSettings:
    steps: int = 60
    stages: int = 4
    batch_size: int = 8
    seq_len: int = 64
    micro_batches: int = 2
    lr: float = 1e-3
    seed: int = 0
    max_chars: int = 200_000  # of the King James Bible, when no --data is given (60 steps: one epoch)
    model: str | None = (
        None  # a folder with config.json and tokenizer files (fresh weights); None: the tiny Llama
    )
    data: str | None = None  # a .txt file or a folder of them (all used); None: the KJV


@dataclass(frozen=True, slots=True)
class Outcome:
    val_loss: float
    bytes_per_step: float
    losses: list[float]


def _model_and_tokenizer(settings: CompressionSettings) -> tuple[PreTrainedModel, Any]:
    torch.manual_seed(settings.seed)
    if settings.model is None:
        tokenizer = truncated_gpt2_tokenizer(512)
        config = tiny_config("llama", vocab_size=len(tokenizer))
    else:
        tokenizer = load_tokenizer(settings.model)
        config = AutoConfig.from_pretrained(settings.model)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def _texts(settings: CompressionSettings) -> list[str]:
    if settings.data is None:
        with tempfile.TemporaryDirectory(prefix="titanic-compression-") as tmp:
            (split,) = write_owner_splits(tmp, 1, max_chars_per_owner=settings.max_chars)
            return load_texts(split.path)
    path = Path(settings.data).expanduser()
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    return [text for f in files for text in load_texts(f)]


def train_once(
    base: PreTrainedModel, dataset: OwnerDataset, compression: str, settings: CompressionSettings
) -> Outcome:
    """Train a copy of ``base`` over chained hosts with ``compression`` between stages."""
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    stages = split_model(model, even_stage_specs(int(base.config.num_hidden_layers), settings.stages))
    runtime = EventLoopThread()
    middle = range(1, settings.stages - 1)
    hosts = {
        i: StageHost({i: stages[i]}, run_id="b", settings=HostSettings(compression=compression))
        for i in middle
    }  # type: ignore[arg-type]
    servers = {i: runtime.run(serve_stage_host(hosts[i])) for i in middle}
    urls = {i: servers[i].url for i in middle}  # type: ignore[attr-defined]
    for i in middle:
        hosts[i].chain.set_route(
            ChainRoute(
                next={i: PeerAddress(url=urls[i + 1])} if i + 1 in urls else {},
                prev={i: PeerAddress(url=urls[i - 1])} if i - 1 in urls else {},
            )
        )
    client_settings = ClientSettings(compression=compression)  # type: ignore[arg-type]
    clients = {
        i: runtime.run(StageClient.connect(urls[i], run_id="b", stage=i, settings=client_settings))
        for i in middle
    }
    chain = [clients.get(k, stages[k]) for k in range(settings.stages)]
    pipeline = Pipeline(chain, runtime, PipelineSettings(micro_batches=settings.micro_batches, path="chain"))
    try:
        owner = [stages[0], stages[-1]]
        optimizer = build_local_optimizer(owner, lr=settings.lr)
        records = run_steps(
            pipeline, dataset, steps=settings.steps, batch_size=settings.batch_size, start=0,
            local_optimizer=optimizer, lr=settings.lr, peers=list(clients.values()),
        )  # fmt: skip
        val_loss, _ = evaluate(pipeline, dataset, settings.batch_size)
        sent = sum(p.sent + p.received for r in records for p in r.peers)
        return Outcome(
            val_loss=val_loss, bytes_per_step=sent / len(records), losses=[r.loss for r in records]
        )
    finally:
        pipeline.close()
        for client in clients.values():
            runtime.run(client.close())
        for i in middle:
            runtime.run(servers[i].close())  # type: ignore[attr-defined]
            runtime.run(hosts[i].aclose())
        runtime.close()


def run_compression(settings: CompressionSettings) -> dict[str, Outcome]:
    base, tokenizer = _model_and_tokenizer(settings)
    data = DataSettings(seq_len=settings.seq_len, val_fraction=0.1, seed=settings.seed)
    dataset = OwnerDataset.from_texts(_texts(settings), tokenizer, settings=data)
    return {c: train_once(base, dataset, c, settings) for c in COMPRESSIONS}


def summary_line(outcomes: dict[str, Outcome]) -> str:
    none = outcomes["none"]
    parts = [f"loss_{c}={o.val_loss:.4f}" for c, o in outcomes.items()]
    parts += [
        f"delta_{c}_pct={100 * (o.val_loss - none.val_loss) / none.val_loss:.3f}"
        for c, o in outcomes.items()
        if c != "none"
    ]
    parts += [
        f"bytes_{c}={o.bytes_per_step / none.bytes_per_step:.3f}" for c, o in outcomes.items() if c != "none"
    ]
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="12 steps (about a minute)")
    parser.add_argument(
        "--model", help="a folder with config.json and tokenizer files (trained from fresh weights)"
    )
    parser.add_argument("--data", help="a .txt file or a folder of them")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (12 if args.quick else 60)
    settings = CompressionSettings(steps=steps, model=args.model, data=args.data)
    outcomes = run_compression(settings)
    print(f"{'compression':<12} {'first loss':>10} {'last loss':>10} {'val loss':>10} {'bytes/step':>12}")
    for name, o in outcomes.items():
        print(
            f"{name:<12} {o.losses[0]:>10.4f} {o.losses[-1]:>10.4f} {o.val_loss:>10.4f} {o.bytes_per_step:>12,.0f}"
        )
    print(summary_line(outcomes), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
