"""The architecture rules: proto/ imports nothing of ours, autograd_bridge/ only proto/, server/ and client/ never each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"proto", "autograd_bridge", "server", "client", "testbed", "bench", "tests"}
ALLOWED = {
    "proto": set(),
    "autograd_bridge": {"proto"},
    "server": {"proto", "autograd_bridge"},
    "client": {"proto", "autograd_bridge"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages of ours that a module imports (absolute imports; relative ones stay inside)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_it_builds_on(package: str) -> None:
    """Every module of ``package`` imports only itself and the packages below it."""
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - ALLOWED[package] - {package})
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_contract_is_declared_once() -> None:
    """One set of control-plane dataclasses: neither side re-declares them or converts protobuf itself."""
    for side in ("server", "client"):
        for path in (ROOT / side).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert "control_pb2 import" not in text or path.name in ("servicer.py", "channel.py", "app.py"), path
    assert not (ROOT / "client" / "messages.py").exists() and not (ROOT / "client" / "convert.py").exists()
    proto = (ROOT / "proto" / "control.proto").read_text(encoding="utf-8")
    assert "json" not in proto.replace("config.json", "").lower()  # no JSON inside string fields
