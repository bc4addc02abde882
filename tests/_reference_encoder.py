"""A reference encoder built on flatc's generated builder functions.

theta's own encoder writes precomputed layouts for speed; the tests check that the
validating decoder reads what the generated builders write (field order, vtable layout and
padding chosen by the FlatBuffers runtime), and that both encoders mean the same messages.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import flatbuffers

from theta._generated import wire as _wire
from theta.core import (
    AssetChunk,
    ChannelOpen,
    Heartbeat,
    Message,
    ReplicationMessage,
    SessionAcknowledge,
    SessionClose,
    SessionConfirm,
    SessionHello,
    SessionReject,
)
from theta.core._layout import BODY_TYPES, FILE_IDENTIFIER

__all__ = ["encode_frame_with_builders"]

_MAX_UINT = {8: 0xFF, 16: 0xFFFF, 32: 0xFFFF_FFFF, 64: 0xFFFF_FFFF_FFFF_FFFF}
_MAX_PAYLOAD = 0xFFFF_FFFF
_PREFIX = struct.Struct(">I")

# flatbuffers ships no type information: keep the untyped surface in these aliases.
_Builder = Any
_BodyWriter = Callable[[_Builder, Any], int]


def _check_uint(message: Message, field: str, bits: int) -> None:
    value = getattr(message, field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{type(message).__name__}.{field} must be an int, not {value!r}")
    if not 0 <= value <= _MAX_UINT[bits]:
        raise ValueError(
            f"{type(message).__name__}.{field} = {value} does not fit an unsigned {bits}-bit field"
        )


def _bytes(message: Message, field: str) -> bytes | bytearray:
    value = getattr(message, field)
    if isinstance(value, bytes | bytearray):
        return value
    if isinstance(value, memoryview):
        return value.tobytes()
    raise TypeError(f"{type(message).__name__}.{field} must be bytes, not {type(value).__name__}")


def _string(message: Message, field: str) -> bytes:
    value = getattr(message, field)
    if not isinstance(value, str):
        raise TypeError(f"{type(message).__name__}.{field} must be str, not {type(value).__name__}")
    return value.encode("utf-8")


def _uint32_vector(builder: _Builder, message: Message, field: str) -> int:
    values: Sequence[int] = getattr(message, field)
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF_FFFF:
            raise ValueError(
                f"{type(message).__name__}.{field} holds {value!r}, not an unsigned 32-bit int"
            )
    builder.StartVector(4, len(values), 4)
    for value in reversed(values):
        builder.PrependUint32(value)
    return int(builder.EndVector())


def _write_hello(b: _Builder, m: SessionHello) -> int:
    for field, bits in (("protocol_version", 16), ("schema_hash", 64)):
        _check_uint(m, field, bits)
    nonce = b.CreateByteVector(_bytes(m, "nonce"))
    capabilities = _uint32_vector(b, m, "capabilities")
    token = b.CreateByteVector(_bytes(m, "auth_token"))
    key = b.CreateByteVector(_bytes(m, "public_key"))
    _wire.SessionHelloStart(b)
    _wire.SessionHelloAddSchemaHash(b, m.schema_hash)
    _wire.SessionHelloAddNonce(b, nonce)
    _wire.SessionHelloAddCapabilities(b, capabilities)
    _wire.SessionHelloAddAuthToken(b, token)
    _wire.SessionHelloAddPublicKey(b, key)
    _wire.SessionHelloAddProtocolVersion(b, m.protocol_version)
    return int(_wire.SessionHelloEnd(b))


def _write_acknowledge(b: _Builder, m: SessionAcknowledge) -> int:
    for field, bits in (("protocol_version", 16), ("schema_hash", 64), ("session_id", 64)):
        _check_uint(m, field, bits)
    _check_uint(m, "role", 32)
    nonce = b.CreateByteVector(_bytes(m, "nonce"))
    capabilities = _uint32_vector(b, m, "capabilities")
    key = b.CreateByteVector(_bytes(m, "public_key"))
    signature = b.CreateByteVector(_bytes(m, "signature"))
    _wire.SessionAcknowledgeStart(b)
    _wire.SessionAcknowledgeAddSchemaHash(b, m.schema_hash)
    _wire.SessionAcknowledgeAddSessionId(b, m.session_id)
    _wire.SessionAcknowledgeAddNonce(b, nonce)
    _wire.SessionAcknowledgeAddRole(b, m.role)
    _wire.SessionAcknowledgeAddCapabilities(b, capabilities)
    _wire.SessionAcknowledgeAddPublicKey(b, key)
    _wire.SessionAcknowledgeAddSignature(b, signature)
    _wire.SessionAcknowledgeAddProtocolVersion(b, m.protocol_version)
    return int(_wire.SessionAcknowledgeEnd(b))


def _write_confirm(b: _Builder, m: SessionConfirm) -> int:
    signature = b.CreateByteVector(_bytes(m, "signature"))
    _wire.SessionConfirmStart(b)
    _wire.SessionConfirmAddSignature(b, signature)
    return int(_wire.SessionConfirmEnd(b))


def _write_reject(b: _Builder, m: SessionReject) -> int:
    for field, bits in (("code", 16), ("protocol_version", 16), ("schema_hash", 64)):
        _check_uint(m, field, bits)
    reason = b.CreateString(_string(m, "reason"))
    _wire.SessionRejectStart(b)
    _wire.SessionRejectAddSchemaHash(b, m.schema_hash)
    _wire.SessionRejectAddReason(b, reason)
    _wire.SessionRejectAddCode(b, m.code)
    _wire.SessionRejectAddProtocolVersion(b, m.protocol_version)
    return int(_wire.SessionRejectEnd(b))


def _write_channel_open(b: _Builder, m: ChannelOpen) -> int:
    _check_uint(m, "channel", 8)
    _wire.ChannelOpenStart(b)
    _wire.ChannelOpenAddChannel(b, m.channel)
    return int(_wire.ChannelOpenEnd(b))


_HEARTBEAT_FIELDS = (
    ("sequence", 64),
    ("sent_at_us", 64),
    ("echo_sequence", 64),
    ("echo_sent_at_us", 64),
    ("echo_delay_us", 64),
    ("rtt_us", 32),
    ("jitter_us", 32),
)


def _write_heartbeat(b: _Builder, m: Heartbeat) -> int:
    for field, bits in _HEARTBEAT_FIELDS:
        _check_uint(m, field, bits)
    _wire.HeartbeatStart(b)
    _wire.HeartbeatAddSequence(b, m.sequence)
    _wire.HeartbeatAddSentAtUs(b, m.sent_at_us)
    _wire.HeartbeatAddEchoSequence(b, m.echo_sequence)
    _wire.HeartbeatAddEchoSentAtUs(b, m.echo_sent_at_us)
    _wire.HeartbeatAddEchoDelayUs(b, m.echo_delay_us)
    _wire.HeartbeatAddRttUs(b, m.rtt_us)
    _wire.HeartbeatAddJitterUs(b, m.jitter_us)
    return int(_wire.HeartbeatEnd(b))


def _write_close(b: _Builder, m: SessionClose) -> int:
    _check_uint(m, "code", 16)
    reason = b.CreateString(_string(m, "reason"))
    _wire.SessionCloseStart(b)
    _wire.SessionCloseAddReason(b, reason)
    _wire.SessionCloseAddCode(b, m.code)
    return int(_wire.SessionCloseEnd(b))


def _write_replication(b: _Builder, m: ReplicationMessage) -> int:
    for field, bits in (("tick", 64), ("flags", 32), ("uncompressed_size", 32)):
        _check_uint(m, field, bits)
    payload = b.CreateByteVector(_bytes(m, "payload"))
    _wire.ReplicationMessageStart(b)
    _wire.ReplicationMessageAddTick(b, m.tick)
    _wire.ReplicationMessageAddFlags(b, m.flags)
    _wire.ReplicationMessageAddPayload(b, payload)
    _wire.ReplicationMessageAddUncompressedSize(b, m.uncompressed_size)
    return int(_wire.ReplicationMessageEnd(b))


def _write_asset_chunk(b: _Builder, m: AssetChunk) -> int:
    for field in ("asset_id", "offset", "total_size"):
        _check_uint(m, field, 64)
    name = b.CreateString(_string(m, "name"))
    data = b.CreateByteVector(_bytes(m, "data"))
    _wire.AssetChunkStart(b)
    _wire.AssetChunkAddAssetId(b, m.asset_id)
    _wire.AssetChunkAddOffset(b, m.offset)
    _wire.AssetChunkAddTotalSize(b, m.total_size)
    _wire.AssetChunkAddName(b, name)
    _wire.AssetChunkAddData(b, data)
    return int(_wire.AssetChunkEnd(b))


_WRITERS: dict[type[Message], _BodyWriter] = {
    SessionHello: _write_hello,
    SessionAcknowledge: _write_acknowledge,
    SessionConfirm: _write_confirm,
    SessionReject: _write_reject,
    ChannelOpen: _write_channel_open,
    Heartbeat: _write_heartbeat,
    SessionClose: _write_close,
    ReplicationMessage: _write_replication,
    AssetChunk: _write_asset_chunk,
}


def _size_hint(message: Message) -> int:
    if isinstance(message, AssetChunk):
        return len(message.data) + 4 * len(message.name) + 128
    if isinstance(message, ReplicationMessage):
        return len(message.payload) + 128
    return 256


def encode_frame_with_builders(message: Message) -> bytes:
    """``message`` as a frame written by the generated builders (4-byte prefix included)."""
    try:
        writer = _WRITERS[type(message)]
    except KeyError:
        raise TypeError(f"not a theta message: {message!r}") from None
    builder = flatbuffers.Builder(_size_hint(message))
    body = writer(builder, message)
    _wire.FrameStart(builder)
    _wire.FrameAddBodyType(builder, BODY_TYPES[type(message)])
    _wire.FrameAddBody(builder, body)
    builder.Finish(_wire.FrameEnd(builder), file_identifier=FILE_IDENTIFIER)
    head = builder.Head()
    size = len(builder.Bytes) - head
    if size > _MAX_PAYLOAD:
        raise ValueError(f"{type(message).__name__} of {size} bytes does not fit one frame")
    return _PREFIX.pack(size) + memoryview(builder.Bytes)[head:]
