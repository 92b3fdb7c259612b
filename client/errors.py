"""The one exception family of the client daemon.

::

    ClientError
    ├── RegistrationRefusedError   the server will not let this client in (token, key, name): fatal
    ├── TlsVerificationError       the server's certificate does not verify against the CA: fatal
    ├── ServerUnavailableError     the server cannot be reached now: reconnect with backoff
    ├── SessionEndedError          the server ended this client's session: register again
    ├── ControlCallError           the server refused one call (any other status)
    ├── WeightsError               downloaded weights fail their size or sha256 check
    └── HostingError               a run's stages could not be built, served or reached

``client/channel.py`` turns gRPC errors into these; the daemon decides from the class alone
whether to exit, to reconnect, or to report a command as failed.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base class of every error the client raises on purpose."""


class RegistrationRefusedError(ClientError):
    """The server refused the registration; retrying with the same settings cannot help."""


class TlsVerificationError(ClientError):
    """The server's TLS certificate could not be verified."""


class ServerUnavailableError(ClientError):
    """The server did not answer (down, restarting, or the network is gone)."""


class SessionEndedError(ClientError):
    """The server no longer accepts this session (it restarted, or marked the client lost)."""


class ControlCallError(ClientError):
    """The server answered a call with an error."""

    def __init__(self, message: str, *, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class WeightsError(ClientError):
    """Weights that arrived do not match what the server announced."""


class HostingError(ClientError):
    """A run's stages could not be built, served, or its peers reached."""


class PeerGoneError(ClientError):
    """A stage host of the owner's pipeline went away (or stopped answering) mid-command.

    An expected event on edge devices: the daemon reports the command failed and names the
    client (``peer``) so the server can replan without it and replay the round.
    """

    def __init__(self, message: str, *, peer: str) -> None:
        super().__init__(message)
        self.peer = peer
