"""``titanic-server runs show ID --follow``: live progress from the admin API until the run ends, then the run table."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from server.cli import main
from server.observe.tables import follow_run, progress_rows

TOKEN = "follow-token"


def snapshot(state: str, round: int, done: int, *, rounds: int = 2, steps: int = 4, error: str = "") -> dict[str, Any]:
    """The run as ``/v1/runs/run-1`` answers: two owners ``done`` steps into ``round`` (a run's JSON, trimmed)."""
    finished = round - (state != "done")
    live = {
        owner: {"round": round, "steps": steps, "done": done, "losses": [3.0 - 0.1 * i for i in range(done)],
                "tokens": 64 * done, "seconds": 0.5 * done, "tokens_per_s": 128.0, "eta_s": (steps - done) * 0.5 if done else None}
        for owner in ("alice", "bob")
    }  # fmt: skip
    history = [
        {"round": r, "owner": o, "losses": [3.0, 2.7], "val_loss": 2.5, "ppl": 12.2, "samples": 16, "val_tokens": 10}
        for r in range(1, finished + 1) for o in ("alice", "bob")
    ]  # fmt: skip
    per_round = [{"round": r, "owners": {"alice": 12.2, "bob": 12.2}, "ppl": 12.2} for r in range(1, finished + 1)]
    return {"run_id": "run-1", "state": state, "round": round, "rounds": rounds, "error": error, "participation": "parallel",
            "live": live, "history": history, "per_round": per_round, "checkpoints": [f"round-{r}" for r in range(1, finished + 1)],
            "traffic": [], "signals": []}  # fmt: skip


@pytest.fixture
def admin_api() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A fake admin API on loopback answering ``/v1/runs/run-1`` with the next of its snapshots (the last one again at the end)."""
    snapshots: list[dict[str, Any]] = []
    served: list[int] = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}" or self.path != "/v1/runs/run-1":
                self.send_error(401 if "Authorization" not in self.headers else 404)
                return
            body = json.dumps(snapshots[min(served[0], len(snapshots) - 1)]).encode()
            served[0] += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test reads stdout."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", snapshots
    finally:
        server.shutdown()
        server.server_close()


def follow(url: str) -> int:
    return main(["runs", "show", "run-1", "--follow", "--admin", url, "--token", TOKEN])


def test_follow_prints_step_progress_lines_and_ends_with_the_run_table(
    admin_api: tuple[str, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Not on a terminal, each owner's steps become lines with loss, rate and time left; a done run ends it with status 0."""
    url, snapshots = admin_api
    snapshots += [snapshot("waiting", 0, 0), snapshot("training", 1, 2), snapshot("training", 1, 4),
                  snapshot("training", 2, 1), snapshot("done", 2, 4)]  # fmt: skip
    assert follow(url) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any("alice round 1/2" in line and "2/4 steps" in line and "loss 2.9000" in line and "128 tok/s" in line
               and "0:01 left" in line for line in lines)  # fmt: skip
    assert any("bob round 2/2" in line and "1/4 steps" in line for line in lines)
    assert any(line.startswith("run-1 done") and "2/2 rounds" in line for line in lines)
    table = out.index("run-1  done  round 2/2")
    assert "val ppl" in out[table:] and "\x1b[" not in out  # the table comes last; no cursor codes in a pipe


def test_a_failed_run_ends_the_follow_with_status_1(
    admin_api: tuple[str, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A run that fails ends the follow; the status is 1 and its error is shown."""
    url, snapshots = admin_api
    snapshots += [snapshot("training", 1, 1), snapshot("failed", 1, 1, error="train on bob failed: boom")]
    assert follow(url) == 1
    assert "train on bob failed: boom" in capsys.readouterr().out


def test_follow_goes_only_with_show(capsys: pytest.CaptureFixture[str]) -> None:
    """``runs --follow`` without show is a usage error."""
    assert main(["runs", "--follow", "--admin", "http://127.0.0.1:9", "--token", TOKEN]) == 2
    assert "--follow goes with runs show ID" in capsys.readouterr().err


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bars_are_redrawn_in_place() -> None:
    """On a terminal the rows are redrawn with cursor movements instead of printed again as new lines."""
    states = iter([snapshot("training", 1, 1), snapshot("training", 1, 2), snapshot("training", 1, 3), snapshot("done", 2, 4)])
    out = FakeTerminal()
    run = follow_run(lambda: next(states), out, interval_s=0)
    assert run["state"] == "done"
    text = out.getvalue()
    # Each redraw of the three rows goes two lines up and erases them (cursor up, erase line).
    assert text.count("\x1b[1A\x1b[2K") >= 2 * 3 and "bob round 2/2" in text


def test_time_left_adds_the_rounds_to_come() -> None:
    """The run's time left is each owner's round left plus its remaining rounds at its rate, the slowest owner's."""
    run = snapshot("training", 1, 2, rounds=3)  # 2 of 4 steps in 1 s: 1 s left, then 2 rounds of 2 s
    run["live"]["bob"].update(seconds=2.0, eta_s=2.0)  # bob is twice as slow: 2 s left, then 2 rounds of 4 s
    rows = dict(progress_rows(run))
    assert rows["run"]["detail"] == "about 0:10 left (training only)"
    assert rows["owner:alice"]["completed"] == 2 and rows["owner:alice"]["total"] == 4
    assert "0:01 left" in rows["owner:alice"]["detail"] and "0:02 left" in rows["owner:bob"]["detail"]
