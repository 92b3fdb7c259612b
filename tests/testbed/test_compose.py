"""docker-compose.yml and the Dockerfile: every command they run parses with the project's own CLI."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from client.cli import build_parser as client_parser
from server.cli import build_parser as server_parser
from testbed.cli import build_parser as bed_parser

ROOT = Path(__file__).resolve().parents[2]
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "titanic-server": server_parser,
    "titanic-client": client_parser,
    "titanic-testbed": bed_parser,
}
_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def interpolate(text: str) -> str:
    """Compose's ``${NAME:-default}`` with nothing set in the environment (the defaults)."""
    if "${" in _DEFAULTED.sub("", text):
        raise ValueError(f"{text!r} uses a variable without a default; the demo must run with none set")
    return _DEFAULTED.sub(lambda m: m.group(2), text)


def parse_command(argv: list[str]) -> list[str]:
    """Parse ``argv`` with its program's parser (and a shaped command's inner one); returns the programs."""
    program = argv[0]
    if program not in PARSERS:
        raise AssertionError(f"{argv} runs {program}, which is not one of the project's commands")
    args = PARSERS[program]().parse_args(argv[1:])  # SystemExit on anything the CLI would refuse
    inner = getattr(args, "argv", None)
    if program == "titanic-testbed" and args.command == "shape" and inner:
        return [program, *parse_command(inner[1:] if inner[0] == "--" else inner)]
    return [program]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def commands() -> list[tuple[str, list[str]]]:
    """Each service's command and each titanic-* healthcheck, with defaults interpolated."""
    found = []
    for name, service in compose()["services"].items():
        if "command" in service:
            found.append((f"{name}.command", [interpolate(str(a)) for a in service["command"]]))
        test = service.get("healthcheck", {}).get("test", [])
        if test[:1] == ["CMD"] and test[1].startswith("titanic-"):
            found.append((f"{name}.healthcheck", [interpolate(str(a)) for a in test[1:]]))
    return found


@pytest.mark.parametrize(("where", "argv"), commands(), ids=[w for w, _ in commands()])
def test_compose_command_parses_with_the_projects_cli(where: str, argv: list[str]) -> None:
    """The command parses with the titanic-* parser of its program (and of the program it execs)."""
    assert parse_command(argv)


def test_every_client_is_shaped_and_may_shape() -> None:
    """Each client service runs titanic-client behind `titanic-testbed shape`, with NET_ADMIN and limits."""
    clients = {n: s for n, s in compose()["services"].items() if "titanic-client" in s.get("command", [])}
    assert {"owner-a", "owner-b", "helper"} <= set(clients)
    for name, service in clients.items():
        assert parse_command(service["command"]) == ["titanic-testbed", "titanic-client"], name
        assert "NET_ADMIN" in service["cap_add"], name
        assert service["cpus"] and service["mem_limit"], name


def test_data_owners_each_have_their_own_volume() -> None:
    """owner-a and owner-b mount different named volumes at the folder their --data points to."""
    services = compose()["services"]
    mounts = {}
    for name in ("owner-a", "owner-b"):
        argv = services[name]["command"]
        data = argv[argv.index("--data") + 1]
        (volume,) = [v.split(":")[0] for v in services[name]["volumes"] if v.split(":")[1] == data]
        mounts[name] = volume
    assert len(set(mounts.values())) == 2 and set(mounts.values()) <= set(compose()["volumes"])


def test_the_run_starter_waits_for_every_named_client() -> None:
    """The one-shot starter waits for as many clients as the file starts (owners plus helper replicas)."""
    services = compose()["services"]
    argv = services["start-run"]["command"]
    args = bed_parser().parse_args(argv[1:])
    expected = 2 + services["helper"]["deploy"]["replicas"]
    assert args.clients == expected
    assert (ROOT / "testbed" / args.run.name).is_file()


def test_dockerfile_installs_cpu_torch_before_the_project() -> None:
    """torch==2.13.0 from the CPU index comes before `pip install .`, so pip never pulls CUDA."""
    text = (ROOT / "Dockerfile").read_text()
    torch = text.index("torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    assert torch < text.index("pip install --no-cache-dir .")


def test_interpolate_refuses_a_variable_without_default() -> None:
    """The demo must come up with no environment set, so every variable needs a default."""
    assert interpolate("${A:-x}-${B:-y}") == "x-y"
    with pytest.raises(ValueError, match="without a default"):
        interpolate("${SECRET}")


def test_published_ports_bind_loopback_only() -> None:
    """Every port the compose file publishes binds 127.0.0.1, never all interfaces."""
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_the_server_refuses_the_demo_tokens_unless_told_it_is_a_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's compose command with its fallback tokens fails to configure unless TITANIC_DEMO=1."""
    from server.cli import config_from_args

    service = compose()["services"]["server"]
    argv = [interpolate(str(a)) for a in service["command"]]
    monkeypatch.setenv("TITANIC_ADMIN_TOKEN", interpolate(service["environment"]["TITANIC_ADMIN_TOKEN"]))
    monkeypatch.setenv("TITANIC_DEMO", interpolate(service["environment"]["TITANIC_DEMO"]))
    args = server_parser().parse_args(argv[1:])
    with pytest.raises(ValueError, match="public demo tokens"):
        config_from_args(args)
    monkeypatch.setenv("TITANIC_DEMO", "1")
    assert config_from_args(args).auth.join_tokens == ("demo-join",)
    monkeypatch.setenv("TITANIC_DEMO", "0")
    monkeypatch.setenv("TITANIC_ADMIN_TOKEN", "a-secret-of-my-own")
    args = server_parser().parse_args([*argv[1:-2], "--join-token", "another-secret"])
    assert config_from_args(args).auth.admin_token == "a-secret-of-my-own"
