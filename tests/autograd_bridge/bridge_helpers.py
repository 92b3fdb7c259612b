"""Builds split models whose middle stages live on in-memory stage hosts (real hosts, real frames)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from autograd_bridge.host import HostSettings, StageHost
from autograd_bridge.partition import StageModule, even_stage_specs, split_model
from autograd_bridge.remote import ClientSettings, StageClient
from autograd_bridge.runtime import EventLoopThread
from autograd_bridge.transport import memory_pipe


@dataclass
class MemorySplit:
    """A U-shaped split: local first/last stages, middle stages on StageHosts over memory pipes."""

    runtime: EventLoopThread
    stages: list[StageModule]  # all stages, sharing parameters with a deep copy of the model
    hosts: dict[int, StageHost] = field(default_factory=dict)
    clients: dict[int, StageClient] = field(default_factory=dict)

    def chain(self) -> list[StageModule | StageClient]:
        """The owner's view: local modules at both ends, clients in the middle."""
        return [self.clients.get(s.spec.index, s) for s in self.stages]

    def close(self) -> None:
        for client in self.clients.values():
            self.runtime.run(client.close())
        self.runtime.close()
        for host in self.hosts.values():
            host.close()


def memory_split(
    model: PreTrainedModel,
    num_stages: int,
    *,
    host_settings: HostSettings | None = None,
    client_settings: ClientSettings | None = None,
    run_id: str = "test-run",
) -> MemorySplit:
    """Split a copy of ``model`` and serve stages 1..K-2 from in-memory hosts."""
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    copy.eval()
    specs = even_stage_specs(int(model.config.num_hidden_layers), num_stages)
    split = MemorySplit(runtime=EventLoopThread(), stages=split_model(copy, specs))
    for stage in split.stages[1:-1]:
        i = stage.spec.index
        host = StageHost({i: stage}, run_id=run_id, settings=host_settings)
        owner_end, host_end = memory_pipe()
        split.runtime.submit(host.serve(host_end))
        split.hosts[i] = host
        split.clients[i] = StageClient(owner_end, run_id=run_id, stage=i, settings=client_settings)
    return split


def grads_by_name(stages: list[StageModule]) -> dict[str, torch.Tensor]:
    """Every stage's parameter gradients under whole-model names (tied weights once)."""
    out: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, p in stage.named_model_parameters():
            if p.grad is not None and name not in out:
                out[name] = p.grad.clone()
    return out
