"""Wire error codes and the one exception family of the protocol core.

Remote misbehaviour raises a :class:`ProtocolError` subclass carrying the wire
:class:`ErrorCode` to close the connection with. Local misuse (an out-of-range field
given to the encoder, an API called in the wrong state) raises ``ValueError`` or
:class:`LocalProtocolError` instead, so the two are never confused.
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "FrameTooLarge",
    "HandshakeFailed",
    "HandshakeRejected",
    "HandshakeTimeout",
    "HeartbeatTimeout",
    "LocalProtocolError",
    "MalformedFrame",
    "PermissionDenied",
    "ProtocolError",
    "ProtocolViolation",
]


class ErrorCode(enum.IntEnum):
    """Error codes of wire spec section 5 (``SessionReject``/``SessionClose`` codes and QUIC
    application error codes)."""

    NO_ERROR = 0
    PROTOCOL_VIOLATION = 1
    VERSION_MISMATCH = 2
    SCHEMA_MISMATCH = 3
    MALFORMED_FRAME = 4
    FRAME_TOO_LARGE = 5
    AUTH_FAILED = 6
    HANDSHAKE_FAILED = 7
    HANDSHAKE_TIMEOUT = 8
    HEARTBEAT_TIMEOUT = 9
    PERMISSION_DENIED = 10
    SERVER_BUSY = 11
    INTERNAL_ERROR = 12
    GOING_AWAY = 13


class ProtocolError(Exception):
    """The peer broke the protocol (or a protocol deadline passed).

    ``code`` is the :class:`ErrorCode` to close the connection with and ``reason`` a short
    human-readable explanation suitable for the QUIC reason phrase.
    """

    default_code: ErrorCode = ErrorCode.PROTOCOL_VIOLATION

    def __init__(self, reason: str, code: ErrorCode | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = ErrorCode(self.default_code if code is None else code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, code={self.code.name})"


class MalformedFrame(ProtocolError):
    """A frame that is not a well-formed ``Frame`` buffer (``MALFORMED_FRAME``)."""

    default_code = ErrorCode.MALFORMED_FRAME


class FrameTooLarge(ProtocolError):
    """A frame (or asset) above the receiver's limit (``FRAME_TOO_LARGE``)."""

    default_code = ErrorCode.FRAME_TOO_LARGE


class ProtocolViolation(ProtocolError):
    """A well-formed message in the wrong place or state (``PROTOCOL_VIOLATION``)."""

    default_code = ErrorCode.PROTOCOL_VIOLATION


class PermissionDenied(ProtocolError):
    """The peer's role does not allow what it sent (``PERMISSION_DENIED``)."""

    default_code = ErrorCode.PERMISSION_DENIED


class HandshakeFailed(ProtocolError):
    """The handshake could not be verified, e.g. a bad signature (``HANDSHAKE_FAILED``)."""

    default_code = ErrorCode.HANDSHAKE_FAILED


class HandshakeTimeout(ProtocolError):
    """The handshake did not complete before its deadline (``HANDSHAKE_TIMEOUT``)."""

    default_code = ErrorCode.HANDSHAKE_TIMEOUT


class HeartbeatTimeout(ProtocolError):
    """No heartbeat arrived within the heartbeat timeout (``HEARTBEAT_TIMEOUT``)."""

    default_code = ErrorCode.HEARTBEAT_TIMEOUT


class HandshakeRejected(ProtocolError):
    """The server refused the session: it answered ``SessionReject``, or closed the
    connection during the handshake with a code (e.g. ``INTERNAL_ERROR`` when its
    authenticator failed).

    ``code`` and ``reason`` are the server's; ``server_protocol_version`` and
    ``server_schema_hash`` say what the server expects (``None`` when no
    ``SessionReject`` arrived).
    """

    def __init__(
        self,
        reason: str,
        code: ErrorCode,
        *,
        server_protocol_version: int | None,
        server_schema_hash: int | None,
    ) -> None:
        super().__init__(reason, code)
        self.server_protocol_version = server_protocol_version
        self.server_schema_hash = server_schema_hash

    def __str__(self) -> str:
        text = f"rejected by server: {self.code.name}: {self.reason}"
        if self.server_protocol_version is not None and self.server_schema_hash is not None:
            text += (
                f" (server protocol version {self.server_protocol_version},"
                f" schema hash {self.server_schema_hash:#018x})"
            )
        return text


class LocalProtocolError(Exception):
    """This side used the protocol core incorrectly (wrong state, invalid argument)."""
