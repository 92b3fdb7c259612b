"""The one exception family of the autograd bridge.

::

    BridgeError
    ├── UnsupportedModelError      the model cannot be split (says which piece is missing)
    ├── FrameError                 a frame that cannot be accepted (malformed, too big, wrong ids)
    │   ├── FrameTooLargeError
    │   └── ReceiveBudgetError     no room in the receiver's byte budget for a message (receive_budget.py)
    ├── RemoteStageError           the peer answered a request with an error frame
    ├── PeerLostError              the connection to a peer closed while a request was pending
    ├── BridgeTimeoutError         a peer did not answer in time
    └── StateLimitError            a stage host holds too many micro-batches already

Messages say what to do next. Code that receives bytes from a peer raises these (never
``assert``), and a host answers the offending frame with an error frame instead of crashing.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base class of every error the bridge raises on purpose."""


class UnsupportedModelError(BridgeError):
    """The model's structure could not be mapped onto pipeline stages."""


class FrameError(BridgeError):
    """A frame or message was malformed or not expected.

    A stage host answers such a frame with an error frame and keeps the connection; a transport
    that finds a lying message length closes the connection, since it cannot resynchronise.
    """


class FrameTooLargeError(FrameError):
    """A frame (or a tensor in it) is larger than the configured maximum."""


class ReceiveBudgetError(FrameError):
    """A receiver refused a message because its byte budget for receive buffers had no room for it.

    Raised when the message alone is larger than the budget's share per peer, or when no room
    came within the budget's wait; the transport then closes that connection with a reason.
    """


class RemoteStageError(BridgeError):
    """A stage host reported an error while handling a request."""

    def __init__(self, message: str, *, code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.code = code


class PeerLostError(BridgeError):
    """The peer disconnected while a request to it was outstanding.

    ``stage`` is the pipeline stage whose host was lost, when the caller knows it (a
    :class:`~autograd_bridge.remote.StageClient` does), so a data owner can name the client.
    """

    def __init__(self, message: str, *, stage: int | None = None) -> None:
        super().__init__(message)
        self.stage = stage


class BridgeTimeoutError(BridgeError):
    """A peer did not answer within the configured time (``stage``: as for PeerLostError)."""

    def __init__(self, message: str, *, stage: int | None = None) -> None:
        super().__init__(message)
        self.stage = stage


class StateLimitError(BridgeError):
    """A stage host refused a micro-batch because it already holds its maximum."""


class BadRequestError(BridgeError):
    """A request a host cannot carry out as sent (a missing or malformed option or tensor); code BAD_REQUEST."""
