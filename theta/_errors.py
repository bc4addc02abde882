"""Exceptions of the session layer (the core's ProtocolError family is re-exported too)."""

from __future__ import annotations

import trio

from theta.core import ErrorCode, HandshakeTimeout

__all__ = ["ServerUnreachable", "SessionClosed"]


def _describe(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code {code}"


class SessionClosed(trio.BrokenResourceError):
    """The session is over: raised by every operation on it afterwards.

    ``code`` is the wire error code the session ended with (``NO_ERROR`` for a graceful
    close), ``reason`` the peer's or our own explanation, and ``by_peer`` says whether
    the peer ended it (``SessionClose`` or a QUIC close) or this side did (after detecting
    a protocol error, a heartbeat timeout, or ``close()``). A connection that ended below
    the session has no Theta code of its own: QUIC's idle timeout is reported as
    ``HEARTBEAT_TIMEOUT`` (this side's), a QUIC transport error as ``PROTOCOL_VIOLATION``
    (``INTERNAL_ERROR`` for QUIC's INTERNAL_ERROR) with the QUIC code in ``reason``.
    """

    def __init__(self, code: int, reason: str, *, by_peer: bool) -> None:
        super().__init__(code, reason, by_peer)
        self.code = code
        self.reason = reason
        self.by_peer = by_peer

    def __str__(self) -> str:
        who = "peer" if self.by_peer else "this side"
        text = f"session closed by {who}: {_describe(self.code)}"
        return f"{text}: {self.reason}" if self.reason else text


class ServerUnreachable(HandshakeTimeout):
    """No QUIC handshake at all: nothing answered at that address before the handshake
    deadline (or every packet was lost), the host reported that nothing listens there
    (ICMP port unreachable, at every address of the name), or resolving the name took
    the whole handshake timeout. A :class:`~theta.HandshakeTimeout`, so code that handles
    timeouts handles this too; a server that answered but too slowly raises a plain
    :class:`~theta.HandshakeTimeout`."""
