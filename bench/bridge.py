"""Benchmark of the autograd bridge: split training step vs unsplit, and wire throughput.

    python bench/bridge.py            # GPT-2-small-sized config + a tiny one, then the wire test
    python bench/bridge.py --quick    # smaller batches and fewer repeats (a smoke run)

Training step: the model is cut into 4 stages; the data owner (this process) hosts the first and
the last, two child processes host the middle two, connected by real WebSockets on loopback.
One step = forward, backward and the optimizer step (AdamW) on every host. The baseline is the
same model unsplit in this process, same batch, same optimizer. Split and whole steps alternate
so machine noise hits both; the figures are medians. Every process runs with
``OMP_WAIT_POLICY=PASSIVE`` (set before torch loads), so threads of an idle process do not
spin on the cores the busy one needs; the unsplit baseline runs with the same setting.

The last line is
``bridge_overhead_ratio=<split/whole, GPT-2-small-sized> tiny_overhead_ratio=<x> wire_ratio=<x>``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autograd_bridge.models import tiny_config
from autograd_bridge.partition import (
    causal_lm_loss,
    even_stage_specs,
    load_stage,
    save_stage_weights,
    split_model,
    tie_stage_weights,
)
from autograd_bridge.pipeline import SplitModel
from autograd_bridge.remote import RemoteStage, StageClient
from autograd_bridge.runtime import EventLoopThread
from autograd_bridge.serve import StageHostProcess

STAGES = 4


def gpt2_small_config() -> object:
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip


def measure_step_ratio(name: str, config: object, batch: int, seq_len: int, repeats: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    whole = AutoModelForCausalLM.from_config(config)
    whole.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, int(config.vocab_size), (batch, seq_len), generator=g)  # type: ignore[attr-defined]
    mask = torch.ones_like(ids)
    labels = ids.clone()
    lr = 1e-5
    specs = even_stage_specs(int(config.num_hidden_layers), STAGES)  # type: ignore[attr-defined]

    with tempfile.TemporaryDirectory(prefix="titanic-bench-") as tmp:
        tmpdir = Path(tmp)
        config.save_pretrained(tmpdir)  # type: ignore[attr-defined]
        files = {}
        for stage in split_model(whole, specs):
            files[stage.spec.index] = tmpdir / f"stage-{stage.spec.index}.safetensors"
            save_stage_weights(stage, files[stage.spec.index])
        first = load_stage(config, specs[0], [str(files[0])])
        last = load_stage(config, specs[-1], [str(files[STAGES - 1])])
        if first.tied_embeddings:
            tie_stage_weights(first, last)
        hosts = [
            StageHostProcess(tmpdir, [files[s.index]], [s], run_id="bench", extra_args=["--lr", str(lr)])
            for s in specs[1:-1]
        ]
        runtime = EventLoopThread()
        try:
            remotes = [
                RemoteStage(runtime.run(StageClient.connect(h.url, run_id="bench", stage=s.index)), runtime)
                for h, s in zip(hosts, specs[1:-1], strict=True)
            ]
            split = SplitModel([first, *remotes, last])
            split.train()
            local_params = list({id(p): p for p in [*first.parameters(), *last.parameters()]}.values())
            split_opt = torch.optim.AdamW(local_params, lr=lr)
            whole_opt = torch.optim.AdamW(whole.parameters(), lr=lr)

            def whole_step() -> float:
                t0 = time.perf_counter()
                loss = whole(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                whole_opt.step()
                whole_opt.zero_grad(set_to_none=True)
                return time.perf_counter() - t0

            def split_step() -> float:
                t0 = time.perf_counter()
                loss = causal_lm_loss(split(ids, attention_mask=mask), labels)
                loss.backward()
                split_opt.step()
                split_opt.zero_grad(set_to_none=True)
                split.step_remote(lr)
                return time.perf_counter() - t0

            whole_step()
            split_step()  # warm-up: allocator, first-touch of weights, connections
            whole_times, split_times = [], []
            for _ in range(repeats):
                whole_times.append(whole_step())
                split_times.append(split_step())
            for remote in remotes:
                runtime.run(remote.client.close())
        finally:
            runtime.close()
            for h in hosts:
                h.close()
    w, s = statistics.median(whole_times), statistics.median(split_times)
    print(
        f"{name:>16}: batch {batch}x{seq_len}  whole {w * 1e3:8.1f} ms  split-4 {s * 1e3:8.1f} ms  "
        f"ratio {s / w:.3f}   (whole: {', '.join(f'{t * 1e3:.0f}' for t in whole_times)}; "
        f"split: {', '.join(f'{t * 1e3:.0f}' for t in split_times)})",
        flush=True,
    )
    return {"whole_s": w, "split_s": s, "ratio": s / w}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores", flush=True)

    big = measure_step_ratio("gpt2-small-size", gpt2_small_config(), 2 if args.quick else 4, 128, repeats)
    tiny = measure_step_ratio("tiny-llama", tiny_config("llama"), 8, 64, max(repeats, 5))

    from bench.wire import measure_wire

    wire = measure_wire(rounds=2 if args.quick else 5)
    print(
        f"            wire: bridge {wire['wire_gbps']:.3f} GB/s  raw socket {wire['raw_gbps']:.3f} GB/s  "
        f"ratio {wire['wire_ratio']:.3f}",
        flush=True,
    )
    print(
        f"bridge_overhead_ratio={big['ratio']:.3f} tiny_overhead_ratio={tiny['ratio']:.3f} "
        f"wire_ratio={wire['wire_ratio']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
