"""Deployment tooling: an emulated heterogeneous network of real Titanic daemons, and containers.

The testbed drives ``titanic-server`` and ``titanic-client`` from the outside, through their
command lines; it imports neither package (they meet on the wire, and so does the testbed).
:mod:`testbed.netns` builds the ``ip``/``tc`` commands (pure functions, testable without root),
:mod:`testbed.orchestrate` runs them and the daemons, :mod:`testbed.cli` is ``titanic-testbed``.
"""
