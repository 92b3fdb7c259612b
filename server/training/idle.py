"""Idle accounting: how each device spent a turn of training, owners and helpers alike.

A turn's wall time ``W`` runs on the server's clock from the moment it sent the turn's
``Train`` commands to the moment the last of their round reports arrived. Each pipeline is
*active* from its ``Train`` to its report (``active``, the same clock: command delivery,
training, evaluation and the report's way back). Within that, per device::

    owner   bubble = steps x (its mean wait per step for each stage held by another device)
            busy   = active - bubble
    helper  busy   = steps x (the owner's mean wait per step for each stage the helper holds)
            bubble = active - busy
    both    wait   = W - active     (done, waiting for the turn's slowest pipeline)

A device in several pipelines (a helper serving two owners, an owner hosting another's
stage) adds its busy times and is active as long as the longest of them; its bubble is
what remains of that span. The figures are kept in seconds and as ratios of ``W``; the
*idle ratio* is ``(bubble + wait) / W``.

Helpers' busy time comes from the owner's per-stage timings in its round report
(``stage_seconds``: from sending each forward or backward request to the reply). That
includes both transfers on top of the host's compute, so it is an upper bound of the
helper's work; it is used because the owner already measures it for every stage on one
clock, and hosts report nothing per round (counting on the hosts would need a new
message from each of them and a join of their clocks with the owner's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PipelineTiming", "per_round_idle", "turn_idle"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineTiming:
    """One pipeline's turn, as the server clocked it and the owner reported it."""

    owner: str  # the data owner driving it
    active_s: float  # from its Train command to its round report, on the server's clock
    steps: int  # optimizer steps the owner reported
    stage_seconds: Sequence[float]  # per stage, the owner's mean wait per step
    holders: Mapping[int, str]  # partition index -> the client holding it


def turn_idle(wall_s: float, pipelines: Iterable[PipelineTiming]) -> dict[str, dict[str, Any]]:
    """Per device of the turn: role, busy/bubble/wait seconds, their ratios of ``wall_s`` and the idle ratio."""
    busy: dict[str, float] = {}
    span: dict[str, float] = {}
    roles: dict[str, set[str]] = {}
    for p in pipelines:
        active = min(max(p.active_s, 0.0), wall_s)
        stage = {k: p.stage_seconds[k] * p.steps for k in p.holders if k < len(p.stage_seconds)}
        devices = set(p.holders.values()) | {p.owner}
        for device in devices:
            if device == p.owner:
                elsewhere = sum(s for k, s in stage.items() if p.holders[k] != device)
                work = max(active - elsewhere, 0.0)
                roles.setdefault(device, set()).add("owner")
            else:
                work = min(sum(s for k, s in stage.items() if p.holders[k] == device), active)
                roles.setdefault(device, set()).add("helper")
            busy[device] = busy.get(device, 0.0) + work
            span[device] = max(span.get(device, 0.0), active)
    out: dict[str, dict[str, Any]] = {}
    for device in sorted(busy):
        active = span[device]
        worked = min(busy[device], active)
        bubble, wait = active - worked, wall_s - active
        out[device] = {
            "role": "+".join(sorted(roles[device])),
            "wall_s": wall_s,
            "busy_s": worked,
            "bubble_s": bubble,
            "wait_s": wait,
            "busy": _ratio(worked, wall_s),
            "bubble": _ratio(bubble, wall_s),
            "wait": _ratio(wait, wall_s),
            "idle": _ratio(bubble + wait, wall_s),
        }
    return out


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def per_round_idle(history: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, dict[str, float]]]:
    """Round -> device -> busy, bubble, wait and idle as ratios of the round's training time (all its turns).

    Each turn's figures appear in the history entry of every pipeline of that turn; a
    device is counted once per turn.
    """
    seen: set[tuple[int, int, str]] = set()
    sums: dict[int, dict[str, dict[str, float]]] = {}
    for h in history:
        for device, figures in (h.get("idle") or {}).items():
            key = (int(h["round"]), int(h.get("turn", 0)), device)
            if key in seen:
                continue
            seen.add(key)
            total = sums.setdefault(key[0], {}).setdefault(
                device, {"wall_s": 0.0, "busy_s": 0.0, "bubble_s": 0.0, "wait_s": 0.0}
            )
            for name in total:
                total[name] += float(figures[name])
    out: dict[int, dict[str, dict[str, float]]] = {}
    for round, devices in sums.items():
        out[round] = {}
        for device, t in sorted(devices.items()):
            wall = t["wall_s"]
            out[round][device] = {
                "busy": _ratio(t["busy_s"], wall),
                "bubble": _ratio(t["bubble_s"], wall),
                "wait": _ratio(t["wait_s"], wall),
                "idle": _ratio(t["bubble_s"] + t["wait_s"], wall),
                "wall_s": wall,
            }
    return out
