"""``titanic-verify``: does Titanic split this model exactly?

Splits a causal LM into K stages, hosts them in separate processes connected by real
WebSockets on loopback (or in memory with ``--transport memory``), runs one training step on a
random padded batch, and compares the loss and every parameter gradient with the unsplit model.
The data owner hosts the first and the last stage (U-shape) unless ``--layout all-remote``.
With ``--path chain`` the hosts hand activations and gradients to each other (each accepting
only its neighbours' tokens and the owner's) and the owner feeds only the ends of the chain.

It prints a table and ends with ``max_abs_diff=<x> stages=<K> model=<name>``; the exit status is
1 when the difference is above ``--tolerance``. Dropout is off (modules in eval mode) on both
sides, since its random masks differ between processes; gradients are computed all the same.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .host import StageHost
from .models import load_causal_lm
from .partition import (
    StageModule,
    StageSpec,
    causal_lm_loss,
    even_stage_specs,
    load_stage,
    save_stage_weights,
    split_model,
    tie_stage_weights,
)
from .pipeline import Pipeline, PipelineSettings, SplitModel
from .remote import RemoteStage, StageClient
from .runtime import EventLoopThread
from .serve import StageHostProcess
from .transport import memory_pipe

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyOptions:
    """What to check; the CLI fills it."""

    model: str = DEFAULT_MODEL  # hub name, local directory, .gguf file, or "smollm2"
    stages: int = 4  # K
    attn_implementation: str | None = None  # eager, sdpa, ... (None: the model's default)
    micro_batches: int = 1  # M; 1 uses the autograd-function path (loss.backward())
    schedule: str = "1f1b"  # with M > 1: gpipe or 1f1b
    transport: str = "websocket"  # websocket (separate processes) or memory (one process)
    layout: str = "u-shape"  # u-shape: the owner keeps first and last stage; all-remote: it keeps none
    path: str = "relay"  # relay: every boundary through the owner; chain: host to host (websocket only)
    batch_size: int = 2
    seq_len: int = 24
    tolerance: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stages < 2:
            raise ValueError("--stages must be at least 2")
        if self.transport not in ("websocket", "memory"):
            raise ValueError("--transport must be websocket or memory")
        if self.layout not in ("u-shape", "all-remote"):
            raise ValueError("--layout must be u-shape or all-remote")
        if self.path not in ("relay", "chain"):
            raise ValueError("--path must be relay or chain")
        if self.path == "chain" and self.transport != "websocket":
            raise ValueError("--path chain needs --transport websocket: hosts connect to each other")
        if self.batch_size < self.micro_batches:
            raise ValueError("--batch-size must be at least --micro-batches")


@dataclass(frozen=True, slots=True)
class StageReport:
    spec: StageSpec
    where: str
    num_params: int
    max_abs_diff: float


@dataclass(frozen=True, slots=True)
class VerifyReport:
    model: str
    stages: list[StageReport]
    loss_whole: float
    loss_split: float
    max_abs_diff: float  # over the loss and every gradient
    missing: list[str]  # parameters with a gradient in the whole model but none from the split


def padded_batch(vocab_size: int, batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random token ids with right padding on odd rows and left padding on the row after."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for row in range(1, batch):
        pad = max(1, seq_len // 4)
        if row % 2:
            mask[row, seq_len - pad :] = 0
        else:
            mask[row, :pad] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _whole_step(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return float(out.loss.detach())


def _local_grads(stages: dict[int, StageModule]) -> dict[int, dict[str, torch.Tensor]]:
    """Gradients of the local stages by whole-model name; a tied weight counts once."""
    seen: set[int] = set()
    grads: dict[int, dict[str, torch.Tensor]] = {}
    for index in sorted(stages):
        grads[index] = {}
        for name, p in stages[index].named_model_parameters():
            if id(p) not in seen and p.grad is not None:
                seen.add(id(p))
                grads[index][name] = p.grad
    return grads


def run_verify(opts: VerifyOptions, *, log: bool = True) -> VerifyReport:
    """Split ``opts.model``, run one step both ways, and compare."""
    torch.manual_seed(opts.seed)
    model = load_causal_lm(opts.model, dtype=torch.float32, attn_implementation=opts.attn_implementation)
    model.eval()  # dropout off on both sides; autograd is unaffected
    config = model.config
    num_layers = int(config.num_hidden_layers)
    if opts.stages > num_layers:
        raise ValueError(f"{opts.model} has {num_layers} blocks; it cannot be cut into {opts.stages} stages")
    specs = even_stage_specs(num_layers, opts.stages)
    ids, mask, labels = padded_batch(int(config.vocab_size), opts.batch_size, opts.seq_len, opts.seed)

    loss_whole = _whole_step(model, ids, mask, labels)
    whole_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    remote_indices = [s.index for s in specs]
    if opts.layout == "u-shape":
        remote_indices = remote_indices[1:-1]
    run_id = f"verify-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="titanic-verify-") as tmp:
        tmpdir = Path(tmp)
        cfg = config.__class__.from_dict(config.to_dict())
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(tmpdir)
        files = {}
        split = split_model(model, specs)
        if opts.layout == "all-remote" and split[0].tied_embeddings and len(specs) > 1:
            # The first stage's host and the last one's would each hold a copy of the tied weight;
            # the bridge ties weights only within one process (the owner's, in the U-shape), so the
            # head's share of the gradient never reaches the embedding and the check could only fail.
            raise ValueError(
                f"{opts.model} ties its head to its input embeddings; with --layout all-remote they would "
                "live on two hosts, and the bridge ties weights only within one process: verify it with "
                "--layout u-shape (what training uses)"
            )
        for stage in split:
            files[stage.spec.index] = tmpdir / f"stage-{stage.spec.index}.safetensors"
            save_stage_weights(stage, files[stage.spec.index])
        del model
        attn = opts.attn_implementation
        local = {
            s.index: load_stage(cfg, s, [str(files[s.index])], attn_implementation=attn)
            for s in specs
            if s.index not in remote_indices
        }
        for module in local.values():
            module.eval()
        if 0 in local and len(specs) - 1 in local and local[0].tied_embeddings:
            tie_stage_weights(local[0], local[len(specs) - 1])
        procs: list[StageHostProcess] = []
        runtime = EventLoopThread()
        memory_hosts: list[StageHost] = []
        try:
            where: dict[int, str] = {i: "owner (this process)" for i in local}
            clients: dict[int, StageClient] = {}
            if opts.transport == "websocket":
                owner_token = secrets.token_urlsafe(16)
                tokens = {i: secrets.token_urlsafe(16) for i in remote_indices}  # each host's own
                for i in remote_indices:  # start them all, then wait: they load in parallel
                    neighbours = [tokens[j] for j in (i - 1, i + 1) if j in tokens]
                    procs.append(StageHostProcess(tmpdir, [files[i]], [specs[i]], run_id=run_id,
                                                  attn_implementation=opts.attn_implementation, token=owner_token,
                                                  peer_tokens=neighbours if opts.path == "chain" else ()))  # fmt: skip
                urls = {i: proc.url for i, proc in zip(remote_indices, procs, strict=True)}
                for i, proc in zip(remote_indices, procs, strict=True):
                    where[i] = proc.url
                    if opts.path == "chain":
                        nxt = {i: urls[i + 1]} if i + 1 in urls else {}
                        prev = {i: urls[i - 1]} if i - 1 in urls else {}
                        proc.set_route(nxt, prev, token=tokens[i])
                    clients[i] = runtime.run(
                        StageClient.connect(proc.url, run_id=run_id, stage=i, token=owner_token)
                    )
            else:
                for i in remote_indices:
                    module = load_stage(cfg, specs[i], [str(files[i])], attn_implementation=attn)
                    module.eval()
                    host = StageHost({i: module}, run_id=run_id)
                    memory_hosts.append(host)
                    a, b = memory_pipe()
                    runtime.submit(host.serve(b))
                    clients[i] = StageClient(a, run_id=run_id, stage=i)
                    where[i] = "in-memory host"

            loss_split, stage_grads = _split_step(opts, specs, local, clients, runtime, ids, mask, labels)
            for i, client in clients.items():
                stage_grads[i] = runtime.run(client.named_grads())
                runtime.run(client.close())
        finally:
            runtime.close()
            for proc in procs:
                proc.close()
            for host in memory_hosts:
                host.close()

    diffs: dict[int, float] = {}
    counts: dict[int, int] = {}
    split_grads = {name: g for grads in stage_grads.values() for name, g in grads.items()}
    owner_of = {name: i for i, grads in stage_grads.items() for name in grads}
    missing = [name for name in whole_grads if name not in split_grads]
    for name, g in whole_grads.items():
        got = split_grads.get(name)
        stage_index = owner_of.get(name, -1)
        counts[stage_index] = counts.get(stage_index, 0) + g.numel()
        d = float((got.float() - g.float()).abs().max()) if got is not None and got.numel() else float("inf")
        diffs[stage_index] = max(diffs.get(stage_index, 0.0), d if got is not None else float("inf"))
    loss_diff = abs(loss_whole - loss_split)
    stages = [
        StageReport(spec=s, where=where[s.index], num_params=counts.get(s.index, 0),
                    max_abs_diff=diffs.get(s.index, 0.0))
        for s in specs
    ]  # fmt: skip
    overall = max([loss_diff, *diffs.values()]) if diffs else loss_diff
    report = VerifyReport(
        model=opts.model,
        stages=stages,
        loss_whole=loss_whole,
        loss_split=loss_split,
        max_abs_diff=overall,
        missing=missing,
    )
    if log:
        print(format_report(report, opts))
    return report


def _split_step(
    opts: VerifyOptions,
    specs: Sequence[StageSpec],
    local: dict[int, StageModule],
    clients: dict[int, StageClient],
    runtime: EventLoopThread,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[float, dict[int, dict[str, torch.Tensor]]]:
    if opts.micro_batches == 1 and opts.path == "relay":
        # The autograd-function path: one graph, loss.backward() reaches every host.
        modules: list[nn.Module] = [
            local[s.index] if s.index in local else RemoteStage(clients[s.index], runtime) for s in specs
        ]
        split = SplitModel(modules)
        logits = split(ids, attention_mask=mask)
        loss = causal_lm_loss(logits, labels)
        loss.backward()
        loss_value = float(loss.detach())
    else:
        chain = [local[s.index] if s.index in local else clients[s.index] for s in specs]
        settings = PipelineSettings(micro_batches=opts.micro_batches, schedule=opts.schedule, path=opts.path)  # type: ignore[arg-type]
        pipeline = Pipeline(chain, runtime, settings)
        try:
            loss_value = pipeline.train_step(ids, mask, labels).loss
        finally:
            pipeline.close()
    return loss_value, _local_grads(local)


def format_report(report: VerifyReport, opts: VerifyOptions) -> str:
    rows = [("stage", "blocks", "host", "params", "max |grad diff|")]
    for s in report.stages:
        blocks = f"{s.spec.layer_start}-{s.spec.layer_end - 1}" if s.spec.layer_end > s.spec.layer_start else "-"
        extra = ("emb+" if s.spec.is_first else "") + blocks + ("+head" if s.spec.is_last else "")
        rows.append((str(s.spec.index), extra, s.where, f"{s.num_params:,}", f"{s.max_abs_diff:.3e}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"loss whole={report.loss_whole:.6f} split={report.loss_split:.6f} "
        f"diff={abs(report.loss_whole - report.loss_split):.3e}"
    )
    if report.missing:
        lines.append(f"MISSING gradients from the split model: {', '.join(report.missing[:5])}")
    verdict = "OK" if report.max_abs_diff <= opts.tolerance and not report.missing else "MISMATCH"
    lines.append(
        f"{verdict}: tolerance {opts.tolerance:g}, transport {opts.transport}, layout {opts.layout}, "
        f"path {opts.path}, micro-batches {opts.micro_batches}"
    )
    lines.append(f"max_abs_diff={report.max_abs_diff:.3e} stages={opts.stages} model={report.model}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="titanic-verify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub name, directory, .gguf file, or smollm2 (default)")
    p.add_argument("--stages", type=int, default=4, help="K, the number of stages (default 4)")
    p.add_argument("--attn-implementation", "--attn", dest="attn", default=None, help="eager, sdpa, ...")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b")
    p.add_argument("--transport", choices=["websocket", "memory"], default="websocket")
    p.add_argument("--layout", choices=["u-shape", "all-remote"], default="u-shape")
    p.add_argument(
        "--path", choices=["relay", "chain"], default="relay", help="relay (default) or chain: host to host"
    )
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # load reports and progress bars would bury the table
    transformers.utils.logging.disable_progress_bar()
    try:
        opts = VerifyOptions(
            model=args.model, stages=args.stages, attn_implementation=args.attn,
            micro_batches=args.micro_batches, schedule=args.schedule, transport=args.transport,
            layout=args.layout, path=args.path, batch_size=max(args.batch_size, args.micro_batches), seq_len=args.seq_len,
            tolerance=args.tolerance, seed=args.seed,
        )  # fmt: skip
        report = run_verify(opts)
    except ValueError as exc:
        print(f"titanic-verify: {exc}", file=sys.stderr)
        return 2
    ok = report.max_abs_diff <= opts.tolerance and not report.missing
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
