"""The cost model: how long a partition keeps a client busy, and whether it may run there.

All times are seconds per training step of one pipeline (``batch_tokens`` tokens):

* compute ``T[k, n] = train_flops_per_token[k] * batch_tokens / flops[n]``
* boundary traffic: a stage receives its input activation and sends its output forward, then
  receives the output's gradient and sends the input's gradient backward, so each direction
  carries ``batch_tokens * (in_bytes + out_bytes)``; every network boundary also costs one
  round trip per micro-batch. The first stage's input (token ids) and the last stage's output
  (logits) never leave the data owner, and neither does the boundary between two stages that
  both run on the owner.
* forward gradients (``forward_passes`` P > 0): compute is P forward passes (a third of a
  forward + backward each), each activation crosses one way only (P times per step, no
  gradient comes back), so a boundary carries ``P * batch_tokens * (in_bytes + out_bytes)``
  split evenly between the two directions (exact where ``in_bytes == out_bytes``, as between
  decoder blocks, and the links are symmetric), and a stage's memory holds its weights, a copy
  of what it trains (``weight_bytes`` at most) and one live activation, nothing for backward.
* weights: downloaded before and uploaded after every round of ``steps_per_round`` steps,
  so each step carries ``weight_bytes * (1/down + 1/up) / steps_per_round``.
* ``D[k, n]`` = boundary traffic + weights; the assignment cost is ``a * D + b * T``.

A client with capacity ``c`` is planned as ``c`` slots, each with ``1/c`` of its FLOP/s,
bandwidth and memory: what each partition gets when all slots are busy. So the memory check
per slot guarantees that any assignment the solver picks fits in the client's memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from autograd_bridge.profile import PartitionProfile

from .types import ClientProfile, PlannerSettings


@dataclass(frozen=True, slots=True, kw_only=True)
class StageDemand:
    """What one partition asks of whoever hosts it, per training step."""

    train_flops: float  # forward + backward FLOPs per step
    boundary_bytes: float  # bytes per step in each direction (activations and their gradients)
    boundaries: int  # boundaries that cross the network; each costs one rtt per micro-batch
    weight_bytes: int  # bytes of its weights, exchanged with the server once per round
    memory_bytes: int  # training memory at batch_tokens tokens per step
    one_way: bool = False  # forward gradients: boundary_bytes is the sum of both directions, not each one's


def stage_demands(partitions: Sequence[PartitionProfile], settings: PlannerSettings) -> list[StageDemand]:
    """The demand of every stage of a pipeline cut into ``partitions`` (first to last)."""
    count = len(partitions)
    tokens = settings.batch_tokens
    # With two stages or fewer every stage is the owner's, and its boundary stays on the device.
    networked = count >= 3
    demands = []
    for k, part in enumerate(partitions):
        has_input = networked and k > 0
        has_output = networked and k < count - 1
        in_bytes = partitions[k - 1].activation_bytes_per_token if has_input else 0
        out_bytes = part.activation_bytes_per_token if has_output else 0
        passes = settings.forward_passes
        if passes:
            demands.append(_forward_only(part, tokens, passes, in_bytes, out_bytes, int(has_input) + int(has_output)))
            continue
        demands.append(
            StageDemand(
                train_flops=part.train_flops_per_token * tokens,
                boundary_bytes=float(tokens * (in_bytes + out_bytes)),
                boundaries=int(has_input) + int(has_output),
                weight_bytes=part.weight_bytes,
                memory_bytes=part.train_memory_bytes(tokens),
            )
        )
    return demands


def _forward_only(part: PartitionProfile, tokens: int, passes: int, in_bytes: int, out_bytes: int, boundaries: int) -> StageDemand:
    """A stage's demand under forward gradients: ``passes`` forwards, activations one way, nothing kept."""
    forward_flops = part.train_flops_per_token / 3  # profile: training is 3x the forward
    live = max(in_bytes, out_bytes, part.activation_bytes_per_token) * tokens  # one activation at a time
    return StageDemand(
        train_flops=forward_flops * tokens * passes,
        boundary_bytes=float(passes * tokens * (in_bytes + out_bytes)),
        boundaries=boundaries,
        weight_bytes=part.weight_bytes,
        memory_bytes=2 * part.weight_bytes + live,
        one_way=True,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Slots:
    """Per client, the share of the device that one partition gets (arrays of shape (N,))."""

    flops: NDArray[np.float64]
    down: NDArray[np.float64]  # download bytes/s
    up: NDArray[np.float64]  # upload bytes/s
    rtt: NDArray[np.float64]
    memory: NDArray[np.float64]
    capacity: NDArray[np.int64]

    @classmethod
    def of(cls, clients: Sequence[ClientProfile], *, shared: bool = True) -> Slots:
        """Slot shares of ``clients``; ``shared=False`` gives whole devices (the data owners)."""
        cap = np.array([c.capacity if shared else 1 for c in clients], dtype=np.int64)
        share = cap.astype(np.float64)

        def column(name: str) -> NDArray[np.float64]:
            return np.array([float(getattr(c, name)) for c in clients], dtype=np.float64)

        return cls(
            flops=column("flops_per_s") / share,
            down=column("download_bytes_per_s") / share,
            up=column("upload_bytes_per_s") / share,
            rtt=column("rtt_s"),
            memory=np.floor(column("memory_bytes") / share),
            capacity=cap,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CostTerms:
    """The estimates for every (partition, client) pair, arrays of shape (K, N)."""

    compute: NDArray[np.float64]  # T: seconds of forward + backward per step
    transfer: NDArray[np.float64]  # D: boundary traffic + latency + amortised weight exchange
    step: NDArray[np.float64]  # compute + boundary traffic + latency: time the stage holds the slot
    cost: NDArray[np.float64]  # a * D + b * T
    fits: NDArray[np.bool_]  # the partition's training memory fits in the slot
    fast_enough: NDArray[np.bool_]  # step <= max_step_time_s (all True without a bound)

    @property
    def eligible(self) -> NDArray[np.bool_]:
        """Pairs the solver may use: a pair whose cost overflows (a denormal FLOP/s, say) is left out."""
        return self.fits & self.fast_enough & np.isfinite(self.cost)


def cost_terms(demands: Sequence[StageDemand], slots: Slots, settings: PlannerSettings) -> CostTerms:
    """Estimate every partition on every slot (vectorised: (K, 1) against (1, N))."""
    flops = np.array([d.train_flops for d in demands], dtype=np.float64)[:, None]
    # A one-way demand's bytes are both directions together: half each way on average.
    boundary = np.array([d.boundary_bytes / (2 if d.one_way else 1) for d in demands], dtype=np.float64)[:, None]
    crossings = np.array([d.boundaries for d in demands], dtype=np.float64)[:, None]
    weights = np.array([d.weight_bytes for d in demands], dtype=np.float64)[:, None]
    memory = np.array([d.memory_bytes for d in demands], dtype=np.float64)[:, None]
    per_byte = (1.0 / slots.down + 1.0 / slots.up)[None, :]  # seconds per byte each way
    compute = flops / slots.flops[None, :]
    traffic = boundary * per_byte + crossings * settings.micro_batches * slots.rtt[None, :]
    transfer = traffic + weights * per_byte / settings.steps_per_round
    step = compute + traffic
    bound = settings.max_step_time_s
    return CostTerms(
        compute=compute,
        transfer=transfer,
        step=step,
        cost=settings.transfer_weight * transfer + settings.compute_weight * compute,
        fits=memory <= slots.memory[None, :],
        fast_enough=np.ones_like(step, dtype=bool) if bound is None else step <= bound,
    )
