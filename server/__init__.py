"""Titanic server: control plane, planner and round logic."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("titanic")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
