"""Aligned plain-text tables for the admin CLI, the views of clients and plans it prints, and a run's live progress.

The admin API answers JSON (see :mod:`server.observe.admin`); these functions turn the same JSON into
tables, so ``titanic-server plan`` and ``titanic-server plan --json`` show the same facts.
:func:`follow_run` polls a run's JSON and shows its rounds and each owner's steps (rich progress bars).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    numeric = [all(isinstance(row[i], int | float) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def clients_table(clients: Sequence[Mapping[str, Any]]) -> str:
    """The ``/v1/clients`` answer as a table."""
    rows = []
    for c in clients:
        p = c["profile"]
        declared = set(p.get("declared", []))

        def mark(field: str, declared: set[str] = declared) -> str:
            return "*" if field in declared else ""

        rows.append(
            [
                c["client_id"],
                c["status"],
                "yes" if c["info"]["has_data"] else "no",
                _si(p["flops_per_s"], "FLOP/s") + mark("flops_per_s"),
                _si(p["training_memory_bytes"], "B") + mark("memory_bytes"),
                _si(p["upload_bytes_per_s"], "B/s") + mark("upload_bytes_per_s"),
                _si(p["download_bytes_per_s"], "B/s") + mark("download_bytes_per_s"),
                f"{p['rtt_s'] * 1e3:.1f} ms" + mark("rtt_s"),
                f"{c['seen_s_ago']:.1f} s",
            ]
        )
    headers = ["client", "status", "owner", "compute", "memory", "upload", "download", "rtt", "last seen"]
    note = "\n(* declared by the operator, not measured)" if any("*" in str(v) for r in rows for v in r) else ""
    return format_table(headers, rows) + note


def plan_table(plan: Mapping[str, Any]) -> str:
    """The ``/v1/plan`` answer as a table, with a line about the run and the solve.

    The solve's facts end the table; ``stages`` there gives each owner's pipeline its own stage
    count (1: the owner trains the whole model alone), as pipelines may be cut differently.
    """
    if not plan.get("plan_id"):
        return f"no plan: {plan.get('error') or 'none made yet'}"
    rows = [
        [
            r["run_id"],
            r["partition"],
            f"{r['layer_start']}-{r['layer_end'] - 1}" if r["blocks"] else "-",
            r["params"],
            r["client_id"] + (" (owner)" if r["local"] else ""),
            r["est_compute_s"],
            r["est_transfer_s"],
            r["why"],
        ]
        for r in plan["rows"]
    ]
    headers = ["pipeline", "partition", "blocks", "params", "client", "est. compute s", "est. transfer s", "why"]
    head = f"{plan['plan_id']} ({plan['state']}; owners: {', '.join(plan['owners']) or 'none'})"
    facts = ", ".join(f"{k}={_fact(v)}" for k, v in sorted(plan.get("summary", {}).items()))
    return "\n".join(x for x in (head, format_table(headers, rows), facts) if x)


def _fact(value: object) -> str:
    """A summary value as text; a mapping (per owner) as ``{a: 1, b: 3}``."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def status_table(status: Mapping[str, Any]) -> str:
    """The ``/v1/status`` answer as key/value lines."""
    counts = ", ".join(f"{n} {s}" for s, n in sorted(status["clients"].items())) or "none"
    plan = status["plan"]
    plan_text = f"{plan['plan_id']} ({plan['state']})" if plan.get("plan_id") else f"none ({plan.get('error', '')})"
    pairs = [
        ("version", status["version"]),
        ("uptime", f"{status['uptime_s']:.0f} s"),
        ("control plane", status["control_address"] + (" (TLS)" if status["tls"] else "")),
        ("model", status["model"] or "-"),
        ("clients", counts),
        ("plan", plan_text),
    ]
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def runs_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """The ``/v1/runs`` answer as a table."""
    if not runs:
        return "no runs"
    rows = []
    for r in runs:
        per_round = r.get("per_round") or [{}]
        ppl = per_round[-1].get("ppl")
        rows.append([r.get("run_id", ""), r.get("state", ""), f"{r.get('round', 0)}/{r.get('rounds', 0)}",
                     f"{ppl:.3f}" if isinstance(ppl, float) else "-", r.get("error", "")])
    return format_table(["run", "state", "round", "val ppl", "error"], rows)


def run_table(run: Mapping[str, Any]) -> str:
    """One run (``/v1/runs/ID``): its state, then one line per finished round."""
    head = f"{run.get('run_id', '')}  {run.get('state', '')}  round {run.get('round', 0)}/{run.get('rounds', 0)}"
    if run.get("error"):
        head += f"  error: {run['error']}"
    rows = []
    for h in run.get("history", []):
        losses = h.get("losses") or [float("nan")]
        step = h.get("step_seconds")
        stages = h.get("stage_seconds") or []
        rows.append([h.get("round", 0), h.get("owner", ""), f"{losses[0]:.4f}", f"{losses[-1]:.4f}",
                     f"{h.get('val_loss', float('nan')):.4f}", f"{h.get('ppl', float('nan')):.3f}", h.get("samples", 0),
                     f"{step:.3f}" if isinstance(step, int | float) else "-", " ".join(f"{x:.3f}" for x in stages) or "-"])
    headers = ["round", "owner", "first loss", "last loss", "val loss", "val ppl", "samples", "step s", "s/step per stage"]
    if any("est_step_s" in h for h in run.get("history", [])):  # the plan's estimate beside the measured step
        headers.append("est. step s")
        for row, h in zip(rows, run.get("history", []), strict=True):
            est = h.get("est_step_s")
            row.append(f"{est:.3f} ({h.get('path', '?')})" if isinstance(est, int | float) else "-")
    table = format_table(headers, rows)
    parts = [head + "\n" + table, ppl_table(run.get("per_round", [])), idle_table(run), signals_table(run),
             traffic_table(run), recoveries_table(run)]  # fmt: skip
    return "\n\n".join(part for part in parts if part)


def recoveries_table(run: Mapping[str, Any]) -> str:
    """What automatic recovery did: per incident the round, the client lost, steps redone and the time to resume."""
    rows = []
    for e in run.get("recoveries", []):
        took = e.get("recover_s")
        rows.append([e.get("round", 0), e.get("kind", ""), e.get("lost", "") or "-", e.get("steps_redone", 0),
                     f"{took:.2f}" if isinstance(took, int | float) else "-", str(e.get("reason", ""))[:80]])  # fmt: skip
    return format_table(["round", "recovery", "lost", "steps redone", "resumed after s", "why"], rows) if rows else ""


def idle_table(run: Mapping[str, Any]) -> str:
    """How each device spent each round's training time: busy, pipeline bubble, waiting for the round's end (ratios)."""
    rows = []
    for r in run.get("per_round", []):
        for device, f in sorted((r.get("idle") or {}).items()):
            rows.append([r.get("round", 0), device, *(f"{100 * f.get(k, 0.0):.1f} %" for k in ("busy", "bubble", "wait", "idle")),
                         f"{f.get('wall_s', 0.0):.2f}"])  # fmt: skip
    if not rows:
        return ""
    return format_table(["round", "device", "busy", "bubble", "waiting", "idle", "round s"], rows)


def traffic_table(run: Mapping[str, Any]) -> str:
    """Bytes each client uploaded to and downloaded from the server per round (encoded: what crossed the network)."""
    rows = [[t.get("round", 0), t.get("client", ""), _bytes(t.get("uploaded", 0)), _bytes(t.get("downloaded", 0))]
            for t in run.get("traffic", [])]  # fmt: skip
    return format_table(["round", "client", "uploaded", "downloaded"], rows) if rows else ""


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def signals_table(run: Mapping[str, Any]) -> str:
    """Photon's signals per round: the owners' training perplexity before and after the merge, and the merge's norms."""
    merges = {int(s["round"]): s for s in run.get("signals", [])}
    rows = []
    for r in run.get("per_round", []):
        before, after = r.get("train_ppl_before", {}), r.get("train_ppl_after", {})
        owners = sorted(before)
        signal = merges.get(int(r.get("round", 0)), {})
        update = signal.get("update", {}).get("total")
        model = signal.get("model", {}).get("total")
        rows.append([
            r.get("round", 0),
            " ".join(f"{o} {before[o]:.2f}->{after[o]:.2f}" if o in after else f"{o} {before[o]:.2f}" for o in owners) or "-",
            f"{update:.4g}" if isinstance(update, float) else "-",
            f"{model:.4g}" if isinstance(model, float) else "-",
        ])
    if not rows:
        return ""
    return format_table(["round", "train ppl before->after merge", "update norm", "model norm"], rows)


def ppl_table(per_round: Sequence[Mapping[str, Any]]) -> str:
    """Validation perplexity per round: each owner's, and the token-weighted one over all owners."""
    owners = sorted({o for r in per_round for o in r.get("owners", {})})
    rows = []
    for r in per_round:
        ppl = r.get("ppl")
        rows.append([r.get("round", 0), *(f"{r['owners'][o]:.3f}" if o in r.get("owners", {}) else "-" for o in owners),
                     f"{ppl:.3f}" if isinstance(ppl, float) else "-"])
    return format_table(["round", *(f"ppl {o}" for o in owners), "ppl (weighted)"], rows)


ENDED = ("done", "failed", "stopped")  # a run in one of these states changes no more


def follow_run(
    fetch: Callable[[], Mapping[str, Any]], out: TextIO, *, interval_s: float = 0.5, line_every_s: float = 5.0
) -> Mapping[str, Any]:
    """Show the progress of the run ``fetch`` returns (``/v1/runs/ID``) on ``out`` until it ends; returns its last JSON.

    A bar for the run's rounds, and one per owner for the steps of its round with its loss,
    rate and time left. On a terminal the bars are redrawn in place; elsewhere (a pipe, a log)
    a row is printed as a line when its round or state changes, when its round completes, and
    else at most every ``line_every_s``. Exceptions from ``fetch`` end the display and propagate.
    """
    console = Console(file=out, highlight=False)
    if not console.is_terminal:
        console.width = 120  # lines in a file are not cut to a guessed terminal width
    view = _RunView(console, line_every_s)
    with view:
        while True:
            run = fetch()
            view.show(run)
            if run.get("state") in ENDED:
                return run
            time.sleep(interval_s)


class _RunView:
    """The rows of :func:`progress_rows` as rich progress bars, or as lines when ``console`` is not a terminal."""

    def __init__(self, console: Console, line_every_s: float) -> None:
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=24),
            TextColumn("{task.completed:>4.0f}/{task.total:.0f} {task.fields[unit]}", markup=False),
            TextColumn("{task.fields[detail]}", markup=False),
            console=console, auto_refresh=False,
        )  # fmt: skip
        self.tasks: dict[str, TaskID] = {}
        self.printed: dict[str, tuple[str, float, float]] = {}  # row key -> (description, completed, when printed)
        self.line_every_s = line_every_s

    def __enter__(self) -> _RunView:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()  # leaves the last bars on screen

    def show(self, run: Mapping[str, Any]) -> None:
        for key, row in progress_rows(run):
            task = self.tasks.get(key)
            if task is None:
                task = self.tasks[key] = self.progress.add_task(**row)
            else:
                self.progress.update(task, **row)
            if not self.live:
                self._line(key, task, row)
        if self.live:
            self.progress.refresh()

    def _line(self, key: str, task: TaskID, row: Mapping[str, Any]) -> None:
        description, completed, total = row["description"], row["completed"], row["total"]
        last = self.printed.get(key)
        now = time.monotonic()
        due = last is None or last[0] != description or (
            last[1] != completed and (completed >= total or now - last[2] >= self.line_every_s)
        )  # fmt: skip
        if due:
            self.printed[key] = (description, completed, now)
            self.progress.console.print(self.progress.make_tasks_table(t for t in self.progress.tasks if t.id == task))


def progress_rows(run: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows :func:`follow_run` shows, each a key and the fields of its bar: the run's, then each owner's."""
    rounds = int(run.get("rounds", 0))
    lefts = []
    owners = []
    for owner, now in sorted(run.get("live", {}).items()):
        done, steps, eta = int(now.get("done", 0)), int(now.get("steps", 0)), now.get("eta_s")
        facts = []
        if now.get("losses"):
            facts.append(f"loss {now['losses'][-1]:.4f}")
        if done:
            facts.append(_si(float(now.get("tokens_per_s", 0.0)), "tok/s"))
        if eta is not None:
            facts.append(f"{_duration(eta)} left")
            round_s = steps * float(now.get("seconds", 0.0)) / done
            lefts.append(eta + max(0, rounds - int(now["round"])) * round_s)
        owners.append((f"owner:{owner}", {"description": f"  {owner} round {now['round']}/{rounds}", "completed": done,
                                          "total": steps, "unit": "steps", "detail": "  ".join(facts)}))  # fmt: skip
    detail = run.get("error") or ""
    if lefts and run.get("state") not in ENDED:
        # Rounds left at each owner's rate: owners in turn add up, owners in parallel overlap.
        left = sum(lefts) if run.get("participation") == "sequential" else max(lefts)
        detail = f"about {_duration(left)} left (training only)"
    yield "run", {"description": f"{run.get('run_id', '')} {run.get('state', '')}", "total": rounds, "unit": "rounds",
                  "completed": len(run.get("checkpoints", [])), "detail": detail}  # fmt: skip
    yield from owners


def _duration(seconds: float) -> str:
    """``seconds`` as h:mm:ss, or m:ss under an hour."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
