"""Generate the Python modules of every ``.proto`` file in ``proto/``.

Run ``python -m proto.generate`` after editing a ``.proto`` file, and commit what it writes:
for each ``proto/x.proto`` the module ``x_pb2.py``, its stub ``x_pb2.pyi`` and, when the file
declares a ``service``, the gRPC module ``x_pb2_grpc.py``. The repository root is the include
path, so generated code imports its siblings as ``from proto import x_pb2``.

``python -m proto.generate --check`` generates into a temporary directory and compares with the
files on disk; it exits with status 1, naming every stale, missing or orphaned file, when they
differ. The output depends on the grpcio-tools version, so run both with the same one.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
# Generated names end with one of these; a file on disk ending so without a .proto is an orphan.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class GenerateError(RuntimeError):
    """protoc rejected a .proto file (its own message has already gone to stderr)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Difference:
    """One generated file whose copy on disk does not match a fresh generation."""

    name: str  # file name inside proto/, e.g. "bridge_pb2.py"
    problem: str  # "missing", "stale" or "orphaned"


def generate_into(out_root: Path, proto_dir: Path = PROTO_DIR) -> dict[str, bytes]:
    """Run protoc for every ``*.proto`` in ``proto_dir``; return ``{file name: contents}``.

    ``out_root`` is an empty scratch directory; the files land in ``out_root/<proto_dir name>/``.
    """
    include_root = proto_dir.parent
    # google/protobuf/*.proto (well-known types) ship inside grpc_tools.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    generated: dict[str, bytes] = {}
    for proto_file in sorted(proto_dir.glob("*.proto")):
        relative = proto_file.relative_to(include_root).as_posix()
        descriptor_file = out_root / f"{proto_file.stem}.descriptor"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{include_root}",
                f"-I{well_known}",
                f"--python_out={out_root}",
                f"--pyi_out={out_root}",
                f"--grpc_python_out={out_root}",
                f"--descriptor_set_out={descriptor_file}",
                str(proto_file),
            ]
        )
        if code != 0:
            raise GenerateError(f"protoc failed on {relative} (exit status {code}); see its message above")
        out_dir = out_root / proto_dir.name
        names = [f"{proto_file.stem}_pb2.py", f"{proto_file.stem}_pb2.pyi"]
        # The gRPC plugin writes a module for every file; keep it only where there is a service.
        if _declares_service(descriptor_file):
            names.append(f"{proto_file.stem}_pb2_grpc.py")
        for name in names:
            generated[name] = (out_dir / name).read_bytes()
    return generated


def _declares_service(descriptor_file: Path) -> bool:
    """Whether the single file described by a protoc descriptor set declares a service."""
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(descriptor_file.read_bytes())
    return any(len(file.service) > 0 for file in descriptors.file)


def _generated_on_disk(proto_dir: Path) -> set[str]:
    return {path.name for path in proto_dir.iterdir() if path.name.endswith(GENERATED_SUFFIXES)}


def compare(generated: dict[str, bytes], proto_dir: Path = PROTO_DIR) -> list[Difference]:
    """Every file where ``proto_dir`` differs from ``generated``, sorted by name."""
    differences = []
    for name in sorted(set(generated) | _generated_on_disk(proto_dir)):
        path = proto_dir / name
        if name not in generated:
            differences.append(Difference(name=name, problem="orphaned"))
        elif not path.exists():
            differences.append(Difference(name=name, problem="missing"))
        elif path.read_bytes() != generated[name]:
            differences.append(Difference(name=name, problem="stale"))
    return differences


def write(generated: dict[str, bytes], proto_dir: Path = PROTO_DIR) -> list[Difference]:
    """Bring ``proto_dir`` in line with ``generated``; return what was changed."""
    differences = compare(generated, proto_dir)
    for difference in differences:
        path = proto_dir / difference.name
        if difference.problem == "orphaned":
            path.unlink()
        else:
            path.write_bytes(generated[difference.name])
    return differences


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m proto.generate", description="Generate the Python modules of proto/*.proto."
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if any generated file differs from a fresh generation",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="proto-generate-") as scratch:
        try:
            generated = generate_into(Path(scratch))
        except GenerateError as error:
            print(f"proto.generate: {error}", file=sys.stderr)
            return 1
    if args.check:
        differences = compare(generated)
        if differences:
            print(f"proto.generate --check: generated files in {PROTO_DIR} are out of date:", file=sys.stderr)
            for difference in differences:
                print(f"  {difference.name}: {difference.problem}", file=sys.stderr)
            print("Run `python -m proto.generate` and commit the result.", file=sys.stderr)
            return 1
        print(f"proto.generate --check: {len(generated)} generated files are up to date")
        return 0
    for difference in write(generated):
        action = "removed" if difference.problem == "orphaned" else "wrote"
        print(f"{action} {PROTO_DIR.name}/{difference.name} ({difference.problem})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
