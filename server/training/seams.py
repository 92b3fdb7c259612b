"""The objects a run file chooses, one per extension point, built once per run.

The run manager and the round machine hold these and call them; none of them is ever
asked for its name. Each comes from its registry by the name in the run file::

    seam           registry                                        chosen by the run file's
    participation  server.training.participation.PARTICIPATIONS   [participation] mode (or case)
    local work     server.training.local_work.LOCAL_WORK           [local_work] mode
    finetune       autograd_bridge.finetune.FINETUNES              [finetune] mode
    communication  autograd_bridge.codecs.CODECS                   [communication] codec, densities
    aggregator     server.training.aggregation.AGGREGATORS         [aggregation] rule

(The training method, ``[training] method``, runs on the owners only: the server passes its
name on in ``PrepareRun`` and ``Train``.)
"""

from __future__ import annotations

from dataclasses import dataclass

from autograd_bridge.finetune import Finetune, get_finetune
from server.training.aggregation import Aggregator
from server.training.communication import Communication
from server.training.local_work import LocalWork, build_local_work
from server.training.participation import Participation, build_participation
from server.training.spec import RunSpec, aggregation_settings

__all__ = ["RunSeams", "seams_for"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSeams:
    """One member of each seam, as a run's spec chose them."""

    participation: Participation  # who trains in each turn; whose optimizer state travels
    local_work: LocalWork  # how much each owner trains per round
    finetune: Finetune  # what travels, and whether checkpoints are adapters
    communication: Communication  # codecs and each client's densities
    aggregator: Aggregator  # how copies merge (a server optimizer keeps its moments here)


def seams_for(spec: RunSpec) -> RunSeams:
    """A fresh member of each seam for ``spec``."""
    return RunSeams(
        participation=build_participation(spec.participation, seed=spec.seed),
        local_work=build_local_work(spec.local_work),
        finetune=get_finetune(spec.finetune.mode),
        communication=Communication(spec.communication),
        aggregator=aggregation_settings(spec).build(),
    )
