"""Protocol constants and one frozen dataclass per wire table (spec sections 2, 4 and 6).

Field names and order are the spec's. Byte vectors are ``bytes``, vectors of integers are
tuples and strings are ``str``. The dataclasses do not validate on construction (decoding is
on the hot path and only ever produces in-range values); :func:`~theta.core.encode_frame`
checks every field before writing it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "CAP_ZSTD",
    "PROTOCOL_VERSION",
    "AssetChunk",
    "Channel",
    "ChannelOpen",
    "Heartbeat",
    "Message",
    "ReplicationMessage",
    "Role",
    "SessionAcknowledge",
    "SessionClose",
    "SessionConfirm",
    "SessionHello",
    "SessionReject",
]

PROTOCOL_VERSION = 1
"""The wire protocol version this package speaks."""

CAP_ZSTD = 0x80000001
"""Capability: zstd-compressed replication payloads (spec section 4.2)."""


class Channel(enum.IntEnum):
    """The three channels of a session (spec section 2)."""

    CONTROL = 0
    REPLICATION = 1
    ASSETS = 2


class Role(enum.IntFlag):
    """Permission bits of a session's role (spec section 6). Bits 16..31 are the
    application's and may be combined freely with these."""

    NONE = 0
    REPLICATE = 1 << 0
    UPLOAD_ASSETS = 1 << 1
    ADMIN = 1 << 2


@dataclass(frozen=True, slots=True)
class SessionHello:
    """Client → server, first frame of the control stream."""

    protocol_version: int
    schema_hash: int
    nonce: bytes
    capabilities: tuple[int, ...]
    auth_token: bytes
    public_key: bytes


@dataclass(frozen=True, slots=True)
class SessionAcknowledge:
    """Server → client: the server accepts and signs the handshake transcript."""

    protocol_version: int
    schema_hash: int
    nonce: bytes
    session_id: int
    role: int
    capabilities: tuple[int, ...]
    public_key: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class SessionConfirm:
    """Client → server: the client's signature over the handshake transcript."""

    signature: bytes


@dataclass(frozen=True, slots=True)
class SessionReject:
    """Server → client instead of ``SessionAcknowledge``; carries the server's own version
    and schema hash."""

    code: int
    reason: str
    protocol_version: int
    schema_hash: int


@dataclass(frozen=True, slots=True)
class ChannelOpen:
    """First frame of the replication (1) and assets (2) streams."""

    channel: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Control channel, both ways, after the handshake (spec section 4.4)."""

    sequence: int
    sent_at_us: int
    echo_sequence: int = 0
    echo_sent_at_us: int = 0
    echo_delay_us: int = 0
    rtt_us: int = 0
    jitter_us: int = 0


@dataclass(frozen=True, slots=True)
class SessionClose:
    """Control channel, both ways: the sender ends the session."""

    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ReplicationMessage:
    """Replication channel: one application state delta for ``tick``."""

    tick: int
    flags: int = 0
    payload: bytes = b""
    uncompressed_size: int = 0


@dataclass(frozen=True, slots=True)
class AssetChunk:
    """Assets channel: ``data`` at ``offset`` of asset ``asset_id`` (spec section 4.5)."""

    asset_id: int
    offset: int
    total_size: int
    name: str
    data: bytes


Message = (
    SessionHello
    | SessionAcknowledge
    | SessionConfirm
    | SessionReject
    | ChannelOpen
    | Heartbeat
    | SessionClose
    | ReplicationMessage
    | AssetChunk
)
"""Any message that can be the body of a frame."""
