"""The client's flags, config file and backoff."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.cli import build_parser, config_from_args
from client.config import ProfileSettings, ReconnectSettings, load_config


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return config_from_args(build_parser().parse_args(["run", *argv]))


def test_flags_fill_the_config(tmp_path: Path) -> None:
    """--server, --token, --data and declarations land in their settings, declared ones marked."""
    data = tmp_path / "data.txt"
    data.write_text("text")
    config = parse("--server", "127.0.0.1:5000", "--token", "tok", "--data", str(data), "--declare-upload-bytes-per-s", "1e6", "--declare-memory-bytes", "1000")
    assert config.client.server == "127.0.0.1:5000" and config.client.data == data
    assert config.declare.values() == {"upload_bytes_per_s": 1e6, "memory_bytes": 1000}


def test_a_declared_micro_batch_limit_reaches_the_profile(tmp_path: Path) -> None:
    """--declare-max-micro-batch is an integer >= 1, marked declared in the profile the server gets."""
    from client.profiling import apply_declared
    from proto.messages import DeviceProfile

    config = parse("--server", "127.0.0.1:5000", "--token", "tok", "--declare-max-micro-batch", "4")
    profile = apply_declared(DeviceProfile(memory_bytes=1 << 30), config.declare)
    assert profile.max_micro_batch == 4 and "max_micro_batch" in profile.declared
    with pytest.raises(ValueError, match="max_micro_batch must be an integer >= 1"):
        parse("--server", "127.0.0.1:5000", "--token", "tok", "--declare-max-micro-batch", "0")


def test_config_file_with_flag_override(tmp_path: Path) -> None:
    """The file gives defaults; a flag wins."""
    path = tmp_path / "client.toml"
    path.write_text('[client]\nserver = "10.0.0.1:1"\ntoken = "file-token"\nname = "edge-1"\n[profile]\nquick = true\n')
    config = parse("--config", str(path), "--server", "127.0.0.1:2")
    assert config.client.server == "127.0.0.1:2" and config.client.token == "file-token"
    assert config.client.name == "edge-1" and config.profile.quick


def test_token_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a token or key the client refuses to start and says how to give one."""
    monkeypatch.delenv("TITANIC_TOKEN", raising=False)
    with pytest.raises(ValueError, match="--token"):
        parse("--server", "127.0.0.1:5000")


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """$TITANIC_TOKEN stands in for --token."""
    monkeypatch.setenv("TITANIC_TOKEN", "env-token")
    assert parse("--server", "127.0.0.1:5000").client.token == "env-token"


@pytest.mark.parametrize("server", ["localhost", "host:port", ":5000"])
def test_server_address_must_be_host_port(server: str) -> None:
    """An address without a numeric port is refused."""
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse("--server", server, "--token", "t")


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    """A typo in the config file names the known keys."""
    path = tmp_path / "client.toml"
    path.write_text("[bridge]\nadvertize = 'x'\n")
    with pytest.raises(ValueError, match="advertise"):
        load_config(path)


def test_backoff_grows_to_its_cap_with_bounded_jitter() -> None:
    """Waits double per attempt up to max_s, within +-jitter."""
    settings = ReconnectSettings(initial_s=0.5, max_s=4.0, multiplier=2.0, jitter=0.2)
    middle = [settings.delay(a, 0.5) for a in range(6)]
    assert middle == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert settings.delay(0, 0.0) == pytest.approx(0.4) and settings.delay(0, 0.999999) == pytest.approx(0.6, abs=1e-5)


def test_quick_profile_shrinks_measurements() -> None:
    """Quick mode makes the benchmark and probes short."""
    quick = ProfileSettings(quick=True).effective()
    assert quick.compute_seconds < 0.1 and quick.link_seconds < 0.5 and quick.matmul_size <= 128
