"""``titanic-server run`` as a process: a model that cannot be loaded stops it with the reason; nothing is left in the temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from .support import processes, spawn, start_server


def test_missing_model_exits_at_once_with_the_reason(tmp_path: Path) -> None:
    """``--model /no/such/dir`` exits with status 2 before listening, naming the path."""
    with processes() as started:
        server = spawn("server", "server.cli", "run", "--port", "0", "--admin-port", "0",
                       "--state-dir", str(tmp_path / "state"), "--model", str(tmp_path / "no" / "such" / "dir"))  # fmt: skip
        started.append(server)
        assert server.popen.wait(120) == 2
    output = "".join(server.lines)
    assert "does not exist" in output and "no/such/dir" in output and "ready" not in output


@pytest.mark.slow
def test_unloadable_model_stops_the_server_with_the_reason(tmp_path: Path) -> None:
    """A model folder that exists but holds no model: the server stops (status 2) with the loader's reason."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    with processes() as started:
        server = spawn("server", "server.cli", "run", "--port", "0", "--admin-port", "0",
                       "--state-dir", str(tmp_path / "state"), "--model", str(model))  # fmt: skip
        started.append(server)
        assert server.popen.wait(240) == 2
    assert "cannot be loaded" in "".join(server.lines)


@pytest.mark.slow
def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    """A server stopped with SIGTERM leaves its temp directory as it found it."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    with processes() as started:
        server, _, _ = start_server(tmp_path / "state", env={"TMPDIR": str(temp)}, timeout_s=120)
        started.append(server)
        assert server.terminate() == 0
    assert list(temp.iterdir()) == []
