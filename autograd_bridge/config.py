"""Settings dataclasses from TOML: the one reader the server, the client and the run files share.

A config file is a set of tables, each filling one keyword-only dataclass; a key the
dataclass does not have is refused with the list of those it has, so a typo never passes
silently. Paths are expanded (``~``) and TOML arrays become tuples.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def section_from_mapping(cls: type[Any], table: Mapping[str, Any], name: str) -> Any:
    """Build dataclass ``cls`` from the TOML table ``[name]``, refusing keys it does not have."""
    if not isinstance(table, Mapping):
        raise ValueError(f"[{name}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in [{name}]; known keys: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        hint = hints[key]
        if isinstance(value, str) and (hint is Path or Path in typing.get_args(hint)):
            value = Path(value).expanduser()
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"[{name}]: {exc}") from exc


def sections_from_mapping(sections: Mapping[str, type[Any]], data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """One dataclass per table of ``data``; a table not in ``sections`` is refused, naming ``what`` is read."""
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ValueError(f"unknown table(s) {', '.join(unknown)} in the {what}; known: {', '.join(sections)}")
    return {name: section_from_mapping(sections[name], table, name) for name, table in data.items()}


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """The parsed TOML file at ``path`` (ValueError saying what is wrong with it)."""
    try:
        with Path(path).open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ValueError(f"{what} {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid TOML: {exc}") from exc
