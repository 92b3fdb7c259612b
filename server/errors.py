"""The one exception family of the server.

::

    ServerError
    ├── AuthenticationError    bad join token or key, unknown or expired session
    ├── InvalidRequestError    a message that breaks the protocol (bad name, chunk before header, ...)
    ├── NotFoundError          a run or partition the server does not have
    ├── ForbiddenError         a client asking for something that was not given to it
    ├── LimitExceededError     a request over a configured limit (probe length, upload size)
    ├── IntegrityError         uploaded bytes that do not match their declared size or sha256
    └── PlanningError          no plan fits the clients (says which constraint failed, what would fix it)

The control handler raises these; only ``server/servicer.py`` turns them into gRPC status
codes (``GRPC_STATUS``), and only ``server/admin.py`` into HTTP answers. Messages say what
the caller should do next. Mistakes in the operator's configuration are ``ValueError``.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base class of every error the server raises on purpose."""


class AuthenticationError(ServerError):
    """The caller did not prove who it is: a wrong join token or key, or a stale session."""


class InvalidRequestError(ServerError):
    """A request that no correct client sends."""


class NotFoundError(ServerError):
    """The request names something the server does not have."""


class ForbiddenError(ServerError):
    """The client is who it says, but the thing it asks for is not its to take."""


class LimitExceededError(ServerError):
    """The request asks for more than the server's configured limits allow."""


class IntegrityError(ServerError):
    """Received data does not match the size or digest announced with it."""


class PlanningError(ServerError):
    """The planner found no assignment; the message names the failed constraint and a fix."""
