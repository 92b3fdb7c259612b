"""The server's TOML config and flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import build_parser, config_from_args
from server.config import ControlSettings, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_full_config_file_is_read(tmp_path: Path) -> None:
    """Every table of a config file lands in its dataclass, with paths as Path."""
    config = load_config(
        write(
            tmp_path,
            """
            [server]
            port = 6000
            state_dir = "/var/lib/titanic"
            [auth]
            join_tokens = ["a-long-token"]
            admin_token = "admin-token"
            [auth.client_keys]
            alice = "alice-secret"
            [control]
            heartbeat_interval_s = 0.5
            heartbeat_timeout_s = 2
            [model]
            path = "some/model"
            stages = 3
            [planning]
            settle_s = 0.1
            solver = "matching"
            """,
        )
    )
    assert config.server.port == 6000 and config.server.state_dir == Path("/var/lib/titanic")
    assert config.auth.join_tokens == ("a-long-token",) and config.auth.client_keys == {"alice": "alice-secret"}
    assert config.control.heartbeat_timeout_s == 2
    assert config.model is not None and config.model.stages == 3
    assert config.planning.solver == "matching"


def test_unknown_key_names_the_known_ones(tmp_path: Path) -> None:
    """A typo in a key is an error listing the keys that exist."""
    with pytest.raises(ValueError, match=r"unknown key\(s\) hearbeat_timeout_s in \[control\].*heartbeat_timeout_s"):
        load_config(write(tmp_path, "[control]\nhearbeat_timeout_s = 3\n"))


def test_unknown_table_is_an_error(tmp_path: Path) -> None:
    """A table the server does not know is an error."""
    with pytest.raises(ValueError, match="unknown table"):
        load_config(write(tmp_path, "[servr]\nport = 1\n"))


def test_timeout_must_exceed_interval() -> None:
    """A heartbeat timeout not longer than the interval is refused with a fix."""
    with pytest.raises(ValueError, match="longer than heartbeat_interval_s"):
        ControlSettings(heartbeat_interval_s=2.0, heartbeat_timeout_s=2.0)


def test_flags_override_the_file(tmp_path: Path) -> None:
    """Flags win over the file; unset flags leave the file's values."""
    path = write(tmp_path, '[server]\nport = 6000\nadmin_port = 6001\n[auth]\njoin_tokens = ["file-token"]\n')
    args = build_parser().parse_args(["run", "--config", str(path), "--port", "0", "--join-token", "flag-token-1", "--model", "m", "--stages", "2"])
    config = config_from_args(args)
    assert config.server.port == 0 and config.server.admin_port == 6001
    assert config.auth.join_tokens == ("flag-token-1",)
    assert config.model is not None and config.model.path == "m" and config.model.stages == 2


def test_tls_flags_go_together(tmp_path: Path) -> None:
    """A certificate without a key is a usage error."""
    args = build_parser().parse_args(["run", "--tls-cert", str(tmp_path / "c.pem")])
    with pytest.raises(ValueError, match="go together"):
        config_from_args(args)
