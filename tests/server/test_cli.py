"""``titanic-server`` as a process: the admin commands' output, their errors, and a clean SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .support import ADMIN_TOKEN, REPO_ROOT, processes, spawn, start_server


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )


def test_admin_commands_print_tables_and_json(tmp_path: Path) -> None:
    """status, clients, plan and runs print aligned text, or JSON with --json."""
    with processes() as started:
        server, control, admin_url = start_server(tmp_path / "state")
        started.append(server)
        auth = ["--admin", admin_url, "--token", ADMIN_TOKEN]
        status = cli("status", *auth)
        assert status.returncode == 0, status.stderr
        assert f"control plane  {control}" in status.stdout
        clients = cli("clients", *auth)
        assert clients.stdout.splitlines()[0].split() == ["client", "status", "owner", "compute", "memory", "upload", "download", "rtt", "last", "seen"]
        assert cli("runs", *auth).stdout.strip() == "no runs"
        plan = json.loads(cli("plan", "--json", *auth).stdout)
        assert plan["plan_id"] == "" and isinstance(plan["rows"], list)


def test_wrong_admin_token_is_a_clear_error(tmp_path: Path) -> None:
    """A wrong token exits with status 2 and says to pass the right one."""
    with processes() as started:
        server, _, admin_url = start_server(tmp_path / "state")
        started.append(server)
        result = cli("status", "--admin", admin_url, "--token", "wrong")
        assert result.returncode == 2 and "refused the token" in result.stderr


def test_unreachable_admin_api_is_a_clear_error(tmp_path: Path) -> None:
    """With no server listening the command says so instead of a traceback."""
    result = cli("status", "--admin", "http://127.0.0.1:9", "--token", "x")
    assert result.returncode == 2 and "is titanic-server running?" in result.stderr


def test_generated_tokens_and_clean_sigterm(tmp_path: Path) -> None:
    """Without configured tokens the server writes them to its state dir, the CLI finds them, and SIGTERM exits 0."""
    state = tmp_path / "state"
    with processes() as started:
        server = spawn("server", "server.cli", "run", "--port", "0", "--admin-port", "0", "--state-dir", str(state))
        started.append(server)
        line = server.wait_for_line(lambda s: s.startswith("titanic-server ready"), 60)
        admin_url = line.split("admin=")[1].strip()
        assert (state / "join_token").stat().st_mode & 0o777 == 0o600
        result = cli("status", "--admin", admin_url, "--state-dir", str(state))
        assert result.returncode == 0 and "clients        none" in result.stdout
        assert server.terminate() == 0


def test_every_run_flag_names_a_run_setting(tmp_path: Path) -> None:
    """Each ``runs start`` flag is a top-level or flat key of run files, and overrides what the file sets in sections."""
    from server.cli import RUN_FLAGS, build_parser
    from server.training.spec import FLAT_KEYS, TOP_LEVEL, load_run_spec

    assert set(RUN_FLAGS) <= set(TOP_LEVEL) | set(FLAT_KEYS)
    path = tmp_path / "run.toml"
    path.write_text('[participation]\nmode = "single"\n[local_work]\nsteps = 4\n')
    args = build_parser().parse_args(["runs", "start", str(path), "--case", "3", "--steps-per-round", "9", "--lr", "0.5"])
    spec = load_run_spec(args.target, {flag: getattr(args, f"run_{flag}") for flag in RUN_FLAGS})
    assert (spec.participation.mode, spec.local_work.steps, spec.training.lr) == ("parallel", 9, 0.5)
