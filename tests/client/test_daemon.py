"""The client daemon as a real process against a real server process on loopback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trustme

from tests.server.support import admin, client_args, processes, spawn, start_server, wait_until

# A client that declares its compute skips the benchmark and starts without importing torch.
DECLARED = ("--device", "cpu", "--declare-flops-per-s", "1e9")


def client_status(admin_url: str, name: str) -> dict | None:  # type: ignore[type-arg]
    return next((c for c in admin(admin_url, "/v1/clients") if c["client_id"] == name), None)


def test_wrong_token_exits_non_zero_with_the_reason(tmp_path: Path) -> None:
    """A client with a wrong join token exits with status 2 and says why."""
    with processes() as started:
        server, control, _ = start_server(tmp_path / "state")
        started.append(server)
        args = client_args(control, "c1", tmp_path / "cache", *DECLARED)
        args[args.index("--token") + 1] = "not-the-token"
        client = spawn("client", "client.cli", *args)
        started.append(client)
        assert client.popen.wait(60) == 2
        assert "titanic-client: error:" in client.output() and "join token is not valid" in client.output()


def test_profile_arrives_and_sigterm_leaves_cleanly(tmp_path: Path) -> None:
    """A client registers, reports a measured profile, and on SIGTERM leaves and exits 0."""
    with processes() as started:
        server, control, admin_url = start_server(tmp_path / "state")
        started.append(server)
        client = spawn("client", "client.cli", *client_args(control, "c1", tmp_path / "cache", "--declare-rtt-s", "0.02"))
        started.append(client)
        record = wait_until(
            lambda: (c := client_status(admin_url, "c1")) and c["status"] == "ready" and c, 60, "c1 ready"
        )
        profile = record["profile"]
        assert profile["flops_per_s"] > 0 and profile["upload_bytes_per_s"] > 0 and profile["download_bytes_per_s"] > 0
        assert profile["rtt_s"] == 0.02 and profile["declared"] == ["rtt_s"]
        assert "matmul" in profile["flops_method"]
        assert client.terminate() == 0
        assert client_status(admin_url, "c1")["status"] == "left"  # type: ignore[index]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_reconnects_with_backoff_when_the_server_returns(tmp_path: Path) -> None:
    """After the server dies the client retries, and registers with the restarted server."""
    port = free_port()
    with processes() as started:
        server, control, admin_url = start_server(tmp_path / "state", "--port", str(port))
        started.append(server)
        client = spawn("client", "client.cli", *client_args(control, "c1", tmp_path / "cache", *DECLARED))
        started.append(client)
        wait_until(lambda: (c := client_status(admin_url, "c1")) and c["status"] == "ready", 60, "c1 ready")
        server.popen.kill()
        server.popen.wait(10)
        client.wait_for_line(lambda s: "reconnecting in" in s, 30)
        restarted, _, admin_url = start_server(tmp_path / "state", "--port", str(port))
        started.append(restarted)
        wait_until(lambda: (c := client_status(admin_url, "c1")) and c["status"] == "ready", 60, "c1 back")
        assert client.popen.poll() is None


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate it signed, and a CA that signed nothing."""
    folder = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": folder / "ca.pem", "other": folder / "other.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    other.cert_pem.write_to_path(str(files["other"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    return files


def test_tls_client_verifies_the_server(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    """Over TLS a client with the right CA joins; one with another CA exits 2 naming the problem."""
    with processes() as started:
        server, control, admin_url = start_server(
            tmp_path / "state", "--tls-cert", str(tls_files["cert"]), "--tls-key", str(tls_files["key"])
        )
        started.append(server)
        assert admin_url.startswith("https://")
        wrong = spawn("wrong", "client.cli", *client_args(control, "wrong", tmp_path / "c2", "--ca", str(tls_files["other"]), *DECLARED))
        good = spawn("good", "client.cli", *client_args(control, "good", tmp_path / "c1", "--ca", str(tls_files["ca"]), *DECLARED))
        started += [wrong, good]
        assert wrong.popen.wait(60) == 2
        assert "TLS handshake" in wrong.output() and "--ca" in wrong.output()
        good.wait_for_line(lambda s: "profile reported" in s, 60)
        assert good.popen.poll() is None
