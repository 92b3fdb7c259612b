"""Tests of proto/generate.py: the committed modules match the .proto files, and --check notices when not."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"

SERVICE_PROTO = """\
syntax = "proto3";
package titanic.demo;
import "proto/bridge.proto";
import "google/protobuf/empty.proto";
message Ping { titanic.bridge.MessageKind kind = 1; }
service Demo { rpc Call (Ping) returns (google.protobuf.Empty); }
"""


def run_generate(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m proto.generate`` with ``root`` as working directory (so its proto/ is used)."""
    return subprocess.run(
        [sys.executable, "-m", "proto.generate", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def proto_copy(tmp_path: Path) -> Path:
    """A scratch repository root holding a copy of proto/ (sources and generated files)."""
    shutil.copytree(PROTO_DIR, tmp_path / "proto", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_repository_generated_files_are_fresh() -> None:
    """--check passes on the real proto/: the committed modules match the .proto files."""
    result = run_generate(REPO_ROOT, "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


def test_check_fails_on_modified_generated_file(proto_copy: Path) -> None:
    """An edited bridge_pb2.py makes --check exit 1 and name the file as stale."""
    target = proto_copy / "proto" / "bridge_pb2.py"
    target.write_text(target.read_text() + "# hand edit\n")
    result = run_generate(proto_copy, "--check")
    assert result.returncode == 1
    assert str(proto_copy) in result.stderr  # the copy was checked, not the repository
    assert "bridge_pb2.py: stale" in result.stderr
    assert "python -m proto.generate" in result.stderr


def test_check_fails_on_missing_stub(proto_copy: Path) -> None:
    """A deleted bridge_pb2.pyi makes --check exit 1 and name the file as missing."""
    (proto_copy / "proto" / "bridge_pb2.pyi").unlink()
    result = run_generate(proto_copy, "--check")
    assert result.returncode == 1
    assert "bridge_pb2.pyi: missing" in result.stderr


def test_check_fails_on_edited_proto_source(proto_copy: Path) -> None:
    """Changing a .proto without regenerating makes the generated files stale."""
    source = proto_copy / "proto" / "bridge.proto"
    source.write_text(source.read_text() + "\nmessage Extra { uint32 x = 1; }\n")
    result = run_generate(proto_copy, "--check")
    assert result.returncode == 1
    assert "bridge_pb2.py: stale" in result.stderr


def test_generate_repairs_what_check_reported(proto_copy: Path) -> None:
    """Running the generator after a hand edit restores the files so --check passes again."""
    target = proto_copy / "proto" / "bridge_pb2.py"
    original = target.read_bytes()
    target.write_text("broken\n")
    assert run_generate(proto_copy).returncode == 0
    assert target.read_bytes() == original
    assert run_generate(proto_copy, "--check").returncode == 0


def test_service_file_gets_grpc_module(proto_copy: Path) -> None:
    """A .proto with a service gets a _pb2_grpc.py that imports its siblings from the proto package."""
    (proto_copy / "proto" / "demo.proto").write_text(SERVICE_PROTO)
    assert run_generate(proto_copy, "--check").returncode == 1  # nothing generated yet
    result = run_generate(proto_copy)
    assert result.returncode == 0, result.stderr
    generated = proto_copy / "proto"
    assert (generated / "demo_pb2_grpc.py").exists()
    assert not (generated / "bridge_pb2_grpc.py").exists()  # no service there
    assert "from proto import bridge_pb2" in (generated / "demo_pb2.py").read_text()
    assert "from proto import demo_pb2" in (generated / "demo_pb2_grpc.py").read_text()
    assert run_generate(proto_copy, "--check").returncode == 0


def test_check_reports_orphaned_generated_file(proto_copy: Path) -> None:
    """A generated module whose .proto is gone is reported, and removed by the generator."""
    orphan = proto_copy / "proto" / "gone_pb2.py"
    orphan.write_text("# left over\n")
    result = run_generate(proto_copy, "--check")
    assert result.returncode == 1
    assert "gone_pb2.py: orphaned" in result.stderr
    assert run_generate(proto_copy).returncode == 0
    assert not orphan.exists()


def test_invalid_proto_fails_with_protoc_message(proto_copy: Path) -> None:
    """A syntax error in a .proto makes the generator exit 1 and show protoc's complaint."""
    (proto_copy / "proto" / "broken.proto").write_text('syntax = "proto3";\nmessage { }\n')
    result = run_generate(proto_copy)
    assert result.returncode == 1
    assert "broken.proto" in result.stderr
