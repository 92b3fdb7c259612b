"""The assignment problem: each partition on exactly one eligible client, within capacities.

Given costs ``d[r, n]`` (R partition rows, N clients), an eligibility mask and capacities::

    minimise    sum_{(r,n) eligible} d[r,n] x[r,n]
    subject to  sum_n x[r,n] = 1        for every partition row r
                sum_r x[r,n] <= cap[n]  for every client n
                0 <= x[r,n] <= 1,       x[r,n] only exists where (r,n) is eligible

The constraint matrix is the incidence matrix of a bipartite graph, which is totally
unimodular, so every vertex of this polytope is 0/1 and a simplex solver returns an integral
optimum of the relaxation. Memory is handled by leaving ineligible pairs out (never by a
``sum_r mem_r x[r,n] <= mem_n`` row, which would break total unimodularity and make the
relaxation fractional). Two exact solvers:

* :func:`solve_lp`: cvxpy with HiGHS; one flat variable over the eligible pairs only, sparse
  constraint matrices, the costs as one flat vector parameter, ``warm_start=False``.
* :func:`solve_matching`: ``scipy.optimize.linear_sum_assignment`` with every client's column
  repeated ``cap[n]`` times and ineligible pairs priced above any feasible assignment; a chosen
  ineligible pair means no feasible assignment exists.

Both return the same optimal objective (ties may pick different, equally cheap, assignments).

**Candidate pruning (exact).** Before either solver runs, each row keeps only its R cheapest
eligible clients (all of them when it has fewer). Some optimal assignment uses only those
pairs: if row r sat on a client outside its R cheapest, the other R - 1 rows fill at most
R - 1 of the R cheaper clients' slots, so r can move to a free one without raising the cost;
repeating this never moves a row out of its set. Feasibility is kept the same way. The
problems shrink from R x N pairs to at most R x R, and because many rows prefer the same fast
clients, the matching path works on a few hundred columns instead of tens of thousands.
``prune=False`` solves the full problem (the tests check that both give the same optimum).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import scipy.sparse as sparse
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

INTEGRALITY_TOLERANCE = 1e-6  # an LP value further than this from 0 or 1 counts as fractional


class Infeasible(Exception):
    """No assignment satisfies eligibility and capacity (the caller explains why)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Solution:
    """An optimal assignment of rows to clients."""

    client_of_row: NDArray[np.int64]  # (R,) index of the client each partition row runs on
    objective: float  # total cost of that assignment
    solver: str  # "cvxpy" or "matching"
    max_fractional: float  # largest distance of an LP value from {0, 1}; 0.0 for matching
    solve_ms: float  # wall time, building the problem included

    @property
    def integral(self) -> bool:
        """Whether the solver's values were 0/1 within INTEGRALITY_TOLERANCE."""
        return self.max_fractional < INTEGRALITY_TOLERANCE


def _check_shapes(cost: NDArray[np.float64], eligible: NDArray[np.bool_], capacity: NDArray[np.int64]) -> None:
    if cost.ndim != 2 or cost.shape != eligible.shape or capacity.shape != (cost.shape[1],):
        raise ValueError(
            f"cost {cost.shape}, eligible {eligible.shape} and capacity {capacity.shape} "
            "must be (R, N), (R, N) and (N,)"
        )
    if not np.isfinite(cost[eligible]).all():
        raise ValueError("every eligible cost must be finite; mark impossible pairs ineligible instead")


def candidates(cost: NDArray[np.float64], eligible: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """(R, N) mask: each row's R cheapest eligible clients (see "Candidate pruning")."""
    num_rows, num_clients = cost.shape
    if num_clients <= num_rows:
        return eligible
    priced = np.where(eligible, cost, np.inf)
    cheapest = np.argpartition(priced, num_rows - 1, axis=1)[:, :num_rows]  # (R, R) client indices
    keep = np.zeros_like(eligible)
    np.put_along_axis(keep, cheapest, True, axis=1)
    return keep & eligible


def solve_lp(
    cost: NDArray[np.float64], eligible: NDArray[np.bool_], capacity: NDArray[np.int64], *, prune: bool = True
) -> Solution:
    """Solve the LP relaxation with cvxpy + HiGHS and read the (integral) assignment off it."""
    _check_shapes(cost, eligible, capacity)
    start = time.perf_counter()
    num_rows, num_clients = cost.shape
    if not eligible.any(axis=1).all():
        raise Infeasible
    usable = candidates(cost, eligible) if prune else eligible
    # np.nonzero walks row-major, so the pairs of one row are contiguous: (E,) each.
    rows, cols = np.nonzero(usable)
    num_pairs = rows.size
    pair = np.arange(num_pairs)
    ones = np.ones(num_pairs)
    one_per_row = sparse.csr_matrix((ones, (rows, pair)), shape=(num_rows, num_pairs))
    per_client = sparse.csr_matrix((ones, (cols, pair)), shape=(num_clients, num_pairs))
    x = cp.Variable(num_pairs, bounds=[0, 1])
    price = cp.Parameter(num_pairs, value=cost[rows, cols])
    problem = cp.Problem(
        cp.Minimize(price @ x),
        [one_per_row @ x == 1, per_client @ x <= np.minimum(capacity, num_rows)],
    )
    # warm_start=False: cvxpy's warm start made HiGHS re-solves 3-4x slower. Presolve finds
    # nothing to remove in an assignment LP and costs about a third of the solve.
    problem.solve(solver=cp.HIGHS, warm_start=False, presolve="off")
    if problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        raise Infeasible
    if problem.status != cp.OPTIMAL or x.value is None:
        raise RuntimeError(f"HiGHS ended with status {problem.status!r} on an assignment LP")
    values = np.asarray(x.value, dtype=np.float64)
    max_fractional = float(np.abs(values - np.round(values)).max()) if num_pairs else 0.0
    # The largest value of each row's pairs; for an integral solution that is the one 1.
    order = np.lexsort((-values, rows))
    first_of_row = order[np.searchsorted(rows[order], np.arange(num_rows))]
    client_of_row = cols[first_of_row].astype(np.int64)
    if max_fractional >= INTEGRALITY_TOLERANCE:
        # Cannot happen at a vertex of a totally unimodular polytope; if the solver stopped
        # elsewhere, report it (max_fractional) and take an exact matching of the same cost.
        rounded = solve_matching(cost, usable, capacity, prune=False)
        client_of_row = rounded.client_of_row
    elapsed = (time.perf_counter() - start) * 1e3
    objective = float(cost[np.arange(num_rows), client_of_row].sum())
    return Solution(
        client_of_row=client_of_row,
        objective=objective,
        solver="cvxpy",
        max_fractional=max_fractional,
        solve_ms=elapsed,
    )


def slot_columns(capacity: NDArray[np.int64], num_rows: int) -> NDArray[np.int64]:
    """Client index of every slot: client n repeated min(cap[n], num_rows) times."""
    return np.repeat(np.arange(capacity.size), np.minimum(capacity, num_rows))


def solve_matching(
    cost: NDArray[np.float64], eligible: NDArray[np.bool_], capacity: NDArray[np.int64], *, prune: bool = True
) -> Solution:
    """Solve the same problem exactly with ``linear_sum_assignment`` over capacity slots."""
    _check_shapes(cost, eligible, capacity)
    start = time.perf_counter()
    num_rows = cost.shape[0]
    if not eligible.any(axis=1).all():
        raise Infeasible
    usable = candidates(cost, eligible) if prune else eligible
    clients = np.flatnonzero(usable.any(axis=0))  # (U,) the only columns any row may use
    slots = clients[slot_columns(capacity[clients], num_rows)]  # (S,) client index per slot
    if slots.size < num_rows:
        raise Infeasible
    allowed = cost[usable]
    spread = float(allowed.max() - allowed.min())
    # Dearer than the gap between any two feasible assignments, so the optimum uses an
    # ineligible pair only when no feasible assignment exists.
    forbidden = (num_rows + 1) * (spread + 1.0)
    priced = np.where(usable[:, slots], cost[:, slots], forbidden)  # (R, S)
    row_index, slot_index = linear_sum_assignment(priced)
    client_of_row = np.empty(num_rows, dtype=np.int64)
    client_of_row[row_index] = slots[slot_index]
    if not usable[np.arange(num_rows), client_of_row].all():
        raise Infeasible
    elapsed = (time.perf_counter() - start) * 1e3
    objective = float(cost[np.arange(num_rows), client_of_row].sum())
    return Solution(
        client_of_row=client_of_row, objective=objective, solver="matching", max_fractional=0.0, solve_ms=elapsed
    )


def hall_violation(
    eligible: NDArray[np.bool_], capacity: NDArray[np.int64]
) -> tuple[list[int], list[int]] | None:
    """Rows that together have fewer slots than rows (Hall's condition), or None if none do.

    Finds a maximum matching, then follows alternating paths from an unmatched row: the rows
    reached can only use the clients reached, and those clients' slots are all taken.
    """
    num_rows = eligible.shape[0]
    slots = slot_columns(capacity, num_rows)
    if slots.size == 0:
        return (list(range(num_rows)), []) if num_rows else None
    unit = np.where(eligible, 0.0, 1.0)[:, slots]
    row_index, slot_index = linear_sum_assignment(unit)
    client_of_row = np.full(num_rows, -1, dtype=np.int64)
    matched = eligible[row_index, slots[slot_index]]
    client_of_row[row_index[matched]] = slots[slot_index[matched]]
    unmatched = np.flatnonzero(client_of_row < 0)
    if unmatched.size == 0:
        return None
    rows_of_client: dict[int, list[int]] = {}
    for row, client in enumerate(client_of_row.tolist()):
        if client >= 0:
            rows_of_client.setdefault(client, []).append(row)
    seen_rows = {int(unmatched[0])}
    seen_clients: set[int] = set()
    frontier = [int(unmatched[0])]
    while frontier:
        row = frontier.pop()
        for client in np.flatnonzero(eligible[row]).tolist():
            if client in seen_clients:
                continue
            seen_clients.add(client)
            for other in rows_of_client.get(client, []):
                if other not in seen_rows:
                    seen_rows.add(other)
                    frontier.append(other)
    return sorted(seen_rows), sorted(seen_clients)
