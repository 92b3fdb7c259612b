"""Reference comparison: centralized vs classic FedAvg vs Titanic cases 1, 2 and 3.

The same model, data and number of optimizer steps, trained five ways:

* centralized: one process, the whole model, every owner's batches in turn;
* fedavg: every owner trains a whole copy locally each round, the server averages the
  copies (``server.training.aggregation.FedAvg``, weighted by training samples);
* case 1: one owner holding all the data (the same batches in the same order as
  centralized) drives a U-shaped pipeline whose middle stages live on stage hosts;
* case 2: the owners take turns on one shared pipeline; at a handover the next owner
  receives the end stages and their optimizer state;
* case 3: each owner drives its own pipeline in parallel; at round end every partition's
  copies are merged with FedAvg.

Cases 1 and 2 must reproduce the centralized loss curve (fp32 rounding). The stage hosts
are real :class:`~autograd_bridge.host.StageHost` s reached over in-memory pipes in this
process (real frames, no sockets); the merge of case 3 reads and writes the partitions in
process. Data: the King James Bible split by book across the owners (non-IID).

    python -m bench.quality --quick      # tiny Llama, GPT-2 tokenizer, about 2 minutes on 2 cores
    python -m bench.quality              # SmolLM2-135M with LoRA adapters
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from autograd_bridge.host import HostSettings, StageHost
from autograd_bridge.lora import add_lora, load_lora_state, lora_state
from autograd_bridge.models import gpt2_tokenizer, load_causal_lm, load_tokenizer, tiny_config
from autograd_bridge.partition import StageModule, causal_lm_loss, even_stage_specs, split_model
from autograd_bridge.pipeline import Pipeline
from autograd_bridge.remote import StageClient
from autograd_bridge.runtime import EventLoopThread
from autograd_bridge.transport import memory_pipe
from client.data import DataSettings, OwnerDataset
from client.training import build_local_optimizer, evaluate, train_steps
from server.training.aggregation import ClientUpdate, FedAvg
from testbed.demo_data import write_owner_splits

METHODS = ("centralized", "fedavg", "case1", "case2", "case3")


@dataclass(frozen=True, slots=True, kw_only=True)
class QualitySettings:
    """One comparison run."""

    model: str = "tiny"  # "tiny" (a small Llama from a config) or a name load_causal_lm takes
    owners: int = 2  # data owners (KJV split by book among them)
    rounds: int = 3  # rounds; ppl is measured before the first and after each
    steps: int = 4  # optimizer steps per owner per round (each method does owners * steps per round)
    batch_size: int = 4  # sequences per step
    seq_len: int = 64  # tokens per sequence
    num_stages: int = 3  # K: pipeline stages of the Titanic cases
    lr: float = 2e-3  # AdamW learning rate, weight decay 0, everywhere
    max_chars_per_owner: int | None = 60_000  # text per owner (None: all of its books)
    lora: bool = False  # train LoRA adapters only (they alone are merged)
    lora_r: int = 8  # adapter rank
    lora_alpha: int = 16  # adapter scale numerator (scale = alpha / r)
    tiny_layers: int = 4  # decoder blocks of the tiny model
    tiny_width: int = 64  # hidden size of the tiny model
    eval_batch_size: int = 8  # sequences per validation batch
    seed: int = 0  # model init, adapter init, data split and order

    def __post_init__(self) -> None:
        if self.owners < 1 or self.rounds < 1 or self.steps < 1:
            raise ValueError("owners, rounds and steps must each be at least 1")
        if self.num_stages < 3:
            raise ValueError("num_stages must be at least 3 so that middle stages live on hosts")


@dataclass(slots=True)
class QualityResult:
    """What a run measured."""

    ppl: dict[str, list[float]]  # method -> validation perplexity before round 1, after each round
    losses: dict[str, list[float]]  # method -> training loss per optimizer step, in order
    case12_max_loss_diff: float  # max |loss - centralized loss| over case 1 and case 2 steps
    seconds: float  # wall time of the training and evaluation
    notes: list[str] = field(default_factory=list)

    def summary_line(self) -> str:
        """The one ``key=value`` line the benchmark ends with."""
        final = " ".join(f"ppl_{method}={self.ppl[method][-1]:.4f}" for method in METHODS)
        return f"{final} case12_max_loss_diff={self.case12_max_loss_diff:.3e}"

    def table(self) -> str:
        """Validation perplexity per round (round 0: before training) and method."""
        lines = ["round " + " ".join(f"{m:>12}" for m in METHODS)]
        for r in range(len(self.ppl[METHODS[0]])):
            lines.append(f"{r:>5} " + " ".join(f"{self.ppl[m][r]:>12.4f}" for m in METHODS))
        return "\n".join(lines)


# --------------------------------------------------------------------------- model and data


def _base_model(settings: QualitySettings, vocab_size: int) -> PreTrainedModel:
    if settings.model != "tiny":
        return load_causal_lm(settings.model)
    torch.manual_seed(settings.seed)
    config = tiny_config(
        "llama",
        vocab_size=vocab_size,
        hidden_size=settings.tiny_width,
        intermediate_size=2 * settings.tiny_width,
        num_hidden_layers=settings.tiny_layers,
        max_position_embeddings=max(128, settings.seq_len),
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def owner_datasets(settings: QualitySettings, tokenizer: Any) -> list[OwnerDataset]:
    """Each owner's KJV books, tokenized and packed, with a held-out validation split."""
    data = DataSettings(seq_len=settings.seq_len, val_fraction=0.1, seed=settings.seed)
    with tempfile.TemporaryDirectory(prefix="titanic-quality-") as tmp:
        splits = write_owner_splits(tmp, settings.owners, max_chars_per_owner=settings.max_chars_per_owner)
        return [OwnerDataset.from_path(split.path, tokenizer, settings=data) for split in splits]


class _Models:
    """Fresh copies of the starting model (and of the starting adapters, with LoRA)."""

    def __init__(self, base: PreTrainedModel, settings: QualitySettings) -> None:
        self.base = base
        self.settings = settings
        self.lora_init: dict[str, Tensor] | None = None
        if settings.lora:
            probe = self.copy()
            torch.manual_seed(settings.seed)
            add_lora(probe, r=settings.lora_r, alpha=settings.lora_alpha)
            self.lora_init = lora_state(probe)

    def copy(self) -> PreTrainedModel:
        model = type(self.base)(self.base.config)
        model.load_state_dict(self.base.state_dict())
        return model.train()

    def adapt(self, module: nn.Module) -> None:
        """Add the starting adapters to ``module`` (a whole model or a stage), when LoRA is on."""
        if self.lora_init is not None:
            add_lora(module, r=self.settings.lora_r, alpha=self.settings.lora_alpha)
            load_lora_state(module, self.lora_init)

    def whole(self) -> StageModule:
        """The whole model as one stage (trainable part adapted), for centralized and FedAvg."""
        model = self.copy()
        stage = split_model(model, even_stage_specs(int(model.config.num_hidden_layers), 1))[0]
        self.adapt(stage)
        return stage


def trained_state(stage: nn.Module, lora: bool) -> dict[str, Tensor]:
    """What travels and is merged: the adapters with LoRA, else every trainable tensor."""
    if lora:
        return lora_state(stage)
    named = getattr(stage, "named_model_parameters", stage.named_parameters)
    return {name: p.detach().clone() for name, p in named() if p.requires_grad}


def load_trained_state(stage: nn.Module, state: dict[str, Tensor], lora: bool) -> None:
    """Write a merged ``trained_state`` back into ``stage``."""
    if lora:
        load_lora_state(stage, state)
        return
    named = getattr(stage, "named_model_parameters", stage.named_parameters)
    with torch.no_grad():
        for name, p in named():
            if name in state:
                p.copy_(state[name])


# --------------------------------------------------------------------------- pipelines


class _Deployment:
    """One set of stages: middle ones served by StageHosts over memory pipes, ends kept local."""

    def __init__(self, models: _Models, runtime: EventLoopThread, run_id: str) -> None:
        settings = models.settings
        model = models.copy()
        specs = even_stage_specs(int(model.config.num_hidden_layers), settings.num_stages)
        self.stages = split_model(model, specs)
        for stage in self.stages:
            models.adapt(stage)
        self.runtime = runtime
        self.run_id = run_id
        host_settings = HostSettings(optimizer="adamw", lr=settings.lr, weight_decay=0.0)
        # Hosts build their optimizer over what requires grad, so they come after the adapters.
        self.hosts = {s.spec.index: StageHost({s.spec.index: s}, run_id=run_id, settings=host_settings)
                      for s in self.stages[1:-1]}
        self.clients: list[StageClient] = []
        self.pipelines: list[Pipeline] = []

    def pipeline(self, ends: Sequence[StageModule] | None = None) -> Pipeline:
        """A new owner connection: ``ends`` (first, last; default this deployment's) plus the hosts."""
        first, last = ends if ends is not None else (self.stages[0], self.stages[-1])
        chain: list[StageModule | StageClient] = [first]
        for index, host in self.hosts.items():
            owner_end, host_end = memory_pipe()
            self.runtime.submit(host.serve(host_end))
            client = StageClient(owner_end, run_id=self.run_id, stage=index)
            self.clients.append(client)
            chain.append(client)
        chain.append(last)
        pipeline = Pipeline(chain, self.runtime)
        self.pipelines.append(pipeline)
        return pipeline

    def close(self) -> None:
        for pipeline in self.pipelines:
            pipeline.close()
        for client in self.clients:
            self.runtime.run(client.close())
        for host in self.hosts.values():
            host.close()


# --------------------------------------------------------------------------- the five methods


class _Bench:
    def __init__(self, settings: QualitySettings, models: _Models, datasets: list[OwnerDataset]) -> None:
        self.s = settings
        self.models = models
        self.datasets = datasets
        self.runtime = EventLoopThread()
        self.weights = [self._val_tokens(d) for d in datasets]

    def _val_tokens(self, dataset: OwnerDataset) -> int:
        return sum(b.num_targets for b in dataset.validation_batches(self.s.eval_batch_size))

    def ppl(self, pipelines: Sequence[Pipeline]) -> float:
        """Token-weighted perplexity over every owner's validation split (owner k via pipelines[k])."""
        losses = [evaluate(p, d, self.s.eval_batch_size)[0] for p, d in zip(pipelines, self.datasets, strict=True)]
        return math.exp(sum(w * x for w, x in zip(self.weights, losses, strict=True)) / sum(self.weights))

    def _optimizer(self, stages: Sequence[nn.Module]) -> torch.optim.Optimizer:
        return build_local_optimizer(stages, lr=self.s.lr)

    def centralized(self) -> tuple[list[float], list[float]]:
        stage = self.models.whole()
        optimizer = self._optimizer([stage])
        evaluator = Pipeline([stage], self.runtime)
        losses: list[float] = []
        ppl = [self.ppl([evaluator] * self.s.owners)]
        for r in range(self.s.rounds):
            for dataset in self.datasets:
                stream = dataset.stream(self.s.batch_size, start=r * self.s.steps)
                for _ in range(self.s.steps):
                    batch = next(stream)
                    logits = stage(batch.input_ids, attention_mask=batch.attention_mask)  # (B, T, V)
                    loss = causal_lm_loss(logits, batch.labels)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
            ppl.append(self.ppl([evaluator] * self.s.owners))
        evaluator.close()
        return losses, ppl

    def fedavg(self) -> tuple[list[float], list[float]]:
        copies = [self.models.whole() for _ in self.datasets]
        optimizers = [self._optimizer([c]) for c in copies]
        pipelines = [Pipeline([c], self.runtime) for c in copies]
        global_state = trained_state(copies[0], self.s.lora)
        losses: list[float] = []
        ppl = [self.ppl(pipelines)]
        for r in range(self.s.rounds):
            updates = []
            for copy, optimizer, pipeline, dataset in zip(copies, optimizers, pipelines, self.datasets, strict=True):
                load_trained_state(copy, global_state, self.s.lora)
                losses += train_steps(pipeline, dataset, steps=self.s.steps, batch_size=self.s.batch_size,
                                      start=r * self.s.steps, local_optimizer=optimizer)
                updates.append(ClientUpdate(state=trained_state(copy, self.s.lora), num_samples=dataset.num_samples))
            global_state = FedAvg().aggregate(global_state, updates)
            for copy in copies:
                load_trained_state(copy, global_state, self.s.lora)
            ppl.append(self.ppl(pipelines))
        for pipeline in pipelines:
            pipeline.close()
        return losses, ppl

    def case1(self) -> tuple[list[float], list[float]]:
        deployment = _Deployment(self.models, self.runtime, "case1")
        try:
            pipeline = deployment.pipeline()
            optimizer = self._optimizer([deployment.stages[0], deployment.stages[-1]])
            losses: list[float] = []
            ppl = [self.ppl([pipeline] * self.s.owners)]
            for r in range(self.s.rounds):
                for dataset in self.datasets:  # one owner holding every book, in the centralized order
                    losses += train_steps(pipeline, dataset, steps=self.s.steps, batch_size=self.s.batch_size,
                                          start=r * self.s.steps, local_optimizer=optimizer)
                ppl.append(self.ppl([pipeline] * self.s.owners))
            return losses, ppl
        finally:
            deployment.close()

    def case2(self) -> tuple[list[float], list[float]]:
        deployment = _Deployment(self.models, self.runtime, "case2")
        try:
            # Each owner keeps its own copy of the end stages and its own connections to the hosts.
            ends = [self._ends(deployment) for _ in self.datasets]
            pipelines = [deployment.pipeline(e) for e in ends]
            optimizers = [self._optimizer(e) for e in ends]
            losses: list[float] = []
            holder = 0
            ppl = [self.ppl([pipelines[holder]] * self.s.owners)]
            for r in range(self.s.rounds):
                for k, dataset in enumerate(self.datasets):
                    self._hand_over(ends[holder], optimizers[holder], pipelines[holder],
                                    ends[k], optimizers[k], pipelines[k])
                    holder = k
                    losses += train_steps(pipelines[k], dataset, steps=self.s.steps, batch_size=self.s.batch_size,
                                          start=r * self.s.steps, local_optimizer=optimizers[k])
                ppl.append(self.ppl([pipelines[holder]] * self.s.owners))
            return losses, ppl
        finally:
            deployment.close()

    def _ends(self, deployment: _Deployment) -> list[StageModule]:
        stages = split_model(self.models.copy(), [s.spec for s in deployment.stages])
        ends = [stages[0], stages[-1]]
        for stage in ends:
            self.models.adapt(stage)
        return ends

    @staticmethod
    def _hand_over(
        ends: list[StageModule], optimizer: torch.optim.Optimizer, pipeline: Pipeline,
        next_ends: list[StageModule], next_optimizer: torch.optim.Optimizer, next_pipeline: Pipeline,
    ) -> None:
        """The next owner takes the end stages' weights, their optimizer state and the step count."""
        if next_pipeline is pipeline:
            return
        for mine, theirs in zip(ends, next_ends, strict=True):
            theirs.load_state_dict(mine.state_dict())
        next_optimizer.load_state_dict(optimizer.state_dict())
        next_pipeline.step = pipeline.step

    def case3(self) -> tuple[list[float], list[float]]:
        deployments = [_Deployment(self.models, self.runtime, f"case3-owner{k}") for k in range(self.s.owners)]
        try:
            pipelines = [d.pipeline() for d in deployments]
            optimizers = [self._optimizer([d.stages[0], d.stages[-1]]) for d in deployments]
            global_states = [trained_state(s, self.s.lora) for s in deployments[0].stages]
            losses: list[float] = []
            ppl = [self.ppl(pipelines)]
            for r in range(self.s.rounds):
                for pipeline, optimizer, dataset in zip(pipelines, optimizers, self.datasets, strict=True):
                    losses += train_steps(pipeline, dataset, steps=self.s.steps, batch_size=self.s.batch_size,
                                          start=r * self.s.steps, local_optimizer=optimizer)
                for i in range(self.s.num_stages):
                    updates = [ClientUpdate(state=trained_state(d.stages[i], self.s.lora), num_samples=ds.num_samples)
                               for d, ds in zip(deployments, self.datasets, strict=True)]
                    global_states[i] = FedAvg().aggregate(global_states[i], updates)
                    for d in deployments:
                        load_trained_state(d.stages[i], global_states[i], self.s.lora)
                ppl.append(self.ppl(pipelines))
            return losses, ppl
        finally:
            for d in deployments:
                d.close()

    def close(self) -> None:
        self.runtime.close()


def run_quality(
    settings: QualitySettings, *, tokenizer: Any | None = None, log: Callable[[str], None] | None = None
) -> QualityResult:
    """Train the five ways and measure; ``tokenizer`` defaults to the model's (GPT-2 BPE for tiny)."""
    say = log or (lambda _line: None)
    if tokenizer is None:
        tokenizer = gpt2_tokenizer() if settings.model == "tiny" else load_tokenizer(settings.model)
    datasets = owner_datasets(settings, tokenizer)
    say("owners: " + ", ".join(f"{d.num_samples} train / {d.num_validation} val sequences" for d in datasets))
    models = _Models(_base_model(settings, len(tokenizer)), settings)
    bench = _Bench(settings, models, datasets)
    started = time.perf_counter()
    losses: dict[str, list[float]] = {}
    ppl: dict[str, list[float]] = {}
    try:
        for method in METHODS:
            t0 = time.perf_counter()
            losses[method], ppl[method] = getattr(bench, method)()
            say(f"{method}: {time.perf_counter() - t0:.1f} s, final ppl {ppl[method][-1]:.4f}")
    finally:
        bench.close()
    central = losses["centralized"]
    diff = max(abs(a - b) for case in ("case1", "case2") for a, b in zip(losses[case], central, strict=True))
    return QualityResult(
        ppl=ppl, losses=losses, case12_max_loss_diff=diff, seconds=time.perf_counter() - started,
        notes=["stage hosts: real StageHosts over in-memory pipes in this process (no network)"],
    )


def quick_settings() -> QualitySettings:
    """The ``--quick`` configuration: a tiny Llama with the GPT-2 vocabulary, full fine-tuning."""
    return QualitySettings()


def full_settings() -> QualitySettings:
    """The full configuration: SmolLM2-135M with LoRA adapters."""
    return QualitySettings(model="smollm2", lora=True, lr=1e-3, seq_len=128, batch_size=4, steps=5, rounds=3,
                           max_chars_per_owner=120_000, eval_batch_size=4)


def _parse(argv: Sequence[str] | None) -> QualitySettings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny Llama, small data (about 2 minutes on 2 cores)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="optimizer steps per owner per round")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    settings = quick_settings() if args.quick else full_settings()
    overrides = {key: value for key in ("rounds", "steps") if (value := getattr(args, key)) is not None}
    if args.threads:
        torch.set_num_threads(args.threads)
    return QualitySettings(**{**_fields(settings), **overrides})


def _fields(settings: QualitySettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in QualitySettings.__dataclass_fields__}


def main(argv: Sequence[str] | None = None) -> int:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings = _parse(argv)
    print(f"model={settings.model} lora={settings.lora} owners={settings.owners} rounds={settings.rounds} "
          f"steps/owner/round={settings.steps} batch={settings.batch_size}x{settings.seq_len} "
          f"stages={settings.num_stages} lr={settings.lr}", flush=True)
    result = run_quality(settings, log=lambda line: print(line, flush=True))
    for note in result.notes:
        print(note)
    print("validation perplexity (round 0: before training; token-weighted over the owners)")
    print(result.table())
    print(f"total {result.seconds:.1f} s")
    print(result.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
