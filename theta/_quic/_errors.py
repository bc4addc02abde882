"""Exceptions of the QUIC driver.

Vocabulary follows trio's: an error caused by the peer or the network is a
``trio.BrokenResourceError`` (so code that handles broken trio streams handles these), a
resource this side closed raises ``trio.ClosedResourceError``.
"""

from __future__ import annotations

import trio

QUIC_INTERNAL_ERROR = 0x1
"""QUIC's INTERNAL_ERROR transport code: a failure that did not come from the wire."""


class QuicConnectionError(trio.BrokenResourceError):
    """The QUIC connection is gone; ``code`` and ``reason`` say why."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{type(self).__name__}(code={self.code:#x}, reason={self.reason!r})"


class ConnectionClosedByPeer(QuicConnectionError):
    """The peer closed the connection with an APPLICATION error ``code`` and ``reason``."""


class TransportError(QuicConnectionError):
    """The connection failed at the QUIC/TLS layer (``code`` is a transport error code,
    ``frame_type`` the offending frame type if any); ``by_peer`` says whether the peer's
    QUIC stack detected it and sent the close, rather than this side's."""

    def __init__(
        self, code: int, reason: str, frame_type: int | None = None, *, by_peer: bool = False
    ) -> None:
        super().__init__(code, reason)
        self.frame_type = frame_type
        self.by_peer = by_peer


class ConnectionRefused(TransportError):
    """Nothing listens at the server's address (ICMP port unreachable during the handshake)."""


class IdleTimeout(TransportError):
    """Nothing was received from the peer for the negotiated idle timeout."""


class HandshakeTimeout(TransportError):
    """The handshake did not complete within ``QuicConfig.handshake_timeout``;
    ``peer_answered`` says whether any datagram came from the peer meanwhile."""

    def __init__(self, code: int, reason: str, *, peer_answered: bool = False) -> None:
        super().__init__(code, reason)
        self.peer_answered = peer_answered


class NameResolutionTimeout(HandshakeTimeout):
    """Resolving the server's name took the whole handshake timeout."""


class StreamResetError(trio.BrokenResourceError):
    """The peer reset the stream (RESET_STREAM) with application error ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class StreamStoppedError(trio.BrokenResourceError):
    """The peer asked us to stop sending (STOP_SENDING) with application error ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code
