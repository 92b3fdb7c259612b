"""``--compare-topology``: the same run file on the same plan over the chained and the relayed path.

The run file is read once (TOML) and written twice with only ``[training] path`` changed. The
server plans with the run's step (``[planning] batch_tokens``, ``micro_batches``, ``seq_len``
from its ``[training]``), so the plan's estimate of the owner's step on each path
(``est_step_s`` in the plan summary) is for the step the run trains, and is put beside the
measured one::

    step_s_chain=<x> step_s_star=<x> ratio=<chain/star> est_error_pct=<|est - measured| / measured, %>

``est_error_pct`` compares the chained step, the path the comparison is about.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def read_run_file(path: Path) -> dict[str, Any]:
    """The run file as a dict (ValueError naming the file when it is not TOML)."""
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"run file {path}: {exc}") from exc


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} into a run file")


def dump_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """``data`` as TOML: its plain keys, then one table per mapping (nested tables by dotted name)."""
    lines = [f"{key} = {_value(value)}" for key, value in data.items() if not isinstance(value, Mapping)]
    for key, value in data.items():
        if isinstance(value, Mapping):
            name = f"{prefix}{key}"
            body = dump_toml(value, prefix=f"{name}.")
            lines += ["", f"[{name}]", body] if body else ["", f"[{name}]"]
    return "\n".join(line for line in lines).strip("\n") if prefix else "\n".join(lines).strip("\n") + "\n"


def with_path(run: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``run`` with ``[training] path`` set to ``path``."""
    training = dict(run.get("training", {}))
    training["path"] = path
    return {**run, "training": training}


def planning_config(run: Mapping[str, Any]) -> str:
    """A server config whose ``[planning]`` step is the run's (batch x sequence, micro-batches)."""
    from server.training.spec import TrainingSection

    defaults = {f.name: f.default for f in dataclasses.fields(TrainingSection)}  # the run file's own
    training = run.get("training", {})

    def key(name: str) -> int:
        return int(training.get(name, run.get(name, defaults[name])))

    batch, seq_len, micro = key("batch_size"), key("seq_len"), key("micro_batches")
    steps = int(run.get("local_work", {}).get("steps", run.get("steps_per_round", 10)))
    planning = {
        "seq_len": seq_len,
        "batch_tokens": batch * seq_len,
        "micro_batches": micro,
        "steps_per_round": steps,
    }
    return dump_toml({"planning": planning})


def estimated_step_s(plan: Mapping[str, Any], path: str) -> float | None:
    """The plan's estimate of the (first) owner's step on ``path``; None when the plan has none."""
    estimates = plan.get("summary", {}).get("est_step_s", {})
    owners = plan.get("owners", [])
    if not owners or owners[0] not in estimates:
        return None
    value = estimates[owners[0]].get(path)
    return float(value) if isinstance(value, int | float) else None


def topology_line(chain_s: float | None, star_s: float | None, est_chain_s: float | None) -> str:
    """``step_s_chain=.. step_s_star=.. ratio=.. est_error_pct=..`` (``?`` where a figure is missing)."""

    def fmt(x: float | None, spec: str) -> str:
        return "?" if x is None else format(x, spec)

    ratio = chain_s / star_s if chain_s is not None and star_s else None
    error = abs(est_chain_s - chain_s) / chain_s * 100 if est_chain_s is not None and chain_s else None
    return (
        f"step_s_chain={fmt(chain_s, '.4f')} step_s_star={fmt(star_s, '.4f')} ratio={fmt(ratio, '.2f')} "
        f"est_error_pct={fmt(error, '.1f')}"
    )
