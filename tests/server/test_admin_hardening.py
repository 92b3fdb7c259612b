"""The admin API against bad bodies over a real loopback socket: size, depth, numbers out of range."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.observe.admin import MAX_BODY_BYTES, MAX_JSON_DEPTH, json_depth, parse_json_body
from server.training.spec import spec_from_mapping

from .support import ADMIN_TOKEN, running_app, server_config

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


async def test_bad_bodies_answer_4xx_with_the_reason(tmp_path: Path) -> None:
    """Deep nesting, non-finite numbers, huge numbers and oversized bodies answer 400/413, never 500; the server still serves."""
    cases = [
        ("[" * 100_000 + "]" * 100_000, 400, "nests deeper"),
        ('{"spec": ' + '{"a": ' * 50 + "1" + "}" * 51, 400, "nests deeper"),
        ('{"spec": {"training": {"lr": Infinity}}}', 400, "Infinity is not a number"),
        ('{"spec": {"training": {"lr": 1e999}}}', 400, "1e999 is out of range"),
        ('{"spec": {"training": {"lr": NaN}}}', 400, "NaN is not a number"),
        ('{"spec": {"training": {"lr": 1e308}}}', 400, "lr must be a positive number up to"),
        ('{"spec": {"rounds": 1' + "0" * 30 + "}}", 400, "rounds must be an integer"),
        ('{"spec": {"training": {"batch_size": 1' + "0" * 12 + "}}}", 400, "batch_size must be an integer"),
        ("[" * 10 + "x" * MAX_BODY_BYTES + "]" * 10, 413, ""),
        (b"\xff\xfe{}", 400, "not UTF-8"),
    ]
    async with running_app(server_config(tmp_path)) as app, aiohttp.ClientSession(headers=AUTH) as http:
        for body, status, reason in cases:
            async with http.post(app.admin_url + "/v1/runs", data=body) as response:
                assert response.status == status, (str(body)[:60], await response.text())
                if reason:
                    assert reason in (await response.json())["error"], str(body)[:60]
        async with http.get(app.admin_url + "/v1/status") as response:
            assert response.status == 200


def test_json_depth_ignores_brackets_in_strings() -> None:
    """Brackets inside strings (with escaped quotes) do not count toward the depth."""
    assert json_depth('{"a": "[[[[\\"[[[", "b": [[1]]}') == 3
    assert json_depth("1") == 0


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values)
def test_any_json_spec_is_parsed_or_refused_with_value_error(value: object) -> None:
    """Whatever JSON arrives as a spec, it becomes a RunSpec or a ValueError/TypeError (a 400), never anything else."""
    import json

    raw = json.dumps({"spec": value}).encode()
    try:
        body = parse_json_body(raw)
        spec_from_mapping(body["spec"]) if isinstance(body["spec"], dict) else None
    except (ValueError, TypeError):
        pass


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_body_parses_or_is_value_error(data: bytes) -> None:
    """Arbitrary bytes parse as JSON or raise ValueError with a reason (a 400), never another error."""
    try:
        parse_json_body(data)
    except ValueError as exc:
        assert str(exc)


def test_depth_limit_is_enforced_exactly() -> None:
    """MAX_JSON_DEPTH levels parse; one more is refused."""
    assert parse_json_body(("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH).encode())
    with pytest.raises(ValueError, match="nests deeper"):
        parse_json_body(("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)).encode())
