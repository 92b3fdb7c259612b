"""``titanic-server run --log-format json``: one JSON object per log line."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from autograd_bridge.logs import JsonLinesFormatter, configure_logging
from server.cli import build_parser

from .support import processes, start_server


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
        raise ValueError("bad input")
    except ValueError:
        record = logging.getLogger("server.test").makeRecord(
            "server.test", logging.ERROR, __file__, 1, "failed: %s", ("x",), exc_info=sys.exc_info()
        )
    entry = json.loads(JsonLinesFormatter().format(record))
    assert entry["level"] == "ERROR" and entry["logger"] == "server.test" and entry["message"] == "failed: x"
    assert entry["time"].endswith("+00:00") and "T" in entry["time"]
    assert "Traceback" in entry["exception"] and "ValueError: bad input" in entry["exception"]


def test_configured_json_logging_keeps_every_record_on_one_line(json_log: io.StringIO) -> None:
    """A message with a newline and non-ASCII text is still one line of JSON, and warnings become records."""
    import warnings

    logging.getLogger("server.cli.test").warning("two\nlines, café")
    warnings.warn("old flag", DeprecationWarning, stacklevel=1)
    lines = json_log.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]
    assert entries[0]["message"] == "two\nlines, café" and entries[0]["level"] == "WARNING"
    assert entries[1]["logger"] == "py.warnings" and "old flag" in entries[1]["message"]


def test_the_flag_defaults_to_text_and_refuses_other_formats() -> None:
    """--log-format is text unless json is asked for; anything else is a usage error."""
    assert build_parser().parse_args(["run"]).log_format == "text"
    assert build_parser().parse_args(["run", "--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--log-format", "xml"])


def test_a_server_process_logs_json_lines(tmp_path: Path) -> None:
    """A real ``titanic-server run --log-format json`` writes its logs (here: why there is no plan) as JSON lines."""
    with processes() as started:
        server, _, _ = start_server(tmp_path, "--log-format", "json", "--settle", "0.1")
        started.append(server)
        line = server.wait_for_line(lambda s: "no plan" in s, 30)
        server.terminate()
    entry = json.loads(line)
    assert entry["logger"] == "server.planning.coordinator" and entry["level"] == "INFO"
    others = [s for s in server.lines if not s.startswith("titanic-server ready")]
    assert others and all(isinstance(json.loads(s), dict) for s in others)
