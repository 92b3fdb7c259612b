"""An owner's round report, checked as network input, and the history entry it becomes.

An owner answers ``Train`` with a :class:`~proto.messages.RoundReport`: one record per step
(loss, tokens, seconds, bridge bytes per remote stage) and the evaluation. Its values come
from another machine, so :func:`history_entry` checks every one explicitly before the run
records it. The run's history keeps one entry per owner and turn, as plain JSON values::

    losses, tokens, step_times    per step: training loss, target tokens, seconds
    lrs, grad_norms, output_norms per step: learning rate, gradient norm before clipping, mean logit norm
    bytes_sent, bytes_received    per remote stage ("1", "2", ...): the round's bridge bytes
    val_loss, ppl, val_tokens     the evaluation after the round
    samples, data_samples         sequences trained, and held
    seconds, stage_seconds, step_seconds   the round's wall time; mean waits per stage and step

(the round machine adds ``round``, ``turn``, ``owner`` and ``bridge_run``; the run manager
adds ``weight``, the copy's weight in the merge from the run's local work, ``path``, the data
path the round took, and ``est_step_s``, the plan's estimated step on it, when the plan has one,
and once the turn's pipelines all reported, ``idle`` and ``idle_ratio`` per device of the
pipeline, :mod:`server.training.idle`). :func:`per_round` sums the history per round into the
all-owner validation perplexity and each device's idle figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from proto.messages import RoundReport
from server.training.idle import per_round_idle

__all__ = ["history_entry", "per_round"]


def _ppl(loss: float) -> float:
    """exp(loss), capped where it would overflow (a diverged run still reports)."""
    return math.exp(min(loss, 700.0))


def _count(value: object) -> bool:
    """Whether ``value`` is a count: an integer >= 0, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _seconds(value: object) -> bool:
    """Whether ``value`` is a duration: a finite number >= 0."""
    return _finite(value) and value >= 0  # type: ignore[operator]


def history_entry(report: RoundReport, *, round: int) -> dict[str, Any]:
    """The history entry of ``report``, the answer to a Train of round ``round`` (ValueError when a value is wrong).

    How many steps the report must hold is the run's local work's to check.
    """
    if report.round != round:
        raise ValueError(f"the round report is for round {report.round!r}, round {round} was asked")
    for i, step in enumerate(report.steps):
        if not _finite(step.loss):
            raise ValueError(f"step {i} of the round report needs a finite loss, got {step.loss!r}")
        if not _count(step.tokens) or not _seconds(step.seconds):
            raise ValueError(f"step {i} of the round report needs tokens >= 0 and finite seconds >= 0")
        if not (_seconds(step.lr) and _seconds(step.grad_norm) and _seconds(step.output_norm)):
            raise ValueError(f"step {i} of the round report needs a learning rate and norms that are finite numbers >= 0")
        for peer in step.peers:
            if not (_count(peer.stage) and _count(peer.sent) and _count(peer.received)):
                raise ValueError(f"step {i} of the round report has peer bytes that are not counts: {peer}")
    evaluation = report.evaluation
    for key, value in (("val_loss (evaluation loss)", evaluation.loss), ("ppl (evaluation perplexity)", evaluation.perplexity),
                       ("seconds", report.seconds)):  # fmt: skip
        if not _finite(value):
            raise ValueError(f"the round report needs a finite number {key}, got {value!r}")
    for key, value in (("samples", report.samples), ("data_samples", report.data_samples), ("val_tokens", evaluation.tokens)):
        if not _count(value):
            raise ValueError(f"the round report needs {key!r}, an integer >= 0, got {value!r}")
    if not all(_seconds(x) for x in report.stage_seconds):
        raise ValueError(f"the round report has stage_seconds that are not finite numbers >= 0: {report.stage_seconds}")
    if not _seconds(report.step_seconds):
        raise ValueError(f"the round report has step_seconds that is not a finite number >= 0: {report.step_seconds!r}")
    sent: dict[str, int] = {}
    received: dict[str, int] = {}
    for step in report.steps:
        for peer in step.peers:
            sent[str(peer.stage)] = sent.get(str(peer.stage), 0) + peer.sent
            received[str(peer.stage)] = received.get(str(peer.stage), 0) + peer.received
    return {
        "losses": [float(s.loss) for s in report.steps],
        "tokens": [s.tokens for s in report.steps],
        "step_times": [float(s.seconds) for s in report.steps],
        "lrs": [float(s.lr) for s in report.steps],
        "grad_norms": [float(s.grad_norm) for s in report.steps],  # before clipping; 0 when the run does not clip
        "output_norms": [float(s.output_norm) for s in report.steps],  # mean logit norm per position (divergence)
        "bytes_sent": sent,
        "bytes_received": received,
        "val_loss": float(evaluation.loss),
        "ppl": float(evaluation.perplexity),
        "val_tokens": evaluation.tokens,
        "samples": report.samples,
        "data_samples": report.data_samples,
        "seconds": float(report.seconds),
        "stage_seconds": [float(x) for x in report.stage_seconds],
        "step_seconds": float(report.step_seconds),
    }


def per_round(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per round: each owner's validation perplexity and the token-weighted one over all owners, and idle ratios per device.

    Also Photon's view of each merge from the owners' side: ``train_ppl_before``, an owner's
    training perplexity on its round's last batch (its own copy, before the merge), and
    ``train_ppl_after``, on its next round's first batch (the merged model, before that
    step's update); the gap spikes when the owners' copies disagree and shrinks as they agree.
    """
    rounds: dict[int, dict[str, Any]] = {}
    first_loss = {(int(h["round"]), h["owner"]): h["losses"][0] for h in history if h.get("losses")}
    for h in history:
        entry = rounds.setdefault(
            int(h["round"]),
            {"round": int(h["round"]), "owners": {}, "train_ppl_before": {}, "train_ppl_after": {}, "_loss": 0.0, "_tok": 0},
        )
        entry["owners"][h["owner"]] = h["ppl"]
        if h.get("losses"):
            entry["train_ppl_before"][h["owner"]] = _ppl(h["losses"][-1])
            after = first_loss.get((int(h["round"]) + 1, h["owner"]))
            if after is not None:
                entry["train_ppl_after"][h["owner"]] = _ppl(after)
        tokens = int(h.get("val_tokens", 0))
        entry["_loss"] += h["val_loss"] * tokens
        entry["_tok"] += tokens
    idle = per_round_idle(history)
    out = []
    for r in sorted(rounds):
        entry = rounds[r]
        loss, tokens = entry.pop("_loss"), entry.pop("_tok")
        entry["ppl"] = math.exp(loss / tokens) if tokens else None
        entry["idle"] = idle.get(r, {})  # device -> busy, bubble, wait, idle: ratios of the round's training time
        out.append(entry)
    return out
