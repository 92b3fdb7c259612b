"""Where to cut: how many stages, and how many decoder blocks each stage holds.

A :class:`CutSearch` cuts a group of pipelines the same way (the server merges partitions by
tensor name, so groups cut differently merge too; one cut per group keeps the search exact).
The data owners run the first and the last stage (with the embedding and the head); the other
``M = K - 2`` stages run on client slots (see costs.py). With ``K = 1`` the one stage is both
first and last: the owner holds the whole model. Which owners train alone and which share a
split is decided in pipelines.py; this module cuts one group.

**Bottleneck of a cut.** A stage's time per step on a slot is ``blocks * w / flops + comm``,
where ``comm`` is its boundary traffic and latency, the same for every middle stage (every
boundary carries one ``(B, T, C)`` hidden state). An owner runs both of its stages, so its time
is ``(embedding + head + blocks * w) / flops + comm``. Blocks are priced at the costliest
block's FLOPs and memory ``w`` and ``m``: exact for the models we target (all blocks alike),
never optimistic otherwise.

**Minimum bottleneck for a given K (exact).** For a time ``tau``, slot ``s`` can hold at most
``cap_s(tau) = min(floor((tau - comm_s) * flops_s / w), floor(memory_s / m))`` blocks and every
owner at most ``o_max(tau)``. With ``P`` pipelines sharing one cut, each middle stage's block
count is needed ``P`` times, so sorting the caps in decreasing order ``k_1 >= k_2 >= ...``, the
j-th largest stage can hold at most ``e_j = k_{jP}`` blocks (the weakest slot of its group of
``P``). A cut with bottleneck ``<= tau`` exists iff ``e_M >= 1`` and some owner share
``o <= o_max(tau)`` leaves ``M <= L - o <= sum_j e_j`` blocks for the middle. Feasibility only
grows with ``tau``, and the optimum is the time of some stage, so a binary search over the
sorted candidate times (owner with ``o`` blocks, slot with ``c`` blocks) finds the exact
minimum ``tau*(K)``.

**The counts at ``tau*``.** The middle stages are estimated on the ``P * M`` slots with the most
room at ``tau*`` (group j: the j-th P of them), where every cut within the caps has bottleneck
``tau*``. Among those cuts the planner takes the one with the least sum of stage times ``S``
(what one micro-batch waits end to end): for each feasible owner share the middle blocks go
one at a time to the stage whose time grows least with one more block, up to its cap ``e_j``,
a greedy that is optimal for a sum of convex per-stage times under one total; the owner share
with the least ``S`` wins. The owner's blocks are split evenly between its two stages (only
their sum matters: both run on the same device). The assignment solver later places the
stages by its own cost (costs.py), so the plan reports its real bottleneck next to this estimate.

**How many stages.** Fill-drain pipelining with ``m`` micro-batches takes about
``(S + (m - 1) * tau*) / m`` per step: the first micro-batch crosses every stage, the others
follow one bottleneck apart. More stages pay off only with enough micro-batches to keep them
busy. :meth:`CutSearch.best` evaluates the given stage counts (at most
``min(L + 2, 2 + slots // P)``) and takes the fastest, the fewest stages on ties. ``K = 1``
(the whole model on the owner, possible only when it fits the owner's memory) and ``K = 2``
(both stages on the owner) cost the same, so ``K = 2`` is chosen only when asked for.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .costs import Slots
from .errors import ClientsTooSlowError, InsufficientMemoryError, NotEnoughClientsError, PlanningError
from .types import PlannerSettings

_EPS = 1e-9  # relative slack when comparing a stage time with the candidate bottleneck


@dataclass(frozen=True, slots=True, kw_only=True)
class CutInputs:
    """The model, as the cut search sees it, per training step of one pipeline."""

    num_layers: int  # decoder blocks L
    edge_flops: float  # train FLOPs of the embedding and the head together
    edge_memory: float  # training memory of the embedding and the head together
    block_flops: float  # train FLOPs of the costliest block
    block_memory: float  # training memory of the largest block
    boundary_bytes: float  # bytes of one hidden state (and of its gradient) crossing a boundary

    @property
    def whole_memory(self) -> float:
        """Training memory of the whole model on one device, blocks priced as the largest."""
        return self.edge_memory + self.num_layers * self.block_memory


@dataclass(frozen=True, slots=True, kw_only=True)
class Cut:
    """A chosen cut and its estimates."""

    block_counts: tuple[int, ...]  # blocks per stage, first to last
    bottleneck_s: float  # est. seconds per step of the slowest stage (an owner: both stages)
    total_s: float  # est. sum of all stage times per step (an owner's two stages once)
    pipeline_s: float  # est. seconds per step of the whole pipeline, fill-drain (its slowest owner's)
    middle_s: tuple[float, ...] = ()  # est. seconds per step of each middle stage (none when K <= 2)


class CutSearch:
    """The cut search for one model on one set of owners and helper slots."""

    def __init__(self, model: CutInputs, owners: Slots, helpers: Slots, settings: PlannerSettings) -> None:
        self.model = model
        self.settings = settings
        self.owners = owners
        self.pipelines = owners.flops.size
        length = model.num_layers
        # One entry per slot: a client appears once per unit of capacity (never more often than
        # all middle stages of all pipelines could use).
        reps = np.minimum(helpers.capacity, max(self.pipelines * length, 1))
        self.slot_flops = np.repeat(helpers.flops, reps)
        self.slot_memory = np.repeat(helpers.memory, reps)
        self.slot_comm = np.repeat(self._comm(helpers), reps)
        self.owner_comm = self._comm(owners)
        self.w = max(model.block_flops, 1e-300)
        self.m = max(model.block_memory, 1e-300)

    # -- times ------------------------------------------------------------------------

    def _comm(self, slots: Slots) -> NDArray[np.float64]:
        """Boundary traffic + latency per step of a stage with two networked boundaries."""
        each_way = 2.0 * self.model.boundary_bytes
        return each_way * (1.0 / slots.down + 1.0 / slots.up) + 2.0 * self.settings.micro_batches * slots.rtt

    def owner_times(self, blocks: int | NDArray[np.int64], num_stages: int) -> NDArray[np.float64]:
        """(..., P) per-step time of each owner holding ``blocks`` blocks besides embedding + head."""
        blocks_arr = np.asarray(blocks, dtype=np.float64)[..., None]
        comm = self.owner_comm if num_stages >= 3 else np.zeros_like(self.owner_comm)
        return np.asarray((self.model.edge_flops + blocks_arr * self.w) / self.owners.flops + comm)

    def owner_time(self, blocks: int | NDArray[np.int64], num_stages: int) -> NDArray[np.float64]:
        """Per-step time of the slowest owner holding ``blocks`` blocks besides embedding + head."""
        return np.asarray(self.owner_times(blocks, num_stages).max(axis=-1))

    def alone_times(self) -> NDArray[np.float64]:
        """(P,) per-step time of each owner training the whole model alone (nothing crosses the network)."""
        return self.owner_times(self.model.num_layers, 1)

    def pipeline_times(self, cut: Cut) -> NDArray[np.float64]:
        """(P,) est. seconds per step of each owner's pipeline cut as ``cut`` (fill-drain; max: ``cut.pipeline_s``).

        The middle stages take ``cut.middle_s`` in every pipeline (each is priced at the weakest
        slot of its group); only the owner's share differs.
        """
        counts = cut.block_counts
        owner_blocks = counts[0] + counts[-1] if len(counts) >= 3 else sum(counts)
        owner_s = self.owner_times(owner_blocks, len(counts))
        middle_max = max(cut.middle_s, default=0.0)
        micro = self.settings.micro_batches
        return (owner_s + sum(cut.middle_s) + (micro - 1) * np.maximum(owner_s, middle_max)) / micro

    def holds_whole_model(self) -> NDArray[np.bool_]:
        """(P,) whether each owner's memory holds the whole model for training."""
        room = np.floor((self.owners.memory - self.model.edge_memory) / self.m + _EPS)
        return np.asarray(room >= self.model.num_layers)

    def owner_max_blocks(self, tau: float, num_stages: int) -> int:
        """Most blocks every owner can hold within ``tau`` and its memory (-1: not even none)."""
        length = self.model.num_layers
        by_memory = np.floor((self.owners.memory - self.model.edge_memory) / self.m + _EPS).min()
        times = self.owner_time(np.arange(length + 1), num_stages)
        within = np.flatnonzero(times <= tau * (1 + _EPS))
        by_time = int(within.max()) if within.size and within[0] == 0 else -1
        return int(min(by_time, by_memory, length))

    def slot_caps(self, tau: float) -> NDArray[np.int64]:
        """Blocks each slot can hold within ``tau`` per step and within its memory."""
        slack = tau * (1 + _EPS) - self.slot_comm
        by_time = np.floor(np.maximum(slack, 0.0) * self.slot_flops / self.w + _EPS)
        by_memory = np.floor(self.slot_memory / self.m + _EPS)
        return np.minimum(np.minimum(by_time, by_memory), self.model.num_layers).astype(np.int64)

    def stage_caps(self, tau: float, middle: int) -> NDArray[np.int64] | None:
        """``e_1 >= ... >= e_M``: most blocks the j-th largest middle stage may hold, or None."""
        need = self.pipelines * middle
        caps = self.slot_caps(tau)
        if caps.size < need:
            return None
        top = -np.sort(-caps)[:need]
        return top[self.pipelines - 1 :: self.pipelines]

    # -- feasibility and the minimum -----------------------------------------------------

    def owner_range(self, tau: float, num_stages: int) -> tuple[int, int, NDArray[np.int64] | None]:
        """Feasible owner block counts ``lo..hi`` at ``tau`` (empty when lo > hi) and the caps."""
        length = self.model.num_layers
        middle = max(num_stages - 2, 0)
        o_max = self.owner_max_blocks(tau, num_stages)
        if middle == 0:
            return (length, length, None) if o_max >= length else (1, 0, None)
        caps = self.stage_caps(tau, middle)
        if caps is None or caps[-1] < 1:
            return 1, 0, caps
        return max(0, length - int(caps.sum())), min(o_max, length - middle), caps

    def feasible(self, tau: float, num_stages: int) -> bool:
        """Whether some cut into ``num_stages`` stages has every stage within ``tau``."""
        lo, hi, _ = self.owner_range(tau, num_stages)
        return lo <= hi

    def candidates(self) -> NDArray[np.float64]:
        """Every time a stage can take (owner with o blocks, slot with c blocks), sorted."""
        length = self.model.num_layers
        blocks = np.arange(length + 1)
        owner = np.concatenate([self.owner_time(blocks, 1), self.owner_time(blocks, 3)])
        # Slots with equal speed and traffic give equal times; dedupe before the outer product.
        pairs = np.unique(np.stack([self.slot_flops, self.slot_comm], axis=1), axis=0)
        slot = (blocks[1:, None] * self.w / pairs[None, :, 0] + pairs[None, :, 1]).ravel()
        return np.unique(np.concatenate([owner, slot]))

    def min_bottleneck(self, num_stages: int, candidates: NDArray[np.float64], *, bound: float | None) -> float:
        """``tau*(num_stages)``: the least bottleneck of any cut within ``bound`` (inf: none)."""
        usable = candidates if bound is None else candidates[candidates <= bound * (1 + _EPS)]
        if usable.size == 0 or not self.feasible(float(usable[-1]), num_stages):
            return math.inf
        lo, hi = 0, usable.size - 1  # usable[hi] is feasible; find the first feasible one
        while lo < hi:
            mid = (lo + hi) // 2
            if self.feasible(float(usable[mid]), num_stages):
                hi = mid
            else:
                lo = mid + 1
        return float(usable[lo])

    # -- the counts at the optimum ---------------------------------------------------------

    def counts_at(self, tau: float, num_stages: int) -> Cut:
        """The cut within ``tau`` with the least sum of stage times, and its estimates."""
        length = self.model.num_layers
        micro = self.settings.micro_batches
        lo, hi, caps = self.owner_range(tau, num_stages)
        if num_stages <= 2:  # the owner holds every block: one stage, or two on the same device
            owner_s = float(self.owner_time(length, num_stages))
            counts = (length,) if num_stages == 1 else ((length + 1) // 2, length // 2)
            return Cut(block_counts=counts, bottleneck_s=owner_s, total_s=owner_s, pipeline_s=owner_s)
        assert caps is not None and lo <= hi, "counts_at needs a feasible tau"
        group_times = self._group_times(tau, num_stages)
        best: tuple[tuple[float, float], tuple[int, ...], tuple[float, ...], int] | None = None
        for owner_blocks in range(lo, hi + 1):
            middle, times = _fill(length - owner_blocks, caps, group_times)
            owner_s = float(self.owner_time(owner_blocks, num_stages))
            key = (max(owner_s, *times), owner_s + sum(times))
            if best is None or key < best[0]:
                best = (key, middle, times, owner_blocks)
        assert best is not None
        (bottleneck, total), middle, times, owner_blocks = best
        first = (owner_blocks + 1) // 2
        return Cut(
            block_counts=(first, *middle, owner_blocks - first),
            bottleneck_s=bottleneck,
            total_s=total,
            pipeline_s=(total + (micro - 1) * bottleneck) / micro,
            middle_s=times,
        )

    def _group_times(self, tau: float, num_stages: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(M, P) seconds per block and comm of the slots in each group of P, fastest group first."""
        middle = num_stages - 2
        order = np.argsort(-self.slot_caps(tau), kind="stable")[: self.pipelines * middle]
        per_block = (self.w / self.slot_flops[order]).reshape(middle, self.pipelines)
        comm = self.slot_comm[order].reshape(middle, self.pipelines)
        return per_block, comm

    # -- the whole search ----------------------------------------------------------------

    def largest_stages(self) -> int:
        """The most stages the helper slots allow: every middle stage of every pipeline on its own slot."""
        slots = self.slot_flops.size
        return min(self.model.num_layers + 2, 2 + slots // self.pipelines) if slots >= self.pipelines else 2

    def choose(self) -> Cut:
        """The best cut into ``num_stages`` stages, or into any number when it is unset; or a PlanningError."""
        largest = self.largest_stages()
        fixed = self.settings.num_stages
        options = [fixed] if fixed is not None else list(range(1, largest + 1))
        if fixed is not None and fixed > largest:
            raise self.diagnose([fixed])
        best = self.best(options)
        if best is None:
            raise self.diagnose(options)
        return best

    def best(self, options: Sequence[int]) -> Cut | None:
        """The fastest cut into any of ``options`` stages (fewest on ties); None when none is feasible."""
        candidates = self.candidates()
        best: Cut | None = None
        for num_stages in options:
            tau = self.min_bottleneck(num_stages, candidates, bound=self.settings.max_step_time_s)
            if math.isinf(tau):
                continue
            cut = self.counts_at(tau, num_stages)
            if best is None or cut.pipeline_s < best.pipeline_s * (1 - _EPS):
                best = cut
        return best

    def diagnose(self, options: list[int]) -> PlanningError:
        """Why no cut into any of ``options`` stages exists: the first constraint that fails."""
        length = self.model.num_layers
        largest = max(options)
        middle = max(largest - 2, 0)
        slots = self.slot_flops.size
        need = self.pipelines * middle
        if middle > length:
            return PlanningError(
                f"{largest} stages need at least {middle} decoder blocks for the middle stages, "
                f"the model has {length}",
                constraint="every middle stage holds at least one block",
                fix=f"set num_stages to at most {length + 2}",
            )
        if need > slots:
            return NotEnoughClientsError(
                f"{self.pipelines} pipeline(s) x {middle} middle stages need {need} client slots, "
                f"the clients that are not data owners offer {slots}",
                constraint="each middle partition needs its own client slot (capacity)",
                fix=f"add {need - slots} more client slot(s) (clients or capacity), or set num_stages "
                f"to at most {2 + slots // self.pipelines}",
            )
        owner_memory = float(self.owners.memory.min())
        if owner_memory < self.model.edge_memory:
            return InsufficientMemoryError(
                f"a data owner has {int(owner_memory)} bytes; the embedding and the head alone need "
                f"{int(self.model.edge_memory)} bytes for training",
                constraint="the data owner holds its first and last stage",
                fix="give the data owner more memory or lower batch_tokens",
            )
        if not any(self.feasible(math.inf, k) for k in options):
            return self._memory_error(largest)
        candidates = self.candidates()
        fastest = min(self.min_bottleneck(k, candidates, bound=None) for k in options)
        return ClientsTooSlowError(
            f"the fastest cut needs {fastest:.3g} s per step for its slowest stage, more than "
            f"max_step_time_s={self.settings.max_step_time_s}",
            constraint="max_step_time_s",
            fix=f"raise max_step_time_s to at least {fastest:.3g}, add faster clients, or lower batch_tokens",
        )

    def _memory_error(self, num_stages: int) -> PlanningError:
        """Memory alone rules out every cut into at most ``num_stages`` stages."""
        length = self.model.num_layers
        owner_blocks = self.owner_max_blocks(math.inf, 1)
        if num_stages <= 2:
            if self.slot_flops.size == 0:
                unfix = " (and set num_stages >= 3 or leave it unset)" if self.settings.num_stages else ""
                return NotEnoughClientsError(
                    f"the data owner can hold {owner_blocks} of the model's {length} blocks and no "
                    "other client is available for the rest",
                    constraint="the data owner's memory (no helper clients)",
                    fix=f"add clients with at least {int(self.m)} bytes per slot{unfix}, or give the owner more memory",
                )
            return InsufficientMemoryError(
                f"with {num_stages} stage(s) the data owner must hold all {length} blocks and can hold "
                f"{owner_blocks}",
                constraint="the data owner's memory",
                fix="set num_stages >= 3 (or leave it unset) so helpers take the middle blocks",
            )
        caps = self.stage_caps(math.inf, num_stages - 2)
        usable = int(caps[caps >= 1].sum()) if caps is not None else 0
        return InsufficientMemoryError(
            f"the data owner holds at most {owner_blocks} blocks and {num_stages - 2} middle stages "
            f"at most {usable} on the clients' memory, short of the model's {length} "
            f"(one block needs {int(self.m)} bytes to train)",
            constraint="each partition fits in its client's memory (per slot: memory / capacity)",
            fix="add clients with more memory, lower their capacity, or lower batch_tokens",
        )


def _fill(
    blocks: int, caps: NDArray[np.int64], group_times: tuple[NDArray[np.float64], NDArray[np.float64]]
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Give each middle stage one block, then each further one where the time grows least.

    Stage j with c blocks takes ``max(c * per_block[j] + comm[j])`` over the P slots of its
    group (convex in c) and holds at most ``caps[j]`` blocks. Returns the counts and each
    stage's time.
    """
    # Plain lists: this runs for every owner share and every K, on arrays of P numbers.
    per_block, comm = group_times[0].tolist(), group_times[1].tolist()
    count = caps.size
    counts = [1] * count

    def time_with(j: int, c: int) -> float:
        return max(c * b + t for b, t in zip(per_block[j], comm[j], strict=True))

    def growth(j: int) -> float:
        return time_with(j, counts[j] + 1) - time_with(j, counts[j])

    cap = caps.tolist()
    heap = [(growth(j), j) for j in range(count) if cap[j] >= 2]
    heapq.heapify(heap)
    for _ in range(blocks - count):
        _, j = heapq.heappop(heap)  # feasibility guarantees sum(caps) >= blocks
        counts[j] += 1
        if counts[j] < cap[j]:
            heapq.heappush(heap, (growth(j), j))
    return tuple(counts), tuple(time_with(j, counts[j]) for j in range(count))
