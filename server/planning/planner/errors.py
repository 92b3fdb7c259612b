"""Why a plan cannot be made.

::

    PlanningError (ValueError)
    ├── NotEnoughClientsError      fewer client slots than partitions to place
    ├── InsufficientMemoryError    a partition (or the owner's stages) fits in no client's memory
    ├── ClientsTooSlowError        every client that could host a partition breaks max_step_time_s
    └── AssignmentInfeasibleError  each partition has a client, but not enough distinct ones

Every error names the constraint that failed (``constraint``) and what would fix it (``fix``);
both are also in the message. They are ``ValueError``s because each one is a mismatch between
the operator's settings and the clients that joined, not a bug.
"""

from __future__ import annotations


class PlanningError(ValueError):
    """The planner cannot place the model on the clients it was given."""

    def __init__(self, problem: str, *, constraint: str, fix: str) -> None:
        super().__init__(f"{problem} [constraint: {constraint}]. Fix: {fix}")
        self.problem = problem
        self.constraint = constraint
        self.fix = fix


class NotEnoughClientsError(PlanningError):
    """The pipelines need more partition slots than the clients offer."""


class InsufficientMemoryError(PlanningError):
    """Some partition needs more memory than any client (or the data owner) has for it."""


class ClientsTooSlowError(PlanningError):
    """Every client able to hold some partition would exceed ``max_step_time_s``."""


class AssignmentInfeasibleError(PlanningError):
    """Memory and capacity together leave a group of partitions with too few clients."""
