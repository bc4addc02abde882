"""theta.core — the sans-IO Theta protocol: framing, messages, handshake, heartbeats.

Bytes and messages in, messages and bytes out. This package imports no trio and no
sockets, and never reads a clock: every method that needs the time takes ``now``.
"""

from ._decode import FrameDecoder, FrameLimits, decode_payload_untrusted
from ._encode import encode_frame
from ._errors import (
    ErrorCode,
    FrameTooLarge,
    HandshakeFailed,
    HandshakeRejected,
    HandshakeTimeout,
    HeartbeatTimeout,
    LocalProtocolError,
    MalformedFrame,
    PermissionDenied,
    ProtocolError,
    ProtocolViolation,
)
from ._handshake import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    Authenticator,
    ClientHandshake,
    ClientState,
    ServerHandshake,
    ServerState,
)
from ._heartbeat import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_RTT_WINDOW,
    HeartbeatMetrics,
    HeartbeatTracker,
)
from ._messages import (
    CAP_ZSTD,
    PROTOCOL_VERSION,
    AssetChunk,
    Channel,
    ChannelOpen,
    Heartbeat,
    Message,
    ReplicationMessage,
    Role,
    SessionAcknowledge,
    SessionClose,
    SessionConfirm,
    SessionHello,
    SessionReject,
)
from ._schema import canonical_manifest, schema_hash
from ._transcript import (
    client_signature_message,
    handshake_transcript,
    is_valid_ed25519_public_key,
    negotiate_capabilities,
    server_signature_message,
)

__all__ = [
    "CAP_ZSTD",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_RTT_WINDOW",
    "PROTOCOL_VERSION",
    "AssetChunk",
    "Authenticator",
    "Channel",
    "ChannelOpen",
    "ClientHandshake",
    "ClientState",
    "ErrorCode",
    "FrameDecoder",
    "FrameLimits",
    "FrameTooLarge",
    "HandshakeFailed",
    "HandshakeRejected",
    "HandshakeTimeout",
    "Heartbeat",
    "HeartbeatMetrics",
    "HeartbeatTimeout",
    "HeartbeatTracker",
    "LocalProtocolError",
    "MalformedFrame",
    "Message",
    "PermissionDenied",
    "ProtocolError",
    "ProtocolViolation",
    "ReplicationMessage",
    "Role",
    "ServerHandshake",
    "ServerState",
    "SessionAcknowledge",
    "SessionClose",
    "SessionConfirm",
    "SessionHello",
    "SessionReject",
    "canonical_manifest",
    "client_signature_message",
    "decode_payload_untrusted",
    "encode_frame",
    "handshake_transcript",
    "is_valid_ed25519_public_key",
    "negotiate_capabilities",
    "schema_hash",
    "server_signature_message",
]
