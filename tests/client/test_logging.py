"""``titanic-client run --log-format json``: one JSON object per log line."""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from autograd_bridge.logs import JsonLinesFormatter, configure_logging
from client.cli import build_parser
from tests.server.support import client_args, processes, spawn


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The root logger also writes JSON lines to a buffer while the test runs."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging("INFO", "json", stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)


def test_a_record_is_one_json_object_with_time_level_logger_and_message() -> None:
    """The formatter writes the record's fields, and its exception's traceback when there is one."""
    try:
        raise ConnectionError("server gone")
    except ConnectionError:
        record = logging.getLogger("client.test").makeRecord(
            "client.test", logging.WARNING, __file__, 1, "%s; reconnecting", ("gone",), exc_info=sys.exc_info()
        )
    entry = json.loads(JsonLinesFormatter().format(record))
    assert entry["level"] == "WARNING" and entry["logger"] == "client.test" and entry["message"] == "gone; reconnecting"
    assert entry["time"].endswith("+00:00") and "ConnectionError: server gone" in entry["exception"]


def test_configured_json_logging_writes_a_line_per_record(json_log: io.StringIO) -> None:
    """Each record is one parseable line; records below the level are left out."""
    logging.getLogger("client.daemon").debug("hidden")
    logging.getLogger("client.daemon").info("registered as %s", "owner0")
    (line,) = json_log.getvalue().splitlines()
    assert json.loads(line)["message"] == "registered as owner0"


def test_the_flag_defaults_to_text() -> None:
    """--log-format is text unless json is asked for."""
    assert build_parser().parse_args(["run"]).log_format == "text"
    assert build_parser().parse_args(["run", "--log-format", "json"]).log_format == "json"


def test_a_client_process_logs_json_lines(tmp_path: Path) -> None:
    """A real ``titanic-client run --log-format json`` with no server to reach logs its retries as JSON lines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    with processes() as started:
        client = spawn("client", "client.cli", *client_args(f"127.0.0.1:{port}", "c1", tmp_path, "--log-format", "json"))
        started.append(client)
        line = client.wait_for_line(lambda s: "reconnecting" in s, 120)
        client.terminate()
    entry = json.loads(line)
    assert entry["logger"] == "client.daemon" and entry["level"] == "WARNING"
    assert all(isinstance(json.loads(s), dict) for s in client.lines)
