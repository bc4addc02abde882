"""An independent Theta wire-v1 client, written from ``wire-v1.md`` alone.

Nothing here imports ``theta``: the framing, the FlatBuffers tables (built with the
``flatbuffers`` runtime's ``Builder`` and read back by a hand-written, bounds-checked reader),
the schema hash (a pure-Python SipHash-2-4), the handshake transcript and its Ed25519
signatures all follow the spec text.  The peer runs on the stdlib ``asyncio`` loop with
aioquic's asyncio API, and raises :class:`SpecDeviation` -- naming the spec section -- for
anything it receives that the spec does not allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NoReturn

import flatbuffers
import zstandard
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# --------------------------------------------------------------------------------------------
# Constants (spec sections 1, 2, 3, 4.2, 5)
# --------------------------------------------------------------------------------------------

ALPN = "theta/1"
PROTOCOL_VERSION = 1
FILE_IDENTIFIER = b"THTA"
CAP_ZSTD = 0x80000001
NONCE_SIZE = 24
KEY_SIZE = 32
SIGNATURE_SIZE = 64
MAX_CAPABILITIES = 64
MAX_AUTH_TOKEN = 4096
MAX_ASSET_SIZE = 64 * 1024 * 1024

CONTROL_LIMIT = 16 * 1024
REPLICATION_LIMIT = 1024 * 1024
ASSETS_LIMIT = 1024 * 1024 + 4 * 1024

HANDSHAKE_CONTEXT = b"theta/1 handshake\x00"
SERVER_SIGNATURE_CONTEXT = b"theta/1 server\x00"
CLIENT_SIGNATURE_CONTEXT = b"theta/1 client\x00"
SCHEMA_KEY = b"theta-schema-v1!"

FLAG_COMPRESSED = 0x1


class ErrorCode(IntEnum):
    """Section 5."""

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


class BodyType(IntEnum):
    """Section 4: union member values, in declaration order from 1."""

    SESSION_HELLO = 1
    SESSION_ACKNOWLEDGE = 2
    SESSION_CONFIRM = 3
    SESSION_REJECT = 4
    CHANNEL_OPEN = 5
    HEARTBEAT = 6
    SESSION_CLOSE = 7
    REPLICATION_MESSAGE = 8
    ASSET_CHUNK = 9


class ChannelIndex(IntEnum):
    """Section 2."""

    CONTROL = 0
    REPLICATION = 1
    ASSETS = 2


CHANNEL_LIMITS = {
    ChannelIndex.CONTROL: CONTROL_LIMIT,
    ChannelIndex.REPLICATION: REPLICATION_LIMIT,
    ChannelIndex.ASSETS: ASSETS_LIMIT,
}


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class SpecDeviation(Exception):
    """The server sent something wire-v1.md does not allow."""

    def __init__(self, section: str, code: ErrorCode, message: str) -> None:
        super().__init__(f"wire-v1.md section {section} ({code.name}): {message}")
        self.section = section
        self.code = code
        self.message = message


class ConnectionClosedByServer(Exception):
    """The server closed the QUIC connection before the peer was done."""

    def __init__(self, error_code: int, frame_type: int | None, reason: str) -> None:
        kind = "transport" if frame_type is not None else "application"
        super().__init__(f"server closed the connection ({kind} code {error_code}): {reason!r}")
        self.error_code = error_code
        self.frame_type = frame_type
        self.reason = reason

    @property
    def is_application_close(self) -> bool:
        return self.frame_type is None


class SessionRejectedError(Exception):
    """The server answered the hello with SessionReject (section 4.1)."""

    def __init__(self, reject: SessionReject, close: ConnectionClosedByServer | None) -> None:
        super().__init__(
            f"SessionReject code={reject.code} reason={reject.reason!r} "
            f"server version={reject.protocol_version} schema_hash={reject.schema_hash:#x}"
        )
        self.reject = reject
        self.close = close


# --------------------------------------------------------------------------------------------
# Messages (section 4)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionHello:
    protocol_version: int
    schema_hash: int
    nonce: bytes
    capabilities: tuple[int, ...]
    auth_token: bytes
    public_key: bytes


@dataclass(frozen=True)
class SessionAcknowledge:
    protocol_version: int
    schema_hash: int
    nonce: bytes
    session_id: int
    role: int
    capabilities: tuple[int, ...]
    public_key: bytes
    signature: bytes


@dataclass(frozen=True)
class SessionConfirm:
    signature: bytes


@dataclass(frozen=True)
class SessionReject:
    code: int
    reason: str
    protocol_version: int
    schema_hash: int


@dataclass(frozen=True)
class ChannelOpen:
    channel: int


@dataclass(frozen=True)
class Heartbeat:
    sequence: int
    sent_at_us: int
    echo_sequence: int = 0
    echo_sent_at_us: int = 0
    echo_delay_us: int = 0
    rtt_us: int = 0
    jitter_us: int = 0


@dataclass(frozen=True)
class SessionClose:
    code: int
    reason: str


@dataclass(frozen=True)
class ReplicationMessage:
    tick: int
    flags: int
    payload: bytes
    uncompressed_size: int


@dataclass(frozen=True)
class AssetChunk:
    asset_id: int
    offset: int
    total_size: int
    name: str | None
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

# which body types may arrive from the server on which channel (section 4 "allowed on")
SERVER_ALLOWED = {
    ChannelIndex.CONTROL: {
        BodyType.SESSION_ACKNOWLEDGE,
        BodyType.SESSION_REJECT,
        BodyType.HEARTBEAT,
        BodyType.SESSION_CLOSE,
    },
    ChannelIndex.REPLICATION: {BodyType.REPLICATION_MESSAGE},
    ChannelIndex.ASSETS: {BodyType.ASSET_CHUNK},
}


# --------------------------------------------------------------------------------------------
# SipHash-2-4 and the schema hash (section 4.3)
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK64


def siphash24(key: bytes, message: bytes) -> int:
    """SipHash-2-4 with a 16-byte key, as the standard little-endian 64-bit output."""
    if len(key) != 16:
        raise ValueError("SipHash key must be 16 bytes")
    k0, k1 = struct.unpack("<QQ", key)
    v = [
        k0 ^ 0x736F6D6570736575,
        k1 ^ 0x646F72616E646F6D,
        k0 ^ 0x6C7967656E657261,
        k1 ^ 0x7465646279746573,
    ]

    def rounds(n: int) -> None:
        for _ in range(n):
            v[0] = (v[0] + v[1]) & _MASK64
            v[1] = _rotl(v[1], 13) ^ v[0]
            v[0] = _rotl(v[0], 32)
            v[2] = (v[2] + v[3]) & _MASK64
            v[3] = _rotl(v[3], 16) ^ v[2]
            v[0] = (v[0] + v[3]) & _MASK64
            v[3] = _rotl(v[3], 21) ^ v[0]
            v[2] = (v[2] + v[1]) & _MASK64
            v[1] = _rotl(v[1], 17) ^ v[2]
            v[2] = _rotl(v[2], 32)

    full = len(message) - len(message) % 8
    for i in range(0, full, 8):
        (m,) = struct.unpack_from("<Q", message, i)
        v[3] ^= m
        rounds(2)
        v[0] ^= m
    tail = message[full:] + bytes(7 - len(message) % 8)
    (last,) = struct.unpack("<Q", tail + bytes([len(message) & 0xFF]))
    v[3] ^= last
    rounds(2)
    v[0] ^= last
    v[2] ^= 0xFF
    rounds(4)
    return int(v[0] ^ v[1] ^ v[2] ^ v[3])


def canonical_manifest(manifest: Mapping[str, str]) -> bytes:
    """Section 4.3: entries sorted by the UTF-8 bytes of the name."""
    out = bytearray()
    for name_bytes, descriptor in sorted((k.encode(), v) for k, v in manifest.items()):
        descriptor_bytes = descriptor.encode()
        out += struct.pack(">H", len(name_bytes)) + name_bytes
        out += struct.pack(">I", len(descriptor_bytes)) + descriptor_bytes
    return bytes(out)


def schema_hash(manifest: Mapping[str, str]) -> int:
    return siphash24(SCHEMA_KEY, canonical_manifest(manifest))


# --------------------------------------------------------------------------------------------
# Handshake transcript (section 4.1)
# --------------------------------------------------------------------------------------------


def handshake_transcript(
    *,
    protocol_version: int,
    schema_hash: int,
    client_nonce: bytes,
    client_public_key: bytes,
    client_capabilities: Sequence[int],
    auth_token: bytes,
    server_nonce: bytes,
    server_public_key: bytes,
    session_id: int,
    role: int,
    negotiated_capabilities: Sequence[int],
) -> bytes:
    out = bytearray(HANDSHAKE_CONTEXT)
    out += struct.pack(">HQ", protocol_version, schema_hash)
    out += client_nonce + client_public_key
    out += struct.pack(
        f">I{len(client_capabilities)}I", len(client_capabilities), *client_capabilities
    )
    out += struct.pack(">I", len(auth_token)) + auth_token
    out += server_nonce + server_public_key
    out += struct.pack(">QI", session_id, role)
    out += struct.pack(
        f">I{len(negotiated_capabilities)}I",
        len(negotiated_capabilities),
        *negotiated_capabilities,
    )
    return bytes(out)


def server_signed_bytes(transcript: bytes) -> bytes:
    return SERVER_SIGNATURE_CONTEXT + hashlib.sha256(transcript).digest()


def client_signed_bytes(transcript: bytes) -> bytes:
    return CLIENT_SIGNATURE_CONTEXT + hashlib.sha256(transcript).digest()


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# RFC 8032 section 5.1.3 point decoding, to check that a public key is a curve point.
_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def is_ed25519_point(encoded: bytes) -> bool:
    if len(encoded) != KEY_SIZE:
        return False
    y = int.from_bytes(encoded, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= _P:
        return False
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    vxx = (v * x * x) % _P
    if vxx == u:
        pass
    elif vxx == (-u) % _P:
        x = (x * _SQRT_M1) % _P
    else:
        return False
    return not (x == 0 and sign == 1)


def first_non_point() -> bytes:
    """The smallest canonical y encoding that is not an Ed25519 point (section 4.1 test)."""
    y = 2
    while is_ed25519_point(y.to_bytes(KEY_SIZE, "little")):
        y += 1
    return y.to_bytes(KEY_SIZE, "little")


# --------------------------------------------------------------------------------------------
# Encoding: hand-built FlatBuffers tables (section 4) and the u32 length prefix (section 3)
# --------------------------------------------------------------------------------------------


def _u32_vector(builder: flatbuffers.Builder, values: Sequence[int]) -> int:
    builder.StartVector(4, len(values), 4)
    for value in reversed(values):
        builder.PrependUint32(value)
    return int(builder.EndVector())


def _bytes_or_zero(builder: flatbuffers.Builder, data: bytes | None) -> int:
    if data is None:
        return 0
    return int(builder.CreateByteVector(data))


def encode_payload(
    message: Message, *, omit_empty: bool = True, body_type_override: int | None = None
) -> bytes:
    """One FlatBuffers buffer whose root is ``Frame`` with file identifier ``THTA``.

    With ``omit_empty`` an empty vector/string field is left absent (FlatBuffers' default),
    otherwise it is written as an empty vector.
    """

    def vec(data: bytes) -> bytes | None:
        return None if (omit_empty and not data) else data

    b = flatbuffers.Builder(256 + _approx_size(message))
    body_type: BodyType
    if isinstance(message, SessionHello):
        body_type = BodyType.SESSION_HELLO
        nonce = _bytes_or_zero(b, vec(message.nonce))
        caps = (
            0 if (omit_empty and not message.capabilities) else _u32_vector(b, message.capabilities)
        )
        token = _bytes_or_zero(b, vec(message.auth_token))
        key = _bytes_or_zero(b, vec(message.public_key))
        b.StartObject(6)
        b.PrependUint16Slot(0, message.protocol_version, 0)
        b.PrependUint64Slot(1, message.schema_hash, 0)
        b.PrependUOffsetTRelativeSlot(2, nonce, 0)
        b.PrependUOffsetTRelativeSlot(3, caps, 0)
        b.PrependUOffsetTRelativeSlot(4, token, 0)
        b.PrependUOffsetTRelativeSlot(5, key, 0)
        body = b.EndObject()
    elif isinstance(message, SessionConfirm):
        body_type = BodyType.SESSION_CONFIRM
        sig = _bytes_or_zero(b, vec(message.signature))
        b.StartObject(1)
        b.PrependUOffsetTRelativeSlot(0, sig, 0)
        body = b.EndObject()
    elif isinstance(message, ChannelOpen):
        body_type = BodyType.CHANNEL_OPEN
        b.StartObject(1)
        b.PrependUint8Slot(0, message.channel, 0)
        body = b.EndObject()
    elif isinstance(message, Heartbeat):
        body_type = BodyType.HEARTBEAT
        b.StartObject(7)
        b.PrependUint64Slot(0, message.sequence, 0)
        b.PrependUint64Slot(1, message.sent_at_us, 0)
        b.PrependUint64Slot(2, message.echo_sequence, 0)
        b.PrependUint64Slot(3, message.echo_sent_at_us, 0)
        b.PrependUint64Slot(4, message.echo_delay_us, 0)
        b.PrependUint32Slot(5, message.rtt_us, 0)
        b.PrependUint32Slot(6, message.jitter_us, 0)
        body = b.EndObject()
    elif isinstance(message, SessionClose):
        body_type = BodyType.SESSION_CLOSE
        reason = b.CreateString(message.reason) if (message.reason or not omit_empty) else 0
        b.StartObject(2)
        b.PrependUint16Slot(0, message.code, 0)
        b.PrependUOffsetTRelativeSlot(1, reason, 0)
        body = b.EndObject()
    elif isinstance(message, ReplicationMessage):
        body_type = BodyType.REPLICATION_MESSAGE
        payload = _bytes_or_zero(b, vec(message.payload))
        b.StartObject(4)
        b.PrependUint64Slot(0, message.tick, 0)
        b.PrependUint32Slot(1, message.flags, 0)
        b.PrependUOffsetTRelativeSlot(2, payload, 0)
        b.PrependUint32Slot(3, message.uncompressed_size, 0)
        body = b.EndObject()
    elif isinstance(message, AssetChunk):
        body_type = BodyType.ASSET_CHUNK
        name = b.CreateString(message.name) if message.name is not None else 0
        data = _bytes_or_zero(b, vec(message.data))
        b.StartObject(5)
        b.PrependUint64Slot(0, message.asset_id, 0)
        b.PrependUint64Slot(1, message.offset, 0)
        b.PrependUint64Slot(2, message.total_size, 0)
        b.PrependUOffsetTRelativeSlot(3, name, 0)
        b.PrependUOffsetTRelativeSlot(4, data, 0)
        body = b.EndObject()
    else:  # the server-only tables are never sent by this client
        raise TypeError(f"the spec peer does not send {type(message).__name__}")
    b.StartObject(2)
    b.PrependUint8Slot(0, int(body_type if body_type_override is None else body_type_override), 0)
    b.PrependUOffsetTRelativeSlot(1, body, 0)
    frame = b.EndObject()
    b.Finish(frame, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def _approx_size(message: Message) -> int:
    if isinstance(message, ReplicationMessage):
        return len(message.payload)
    if isinstance(message, AssetChunk):
        return len(message.data)
    return 0


def encode_frame(message: Message, *, omit_empty: bool = True) -> bytes:
    payload = encode_payload(message, omit_empty=omit_empty)
    return struct.pack(">I", len(payload)) + payload


# --------------------------------------------------------------------------------------------
# Decoding: a bounds-checked FlatBuffers reader (section 3: "MUST check every offset ...")
# --------------------------------------------------------------------------------------------


def _malformed(message: str) -> SpecDeviation:
    return SpecDeviation("3", ErrorCode.MALFORMED_FRAME, message)


class _Table:
    """A verified view of one FlatBuffers table inside ``buf``."""

    def __init__(self, buf: bytes, pos: int, what: str) -> None:
        self.buf = buf
        self.what = what
        if pos % 4 or pos < 0 or pos + 4 > len(buf):
            raise _malformed(f"{what}: table offset {pos} out of bounds or misaligned")
        (soffset,) = struct.unpack_from("<i", buf, pos)
        vtable = pos - soffset
        if vtable < 0 or vtable % 2 or vtable + 4 > len(buf):
            raise _malformed(f"{what}: vtable offset {vtable} out of bounds or misaligned")
        vt_size, obj_size = struct.unpack_from("<HH", buf, vtable)
        if vt_size < 4 or vt_size % 2 or vtable + vt_size > len(buf):
            raise _malformed(f"{what}: vtable size {vt_size} invalid")
        if obj_size < 4 or pos + obj_size > len(buf):
            raise _malformed(f"{what}: table size {obj_size} runs past the buffer")
        self.pos = pos
        self.vtable = vtable
        self.vt_size = vt_size
        self.obj_size = obj_size

    def _field(self, index: int, size: int) -> int | None:
        slot = 4 + 2 * index
        if slot + 2 > self.vt_size:
            return None
        (offset,) = struct.unpack_from("<H", self.buf, self.vtable + slot)
        if offset == 0:
            return None
        if offset < 4 or offset + size > self.obj_size:
            raise _malformed(f"{self.what}: field {index} lies outside its table")
        where = self.pos + offset
        if where % size:
            raise _malformed(f"{self.what}: field {index} misaligned")
        return int(where)

    def scalar(self, index: int, fmt: str) -> int:
        size = struct.calcsize("<" + fmt)
        where = self._field(index, size)
        if where is None:
            return 0
        (value,) = struct.unpack_from("<" + fmt, self.buf, where)
        return int(value)

    def _indirect(self, index: int) -> int | None:
        where = self._field(index, 4)
        if where is None:
            return None
        (rel,) = struct.unpack_from("<I", self.buf, where)
        target = where + rel
        if rel == 0 or target >= len(self.buf):
            raise _malformed(f"{self.what}: field {index} offset {rel} out of bounds")
        return int(target)

    def _vector(self, index: int, elem_size: int) -> tuple[int, int] | None:
        target = self._indirect(index)
        if target is None:
            return None
        if target % 4 or target + 4 > len(self.buf):
            raise _malformed(f"{self.what}: vector {index} header out of bounds or misaligned")
        (count,) = struct.unpack_from("<I", self.buf, target)
        start = target + 4
        if start + count * elem_size > len(self.buf):
            raise _malformed(f"{self.what}: vector {index} of {count} elements runs past buffer")
        return start, count

    def bytes_vector(self, index: int) -> bytes | None:
        found = self._vector(index, 1)
        if found is None:
            return None
        start, count = found
        return self.buf[start : start + count]

    def u32_vector(self, index: int) -> tuple[int, ...] | None:
        found = self._vector(index, 4)
        if found is None:
            return None
        start, count = found
        return struct.unpack_from(f"<{count}I", self.buf, start)

    def string(self, index: int) -> str | None:
        found = self._vector(index, 1)
        if found is None:
            return None
        start, count = found
        if start + count >= len(self.buf) or self.buf[start + count] != 0:
            raise _malformed(f"{self.what}: string {index} lacks its NUL terminator")
        try:
            return self.buf[start : start + count].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _malformed(f"{self.what}: string {index} is not UTF-8") from exc

    def table(self, index: int, what: str) -> _Table | None:
        target = self._indirect(index)
        if target is None:
            return None
        return _Table(self.buf, target, what)


def decode_payload(payload: bytes) -> tuple[BodyType, Message]:
    """Decode one frame payload, turning every structural failure into MALFORMED_FRAME."""
    if len(payload) < 8:
        raise _malformed(f"payload of {len(payload)} bytes is too short for a FlatBuffer")
    if payload[4:8] != FILE_IDENTIFIER:
        raise _malformed(f"file identifier {payload[4:8]!r} is not b'THTA'")
    (root,) = struct.unpack_from("<I", payload, 0)
    frame = _Table(payload, root, "Frame")
    body_type = frame.scalar(0, "B")
    body = frame.table(1, "Frame.body")
    if body_type == 0 or body is None:
        raise _malformed(f"Frame.body absent (body_type={body_type})")
    try:
        kind = BodyType(body_type)
    except ValueError:
        raise _malformed(f"unknown Frame.body union type {body_type}") from None
    message: Message
    if kind is BodyType.SESSION_HELLO:
        message = SessionHello(
            body.scalar(0, "H"),
            body.scalar(1, "Q"),
            body.bytes_vector(2) or b"",
            body.u32_vector(3) or (),
            body.bytes_vector(4) or b"",
            body.bytes_vector(5) or b"",
        )
    elif kind is BodyType.SESSION_ACKNOWLEDGE:
        message = SessionAcknowledge(
            body.scalar(0, "H"),
            body.scalar(1, "Q"),
            body.bytes_vector(2) or b"",
            body.scalar(3, "Q"),
            body.scalar(4, "I"),
            body.u32_vector(5) or (),
            body.bytes_vector(6) or b"",
            body.bytes_vector(7) or b"",
        )
    elif kind is BodyType.SESSION_CONFIRM:
        message = SessionConfirm(body.bytes_vector(0) or b"")
    elif kind is BodyType.SESSION_REJECT:
        message = SessionReject(
            body.scalar(0, "H"), body.string(1) or "", body.scalar(2, "H"), body.scalar(3, "Q")
        )
    elif kind is BodyType.CHANNEL_OPEN:
        message = ChannelOpen(body.scalar(0, "B"))
    elif kind is BodyType.HEARTBEAT:
        message = Heartbeat(
            body.scalar(0, "Q"),
            body.scalar(1, "Q"),
            body.scalar(2, "Q"),
            body.scalar(3, "Q"),
            body.scalar(4, "Q"),
            body.scalar(5, "I"),
            body.scalar(6, "I"),
        )
    elif kind is BodyType.SESSION_CLOSE:
        message = SessionClose(body.scalar(0, "H"), body.string(1) or "")
    elif kind is BodyType.REPLICATION_MESSAGE:
        message = ReplicationMessage(
            body.scalar(0, "Q"),
            body.scalar(1, "I"),
            body.bytes_vector(2) or b"",
            body.scalar(3, "I"),
        )
    else:
        message = AssetChunk(
            body.scalar(0, "Q"),
            body.scalar(1, "Q"),
            body.scalar(2, "Q"),
            body.string(3),
            body.bytes_vector(4) or b"",
        )
    return kind, message


# --------------------------------------------------------------------------------------------
# QUIC plumbing
# --------------------------------------------------------------------------------------------


def build_heartbeat(
    sequence: int,
    now_us: int,
    latest_from_peer: tuple[int, int, int],
    rtt_us: int | None,
    jitter_us: float,
) -> Heartbeat:
    """Spec 4.4: heartbeat ``sequence`` sent at ``now_us``, echoing the peer's latest
    (its sequence, 0 for none; its ``sent_at_us``; when it arrived here), with this
    side's estimates saturated to u32."""
    echo, echo_sent_at, echo_received_at = latest_from_peer
    return Heartbeat(
        sequence=sequence,
        sent_at_us=now_us,
        echo_sequence=echo,
        echo_sent_at_us=echo_sent_at if echo else 0,
        echo_delay_us=max(0, now_us - echo_received_at) if echo else 0,
        rtt_us=min(rtt_us or 0, 2**32 - 1),
        jitter_us=min(int(jitter_us), 2**32 - 1),
    )


async def read_spec_frame(
    reader: asyncio.StreamReader,
    limit: int,
    where: str,
    raise_if_abnormal_eof: Callable[[], None],
) -> tuple[BodyType, Message] | None:
    """Spec 3: the next frame from ``reader`` (payloads up to ``limit`` bytes; ``where``
    names the stream in errors), or None on a clean FIN on a frame boundary. At an end
    of stream ``raise_if_abnormal_eof`` raises unless it was a FIN."""
    try:
        prefix = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        raise_if_abnormal_eof()
        if exc.partial:
            raise SpecDeviation(
                "3", ErrorCode.MALFORMED_FRAME, "stream ended (FIN) inside a length prefix"
            ) from None
        return None
    (length,) = struct.unpack(">I", prefix)
    if length == 0:
        raise SpecDeviation("3", ErrorCode.MALFORMED_FRAME, "frame length prefix is 0")
    if length > limit:
        raise SpecDeviation(
            "3",
            ErrorCode.FRAME_TOO_LARGE,
            f"frame of {length} bytes on {where} exceeds the limit {limit}",
        )
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise_if_abnormal_eof()
        raise SpecDeviation(
            "3", ErrorCode.MALFORMED_FRAME, "stream ended (FIN) inside a frame"
        ) from None
    return decode_payload(payload)


def take_asset_chunk(
    partial: dict[int, tuple[str, int, bytearray]], chunk: AssetChunk
) -> tuple[str, bytes] | None:
    """Spec 4.5: add ``chunk`` to the assets in progress (``partial``, by asset id, as
    name, total size and data so far); ``(name, data)`` once its asset is complete.
    Raises the spec's deviation for a chunk out of place."""

    def malformed(what: str) -> SpecDeviation:
        return SpecDeviation(
            "4.5", ErrorCode.MALFORMED_FRAME, f"AssetChunk id={chunk.asset_id}: {what}"
        )

    if chunk.total_size > MAX_ASSET_SIZE:
        raise SpecDeviation(
            "4.5", ErrorCode.FRAME_TOO_LARGE, f"asset total_size {chunk.total_size}"
        )
    state = partial.get(chunk.asset_id)
    if state is None:
        if chunk.offset != 0:
            raise malformed(f"first chunk at offset {chunk.offset}")
        if chunk.name is None:
            raise malformed("first chunk without a name")
        state = partial[chunk.asset_id] = (chunk.name, chunk.total_size, bytearray())
    name, total, data = state
    if chunk.total_size != total:
        raise malformed(f"total_size {chunk.total_size} != first chunk's {total}")
    if chunk.offset != len(data):
        raise malformed(f"offset {chunk.offset}, expected {len(data)}")
    if chunk.offset + len(chunk.data) > total:
        raise malformed("data runs past total_size")
    data += chunk.data
    if len(data) < total:
        return None
    del partial[chunk.asset_id]
    return name, bytes(data)


def decompress_replication(message: ReplicationMessage) -> bytes:
    """The payload of a compressed replication message (section 4.5), decoded within the
    replication limit; :class:`SpecDeviation` if it is not zstd or its size is wrong."""
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(message.payload) as reader:
            while len(out) <= REPLICATION_LIMIT:
                chunk = reader.read(REPLICATION_LIMIT + 1 - len(out))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        raise SpecDeviation("4.5", ErrorCode.MALFORMED_FRAME, f"bad zstd: {exc}") from None
    if len(out) != message.uncompressed_size or len(out) > REPLICATION_LIMIT:
        raise SpecDeviation(
            "4.5",
            ErrorCode.MALFORMED_FRAME,
            f"decompressed to {len(out)} bytes, uncompressed_size says {message.uncompressed_size}",
        )
    return bytes(out)


class _PeerProtocol(QuicConnectionProtocol):
    """Routes aioquic events to per-stream readers and records how the connection ended."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None) -> None:
        super().__init__(quic, stream_handler=stream_handler)
        self.readers: dict[int, asyncio.StreamReader] = {}
        self.terminated: events.ConnectionTerminated | None = None
        self.closed_by_us = False
        self.alpn: str | None = None
        self.violation: SpecDeviation | None = None
        self.stream_events: list[events.QuicEvent] = []
        self.fins: set[int] = set()
        self.stream_errors: dict[int, Exception] = {}
        self.changed = asyncio.Event()

    def open_stream(self) -> int:
        stream_id = self._quic.get_next_available_stream_id(is_unidirectional=False)
        self.readers[stream_id] = asyncio.StreamReader()
        return stream_id

    def open_unidirectional_stream(self) -> int:
        return int(self._quic.get_next_available_stream_id(is_unidirectional=True))

    def write(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        if self.terminated is not None:
            raise self.termination_error()
        self._quic.send_stream_data(stream_id, data, end_stream=end)
        self.transmit()

    def close_connection(self, code: int, reason: str) -> None:
        if self._quic._close_event is None:
            self.closed_by_us = True
        self.close(error_code=code, reason_phrase=reason)

    def all_sent_data_acked(self, stream_ids: Sequence[int]) -> bool:
        streams = self._quic._streams
        return all(sid not in streams or streams[sid].sender.is_finished for sid in stream_ids)

    def termination_error(self) -> ConnectionClosedByServer:
        event = self.terminated
        assert event is not None
        return ConnectionClosedByServer(event.error_code, event.frame_type, event.reason_phrase)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        self.changed.set()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.alpn = event.alpn_protocol
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = event
            for each in self.readers.values():
                each.feed_eof()
        elif isinstance(event, events.StreamDataReceived):
            reader = self.readers.get(event.stream_id)
            if reader is None:
                self._fail(
                    SpecDeviation(
                        "1/2",
                        ErrorCode.PROTOCOL_VIOLATION,
                        f"server sent data on stream {event.stream_id}, which the client "
                        "never opened (no unidirectional or server-initiated streams in v1)",
                    )
                )
                return
            if event.data:
                reader.feed_data(event.data)
            if event.end_stream:
                self.fins.add(event.stream_id)
                reader.feed_eof()
        elif isinstance(event, events.StreamReset | events.StopSendingReceived):
            self.stream_events.append(event)
            target = self.readers.get(event.stream_id)
            if isinstance(event, events.StreamReset) and target is not None:
                self.stream_errors.setdefault(
                    event.stream_id,
                    SpecDeviation(
                        "3",
                        ErrorCode.PROTOCOL_VIOLATION,
                        f"server reset stream {event.stream_id} with code {event.error_code} "
                        "instead of ending it on a frame boundary",
                    ),
                )
                target.feed_eof()
        elif isinstance(event, events.DatagramFrameReceived):
            self._fail(
                SpecDeviation("1", ErrorCode.PROTOCOL_VIOLATION, "server sent a DATAGRAM frame")
            )
        self.changed.set()

    def _fail(self, error: SpecDeviation) -> None:
        if self.violation is None:
            self.violation = error
        for reader in self.readers.values():
            reader.feed_eof()

    def eof_error(self, stream_id: int) -> Exception | None:
        """Why a stream's reader hit EOF, when that was not the peer's FIN."""
        if stream_id in self.fins:
            return None
        if stream_id in self.stream_errors:
            return self.stream_errors[stream_id]
        if self.violation is not None:
            return self.violation
        if self.terminated is not None:
            return self.termination_error()
        return RuntimeError(f"stream {stream_id} ended without FIN or connection close")


class FramedStream:
    """Section 3 framing over one QUIC stream of the peer."""

    def __init__(self, protocol: _PeerProtocol, stream_id: int, channel: ChannelIndex) -> None:
        self.protocol = protocol
        self.stream_id = stream_id
        self.channel = channel
        self.reader = protocol.readers[stream_id]
        self.fin_received = False

    def send(self, message: Message, *, omit_empty: bool = True) -> None:
        self.protocol.write(self.stream_id, encode_frame(message, omit_empty=omit_empty))

    def send_raw(self, data: bytes) -> None:
        self.protocol.write(self.stream_id, data)

    def finish(self) -> None:
        self.protocol.write(self.stream_id, b"", end=True)

    async def receive(self) -> tuple[BodyType, Message] | None:
        """The next frame, or None on a clean FIN on a frame boundary."""
        frame = await read_spec_frame(
            self.reader,
            CHANNEL_LIMITS[self.channel],
            self.channel.name,
            self._raise_if_abnormal_eof,
        )
        if frame is None:
            self.fin_received = True
            return None
        kind, message = frame
        if kind not in SERVER_ALLOWED[self.channel]:
            raise SpecDeviation(
                "2/4",
                ErrorCode.PROTOCOL_VIOLATION,
                f"{type(message).__name__} is not allowed server->client on {self.channel.name}",
            )
        return kind, message

    def _raise_if_abnormal_eof(self) -> None:
        error = self.protocol.eof_error(self.stream_id)
        if error is not None:
            raise error


# --------------------------------------------------------------------------------------------
# The peer
# --------------------------------------------------------------------------------------------


@dataclass
class PeerOptions:
    host: str
    port: int
    ca_pem: bytes
    server_name: str = "localhost"
    manifest: Mapping[str, str] = field(default_factory=dict)
    capabilities: tuple[int, ...] = ()
    auth_token: bytes = b""
    signing_key: Ed25519PrivateKey | None = None
    replication: Sequence[tuple[int, bytes]] = ()
    compress_replication: bool = False
    replication_flags: int = 0  # sent as-is when not compressing (reserved bits test)
    replication_uncompressed_size: int = 0
    expect_replication_echo: bool = True
    assets: Sequence[tuple[str, bytes]] = ()
    asset_chunk_size: int = 64 * 1024
    expect_asset_echo: bool = True
    min_server_heartbeats: int = 0
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 5.0
    handshake_timeout: float = 5.0
    step_timeout: float = 5.0
    close_code: int = ErrorCode.NO_ERROR
    close_reason: str = "spec peer done"
    # deliberate deviations, for negative tests
    protocol_version: int = PROTOCOL_VERSION
    schema_hash_override: int | None = None
    nonce: bytes | None = None
    public_key_override: bytes | None = None
    corrupt_confirm_signature: bool = False
    # a named deliberate violation from SCENARIOS; the peer then waits for the server's close
    scenario: str | None = None
    omit_empty: bool = True


@dataclass
class PeerResult:
    alpn: str | None = None
    hello: SessionHello | None = None
    acknowledge: SessionAcknowledge | None = None
    replication_echoes: list[ReplicationMessage] = field(default_factory=list)
    replication_payloads: list[tuple[int, bytes]] = field(default_factory=list)
    assets_echoed: list[tuple[int, str, bytes]] = field(default_factory=list)
    heartbeats_sent: int = 0
    heartbeats_received: list[Heartbeat] = field(default_factory=list)
    heartbeat_arrivals: list[float] = field(default_factory=list)
    rtt_us: int = 0
    jitter_us: int = 0
    server_close: SessionClose | None = None
    control_after_close: list[str] = field(default_factory=list)
    fins_received: set[str] = field(default_factory=set)
    quic_close_code: int | None = None
    quic_close_frame_type: int | None = None
    quic_close_reason: str = ""
    quic_closed_by_us: bool = False
    stream_events: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def _now_us() -> int:
    return time.monotonic_ns() // 1000


class SpecPeer:
    def __init__(self, options: PeerOptions) -> None:
        self.options = options
        self.key = options.signing_key or Ed25519PrivateKey.generate()
        self.result = PeerResult()
        self.protocol: _PeerProtocol | None = None
        self.negotiated: tuple[int, ...] = ()
        self.closing = False
        # heartbeat state (section 4.4)
        self.sent_heartbeats: dict[int, int] = {}
        self.next_sequence = 1
        self.last_peer_sequence = 0
        self.last_peer_sent_at = 0
        self.last_peer_received_at = 0
        self.last_echo_sequence = 0
        self.rtt_us: int | None = None
        self.jitter_us = 0.0
        self.heartbeat_seen = asyncio.Event()
        self.replication_done = asyncio.Event()
        self.assets_done = asyncio.Event()
        self.stop = asyncio.Event()

    # -- entry point -----------------------------------------------------------------------

    async def run(self) -> PeerResult:
        opts = self.options
        started = time.monotonic()
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            server_name=opts.server_name,
            idle_timeout=30.0,
        )
        config.load_verify_locations(cadata=opts.ca_pem)
        quic = QuicConnection(configuration=config)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _PeerProtocol(quic), sock=sock
        )
        assert isinstance(protocol, _PeerProtocol)
        self.protocol = protocol
        try:
            await self._session(protocol)
        except SpecDeviation as exc:
            protocol.close_connection(exc.code, str(exc)[:200])
            raise
        finally:
            if protocol.terminated is None:
                protocol.close_connection(ErrorCode.INTERNAL_ERROR, "spec peer aborted")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(opts.step_timeout):
                    await protocol.wait_closed()
            transport.close()
            self._record_close(protocol)
            self.result.elapsed = time.monotonic() - started
        return self.result

    def _record_close(self, protocol: _PeerProtocol) -> None:
        event = protocol.terminated
        if event is not None:
            self.result.quic_close_code = event.error_code
            self.result.quic_close_frame_type = event.frame_type
            self.result.quic_close_reason = event.reason_phrase
        self.result.quic_closed_by_us = protocol.closed_by_us
        self.result.stream_events = [repr(e) for e in protocol.stream_events]

    async def _session(self, protocol: _PeerProtocol) -> None:
        opts = self.options
        # Section 4.1: the client runs the handshake deadline from when it starts connecting.
        try:
            async with asyncio.timeout(opts.handshake_timeout):
                protocol.connect(("127.0.0.1", opts.port))
                await protocol.wait_connected()
                self.result.alpn = protocol.alpn
                if protocol.alpn != ALPN:
                    raise SpecDeviation(
                        "1", ErrorCode.PROTOCOL_VIOLATION, f"ALPN {protocol.alpn!r} != {ALPN!r}"
                    )
                if opts.scenario == "no-hello":
                    await self._wait_for_close(None)
                control = FramedStream(protocol, protocol.open_stream(), ChannelIndex.CONTROL)
                if opts.scenario == "channel-open-first":
                    control.send(ChannelOpen(ChannelIndex.REPLICATION))
                    await self._wait_for_close(control)
                hello = self._hello()
                self.result.hello = hello
                control.send(hello, omit_empty=opts.omit_empty)
                first = await control.receive()
        except TimeoutError:
            protocol.close_connection(ErrorCode.HANDSHAKE_TIMEOUT, "no SessionAcknowledge")
            raise
        except ConnectionError:
            raise protocol.termination_error() from None
        if first is None:
            raise SpecDeviation(
                "4.1", ErrorCode.HANDSHAKE_FAILED, "control stream ended before the acknowledge"
            )
        kind, message = first
        if isinstance(message, SessionReject):
            await self._after_reject(control, message)
        if not isinstance(message, SessionAcknowledge):
            raise SpecDeviation(
                "4.1",
                ErrorCode.PROTOCOL_VIOLATION,
                f"first server frame is {kind.name}, not SessionAcknowledge/SessionReject",
            )
        confirm = self._check_acknowledge(hello, message)
        self.result.acknowledge = message
        if opts.corrupt_confirm_signature:
            confirm = SessionConfirm(bytes([confirm.signature[0] ^ 0x01]) + confirm.signature[1:])
        if opts.scenario == "no-confirm":
            await self._wait_for_close(control)
        if opts.scenario == "heartbeat-before-confirm":
            control.send(Heartbeat(1, _now_us()))
            await self._wait_for_close(control)
        control.send(confirm)
        replication = FramedStream(protocol, protocol.open_stream(), ChannelIndex.REPLICATION)
        replication.send(ChannelOpen(ChannelIndex.REPLICATION))
        assets = FramedStream(protocol, protocol.open_stream(), ChannelIndex.ASSETS)
        assets.send(ChannelOpen(ChannelIndex.ASSETS))
        if (control.stream_id, replication.stream_id, assets.stream_id) != (0, 4, 8):
            raise AssertionError("a native QUIC client opens streams 0, 4 and 8 (section 2)")
        if opts.corrupt_confirm_signature:
            await self._wait_for_close(control)
        if opts.scenario is not None:
            SCENARIOS[opts.scenario](self, control, replication, assets)
            await self._wait_for_close(control)
        await self._established(control, replication, assets)

    # -- handshake -------------------------------------------------------------------------

    def _hello(self) -> SessionHello:
        opts = self.options
        return SessionHello(
            protocol_version=opts.protocol_version,
            schema_hash=(
                opts.schema_hash_override
                if opts.schema_hash_override is not None
                else schema_hash(opts.manifest)
            ),
            nonce=opts.nonce if opts.nonce is not None else os.urandom(NONCE_SIZE),
            capabilities=tuple(opts.capabilities),
            auth_token=opts.auth_token,
            public_key=(
                opts.public_key_override
                if opts.public_key_override is not None
                else raw_public_key(self.key)
            ),
        )

    def _check_acknowledge(self, hello: SessionHello, ack: SessionAcknowledge) -> SessionConfirm:
        def fail(what: str) -> SpecDeviation:
            return SpecDeviation("4.1", ErrorCode.HANDSHAKE_FAILED, f"SessionAcknowledge: {what}")

        if ack.protocol_version != hello.protocol_version:
            raise fail(f"protocol_version {ack.protocol_version} not echoed")
        if ack.schema_hash != hello.schema_hash:
            raise fail(f"schema_hash {ack.schema_hash:#x} not echoed")
        if len(ack.nonce) != NONCE_SIZE:
            raise fail(f"nonce is {len(ack.nonce)} bytes, not 24")
        if ack.nonce == hello.nonce:
            raise fail("server nonce equals the client nonce (not fresh)")
        if ack.session_id == 0:
            raise fail("session_id is 0")
        if len(ack.public_key) != KEY_SIZE or not is_ed25519_point(ack.public_key):
            raise fail("public_key is not a 32-byte Ed25519 point")
        if len(ack.signature) != SIGNATURE_SIZE:
            raise fail(f"signature is {len(ack.signature)} bytes, not 64")
        negotiated = ack.capabilities
        if list(negotiated) != sorted(set(negotiated)):
            raise fail(f"capabilities {negotiated} not sorted ascending without duplicates")
        if not set(negotiated) <= set(hello.capabilities):
            raise fail(f"negotiated {negotiated} is not a subset of requested")
        transcript = handshake_transcript(
            protocol_version=hello.protocol_version,
            schema_hash=hello.schema_hash,
            client_nonce=hello.nonce,
            client_public_key=hello.public_key,
            client_capabilities=hello.capabilities,
            auth_token=hello.auth_token,
            server_nonce=ack.nonce,
            server_public_key=ack.public_key,
            session_id=ack.session_id,
            role=ack.role,
            negotiated_capabilities=negotiated,
        )
        try:
            Ed25519PublicKey.from_public_bytes(ack.public_key).verify(
                ack.signature, server_signed_bytes(transcript)
            )
        except (InvalidSignature, ValueError):
            raise fail("server signature does not verify over the transcript") from None
        self.negotiated = negotiated
        return SessionConfirm(self.key.sign(client_signed_bytes(transcript)))

    async def _after_reject(self, control: FramedStream, reject: SessionReject) -> NoReturn:
        """Section 4.1: SessionReject, then the server closes with the same code."""
        assert self.protocol is not None
        close: ConnectionClosedByServer | None = None
        try:
            async with asyncio.timeout(self.options.step_timeout):
                extra = await control.receive()
                if extra is not None:
                    raise SpecDeviation(
                        "4.1",
                        ErrorCode.PROTOCOL_VIOLATION,
                        f"{extra[0].name} after SessionReject",
                    )
                await self.protocol.wait_closed()
        except ConnectionClosedByServer as exc:
            close = exc
        except TimeoutError:
            close = None
        if close is None and self.protocol.terminated is not None:
            close = self.protocol.termination_error()
        raise SessionRejectedError(reject, close)

    async def _wait_for_close(self, control: FramedStream | None) -> NoReturn:
        """After a deliberate violation: collect control frames until the server closes QUIC.

        Raises the server's close as :class:`ConnectionClosedByServer`; no heartbeats are sent.
        """
        assert self.protocol is not None
        async with asyncio.timeout(self.options.step_timeout):
            while control is not None:
                frame = await control.receive()
                if frame is None:
                    self.result.fins_received.add("control")
                    break
                self.result.control_after_close.append(type(frame[1]).__name__)
                if isinstance(frame[1], SessionClose):
                    self.result.server_close = frame[1]
            await self.protocol.wait_closed()
        raise self.protocol.termination_error()

    # -- established session ---------------------------------------------------------------

    async def _established(
        self, control: FramedStream, replication: FramedStream, assets: FramedStream
    ) -> None:
        opts = self.options
        assert self.protocol is not None
        protocol = self.protocol
        if not opts.replication or not opts.expect_replication_echo:
            self.replication_done.set()
        if not opts.assets or not opts.expect_asset_echo:
            self.assets_done.set()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeat_sender(control))
                readers = [
                    group.create_task(self._control_reader(control)),
                    group.create_task(self._replication_reader(replication)),
                    group.create_task(self._assets_reader(assets)),
                ]
                self._send_replication(replication)
                self._send_assets(assets)
                async with asyncio.timeout(opts.step_timeout):
                    await self.replication_done.wait()
                    await self.assets_done.wait()
                    while len(self.result.heartbeats_received) < opts.min_server_heartbeats:
                        self.heartbeat_seen.clear()
                        await self.heartbeat_seen.wait()
                # Section 4.6: SessionClose on the control stream, finish our streams, then
                # close QUIC with the same code.  We wait (bounded) for our data to be
                # acknowledged so the close does not overtake it.
                self.closing = True
                self.stop.set()
                control.send(SessionClose(opts.close_code, opts.close_reason))
                for stream in (control, replication, assets):
                    stream.finish()
                ids = [control.stream_id, replication.stream_id, assets.stream_id]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(opts.step_timeout):
                        while protocol.terminated is None and not protocol.all_sent_data_acked(ids):
                            protocol.changed.clear()
                            await protocol.changed.wait()
                if protocol.terminated is None:
                    protocol.close_connection(opts.close_code, opts.close_reason)
                async with asyncio.timeout(opts.step_timeout):
                    await protocol.wait_closed()
                    for task in readers:
                        await task
        except BaseExceptionGroup as group:
            # The server's close explains whatever else failed; then our own findings.
            for kind in (ConnectionClosedByServer, SpecDeviation, TimeoutError):
                match = group.subgroup(kind)
                if match is not None:
                    raise _first_leaf(match) from group
            raise
        if protocol.violation is not None:
            raise protocol.violation

    async def _heartbeat_sender(self, control: FramedStream) -> None:
        while not self.stop.is_set():
            now = _now_us()
            sequence = self.next_sequence
            self.next_sequence += 1
            heartbeat = build_heartbeat(
                sequence,
                now,
                (self.last_peer_sequence, self.last_peer_sent_at, self.last_peer_received_at),
                self.rtt_us,
                self.jitter_us,
            )
            self.sent_heartbeats[sequence] = now
            control.send(heartbeat)
            self.result.heartbeats_sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.options.heartbeat_interval)

    def _on_heartbeat(self, heartbeat: Heartbeat) -> None:
        def violation(what: str) -> SpecDeviation:
            return SpecDeviation("4.4", ErrorCode.PROTOCOL_VIOLATION, f"Heartbeat: {what}")

        now = _now_us()
        if heartbeat.sequence <= self.last_peer_sequence:
            raise violation(
                f"sequence {heartbeat.sequence} does not increase (last {self.last_peer_sequence})"
            )
        if heartbeat.sequence != self.last_peer_sequence + 1:
            raise violation(
                f"sequence {heartbeat.sequence} is not last+1 ({self.last_peer_sequence + 1}); "
                "'sequence starts at 1 and increases by 1'"
            )
        if heartbeat.echo_sequence == 0:
            if heartbeat.echo_sent_at_us or heartbeat.echo_delay_us:
                raise violation("echo_sequence is 0 but echo_sent_at_us/echo_delay_us are not")
        else:
            sent_at = self.sent_heartbeats.get(heartbeat.echo_sequence)
            if sent_at is None:
                raise violation(f"echo_sequence {heartbeat.echo_sequence} was never sent")
            if heartbeat.echo_sent_at_us != sent_at:
                raise violation(
                    f"echo_sent_at_us {heartbeat.echo_sent_at_us} != our sent_at_us {sent_at}"
                )
            if heartbeat.echo_sequence < self.last_echo_sequence:
                raise violation("echo_sequence went backwards (must echo the latest heartbeat)")
            self.last_echo_sequence = heartbeat.echo_sequence
            rtt = max(0, now - heartbeat.echo_sent_at_us - heartbeat.echo_delay_us)
            if self.rtt_us is not None:
                self.jitter_us += (abs(rtt - self.rtt_us) - self.jitter_us) / 16
            self.rtt_us = rtt
        self.last_peer_sequence = heartbeat.sequence
        self.last_peer_sent_at = heartbeat.sent_at_us
        self.last_peer_received_at = now
        self.result.heartbeats_received.append(heartbeat)
        self.result.heartbeat_arrivals.append(time.monotonic())
        self.result.rtt_us = self.rtt_us or 0
        self.result.jitter_us = int(self.jitter_us)
        self.heartbeat_seen.set()

    async def _control_reader(self, control: FramedStream) -> None:
        deadline = self.options.heartbeat_timeout
        while True:
            try:
                async with asyncio.timeout(deadline):
                    frame = await control.receive()
            except TimeoutError:
                raise SpecDeviation(
                    "4.4",
                    ErrorCode.HEARTBEAT_TIMEOUT,
                    f"no Heartbeat from the server within {deadline} s",
                ) from None
            except ConnectionClosedByServer:
                if self.closing:
                    return
                raise
            if frame is None:
                self.result.fins_received.add("control")
                if self.closing:
                    return
                if self.result.server_close is not None:
                    raise self._closed_by_server()
                raise SpecDeviation(
                    "4.6",
                    ErrorCode.PROTOCOL_VIOLATION,
                    "server ended the control stream without SessionClose",
                )
            kind, message = frame
            if self.closing or self.result.server_close is not None:
                self.result.control_after_close.append(kind.name)
            if isinstance(message, Heartbeat):
                self._on_heartbeat(message)
            elif isinstance(message, SessionClose):
                self.result.server_close = message
                if not self.closing:
                    raise self._closed_by_server()
            else:
                raise SpecDeviation(
                    "4.1", ErrorCode.PROTOCOL_VIOLATION, f"{kind.name} after the handshake"
                )

    def _closed_by_server(self) -> ConnectionClosedByServer:
        close = self.result.server_close
        assert close is not None
        return ConnectionClosedByServer(close.code, None, f"SessionClose: {close.reason}")

    async def _replication_reader(self, stream: FramedStream) -> None:
        expected = list(self.options.replication) if self.options.expect_replication_echo else []
        while True:
            try:
                frame = await stream.receive()
            except ConnectionClosedByServer:
                if self.closing:
                    return
                raise
            if frame is None:
                self.result.fins_received.add("replication")
                if len(self.result.replication_echoes) < len(expected) and not self.closing:
                    raise SpecDeviation(
                        "4.5", ErrorCode.PROTOCOL_VIOLATION, "replication ended before echoes"
                    )
                return
            message = frame[1]
            assert isinstance(message, ReplicationMessage)
            payload = self._replication_payload(message)
            self.result.replication_echoes.append(message)
            self.result.replication_payloads.append((message.tick, payload))
            if len(self.result.replication_payloads) >= len(expected):
                self.replication_done.set()

    def _replication_payload(self, message: ReplicationMessage) -> bytes:
        if message.flags & ~FLAG_COMPRESSED:
            raise SpecDeviation(
                "4.5",
                ErrorCode.PROTOCOL_VIOLATION,
                f"reserved flag bits set ({message.flags:#x}); 'senders set them to 0'",
            )
        if not message.flags & FLAG_COMPRESSED:
            if message.uncompressed_size != 0:
                raise SpecDeviation(
                    "4.5",
                    ErrorCode.PROTOCOL_VIOLATION,
                    f"uncompressed_size {message.uncompressed_size} with bit 0 clear; "
                    "'senders set uncompressed_size to 0'",
                )
            return message.payload
        if CAP_ZSTD not in self.negotiated:
            raise SpecDeviation(
                "4.5", ErrorCode.PROTOCOL_VIOLATION, "compressed without negotiating 0x80000001"
            )
        return decompress_replication(message)

    async def _assets_reader(self, stream: FramedStream) -> None:
        expected = len(self.options.assets) if self.options.expect_asset_echo else 0
        partial: dict[int, tuple[str, int, bytearray]] = {}
        while True:
            try:
                frame = await stream.receive()
            except ConnectionClosedByServer:
                if self.closing:
                    return
                raise
            if frame is None:
                self.result.fins_received.add("assets")
                if partial:
                    raise SpecDeviation(
                        "4.5", ErrorCode.MALFORMED_FRAME, "assets stream ended mid-asset"
                    )
                return
            chunk = frame[1]
            assert isinstance(chunk, AssetChunk)

            complete = take_asset_chunk(partial, chunk)
            if complete is not None:
                name, data = complete
                self.result.assets_echoed.append((chunk.asset_id, name, data))
                if len(self.result.assets_echoed) >= expected:
                    self.assets_done.set()

    def _send_replication(self, stream: FramedStream) -> None:
        compress = self.options.compress_replication and CAP_ZSTD in self.negotiated
        compressor = zstandard.ZstdCompressor()
        for tick, payload in self.options.replication:
            if compress:
                stream.send(
                    ReplicationMessage(
                        tick, FLAG_COMPRESSED, compressor.compress(payload), len(payload)
                    )
                )
            else:
                stream.send(
                    ReplicationMessage(
                        tick,
                        self.options.replication_flags,
                        payload,
                        self.options.replication_uncompressed_size,
                    )
                )

    def _send_assets(self, stream: FramedStream) -> None:
        size = self.options.asset_chunk_size
        for asset_id, (name, data) in enumerate(self.options.assets, start=1):
            offsets = range(0, len(data), size) if data else range(1)
            for offset in offsets:
                stream.send(
                    AssetChunk(
                        asset_id=asset_id,
                        offset=offset,
                        total_size=len(data),
                        name=name if offset == 0 else None,
                        data=data[offset : offset + size],
                    )
                )


# --------------------------------------------------------------------------------------------
# Deliberate violations, each sent right after the channels are open (section in the name's
# comment); the peer then waits for the server's CONNECTION_CLOSE.
# --------------------------------------------------------------------------------------------

_Scenario = Callable[[SpecPeer, FramedStream, FramedStream, FramedStream], None]


def _asset(asset_id: int, offset: int, total: int, name: str | None, data: bytes) -> AssetChunk:
    return AssetChunk(asset_id, offset, total, name, data)


def _extra_stream(peer: SpecPeer, first: Message) -> None:
    assert peer.protocol is not None
    stream_id = peer.protocol.open_stream()
    peer.protocol.write(stream_id, encode_frame(first))


def _uni_stream(peer: SpecPeer) -> None:
    assert peer.protocol is not None
    peer.protocol.write(peer.protocol.open_unidirectional_stream(), encode_frame(ChannelOpen(1)))


def _bad_identifier() -> bytes:
    payload = bytearray(encode_payload(Heartbeat(1, _now_us())))
    payload[4:8] = b"XXXX"
    return struct.pack(">I", len(payload)) + bytes(payload)


def _send(stream: FramedStream, *messages: Message, raw: bytes = b"", finish: bool = False) -> None:
    for message in messages:
        stream.send(message)
    if raw:
        stream.send_raw(raw)
    if finish:
        stream.finish()


def _frame_len(payload: bytes) -> int:
    return len(encode_payload(ReplicationMessage(1, 0, payload, 0)))


def _hostile(message: Message, field_index: int | None, where: str, value: int) -> bytes:
    """A well-formed frame with one offset or length patched to point past the buffer."""
    buf = bytearray(encode_payload(message))
    (root,) = struct.unpack_from("<I", buf, 0)
    frame = _Table(bytes(buf), root, "Frame")
    if where == "root":
        struct.pack_into("<I", buf, 0, value)
    elif where == "body":
        slot = frame._field(1, 4)
        assert slot is not None
        struct.pack_into("<I", buf, slot, value - slot)
    else:
        body = frame.table(1, "body")
        assert body is not None
        if where == "vtable":
            struct.pack_into("<i", buf, body.pos, body.pos - value)
        else:  # a vector's length
            assert field_index is not None
            target = body._indirect(field_index)
            assert target is not None
            struct.pack_into("<I", buf, target, value - (target + 4))
    return _raw(bytes(buf))


def _raw(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


SCENARIOS: dict[str, _Scenario] = {
    # section 3
    "zero-length": lambda p, c, r, a: c.send_raw(bytes(4)),
    "control-too-large": lambda p, c, r, a: c.send_raw(struct.pack(">I", CONTROL_LIMIT + 1)),
    "replication-too-large": lambda p, c, r, a: r.send_raw(
        struct.pack(">I", REPLICATION_LIMIT + 1)
    ),
    "assets-too-large": lambda p, c, r, a: a.send_raw(struct.pack(">I", ASSETS_LIMIT + 1)),
    "garbage-payload": lambda p, c, r, a: c.send_raw(_raw(b"\xff" * 16)),
    "bad-identifier": lambda p, c, r, a: c.send_raw(_bad_identifier()),
    "unknown-union-type": lambda p, c, r, a: c.send_raw(
        _raw(encode_payload(ChannelOpen(1), body_type_override=10))
    ),
    "absent-body": lambda p, c, r, a: c.send_raw(
        _raw(encode_payload(ChannelOpen(1), body_type_override=0))
    ),
    "vector-past-end-by-one": lambda p, c, r, a: r.send_raw(
        _hostile(ReplicationMessage(1, 0, b"abcdef", 0), 2, "length", _frame_len(b"abcdef") + 1)
    ),
    "vector-length-huge": lambda p, c, r, a: r.send_raw(
        _hostile(ReplicationMessage(1, 0, b"abcdef", 0), 2, "length", 2**31)
    ),
    "string-past-end": lambda p, c, r, a: a.send_raw(
        _hostile(AssetChunk(1, 0, 3, "name", b"abc"), 3, "length", 10_000)
    ),
    "root-past-end": lambda p, c, r, a: c.send_raw(
        _hostile(Heartbeat(1, _now_us()), None, "root", 10_000)
    ),
    "body-past-end": lambda p, c, r, a: c.send_raw(
        _hostile(Heartbeat(1, _now_us()), None, "body", 10_000)
    ),
    "vtable-past-end": lambda p, c, r, a: c.send_raw(
        _hostile(Heartbeat(1, _now_us()), None, "vtable", 10_000)
    ),
    "fin-inside-frame": lambda p, c, r, a: _send(
        r, raw=struct.pack(">I", 100) + bytes(10), finish=True
    ),
    # section 2 / 4
    "channel-open-3": lambda p, c, r, a: _extra_stream(p, ChannelOpen(3)),
    "second-replication-stream": lambda p, c, r, a: _extra_stream(p, ChannelOpen(1)),
    "hello-on-later-stream": lambda p, c, r, a: _extra_stream(
        p, SessionHello(1, 0, bytes(24), (), b"", bytes(32))
    ),
    "unidirectional-stream": lambda p, c, r, a: _uni_stream(p),
    "heartbeat-on-replication": lambda p, c, r, a: r.send(Heartbeat(1, _now_us())),
    "replication-on-control": lambda p, c, r, a: c.send(ReplicationMessage(1, 0, b"x", 0)),
    "channel-open-on-control": lambda p, c, r, a: c.send(ChannelOpen(1)),
    "second-confirm": lambda p, c, r, a: c.send(SessionConfirm(bytes(64))),
    # section 4.4
    "heartbeat-repeat": lambda p, c, r, a: _send(
        c, Heartbeat(1, _now_us()), Heartbeat(1, _now_us())
    ),
    "no-heartbeats": lambda p, c, r, a: None,
    # section 4.5
    "compressed-without-capability": lambda p, c, r, a: r.send(
        ReplicationMessage(1, FLAG_COMPRESSED, zstandard.ZstdCompressor().compress(b"x"), 1)
    ),
    "zstd-size-mismatch": lambda p, c, r, a: r.send(
        ReplicationMessage(1, FLAG_COMPRESSED, zstandard.ZstdCompressor().compress(b"xy"), 3)
    ),
    "asset-gap": lambda p, c, r, a: _send(
        a, _asset(1, 0, 10, "n", b"abc"), _asset(1, 5, 10, None, b"abc")
    ),
    "asset-first-without-name": lambda p, c, r, a: a.send(_asset(1, 0, 3, None, b"abc")),
    "asset-past-total": lambda p, c, r, a: a.send(_asset(1, 0, 3, "n", b"abcd")),
    "asset-total-changes": lambda p, c, r, a: _send(
        a, _asset(1, 0, 10, "n", b"abc"), _asset(1, 3, 11, None, b"abc")
    ),
    "asset-too-big": lambda p, c, r, a: a.send(_asset(1, 0, MAX_ASSET_SIZE + 1, "n", b"a")),
    "asset-unfinished-at-fin": lambda p, c, r, a: _send(
        a, _asset(1, 0, 10, "n", b"abc"), finish=True
    ),
}


def run_peer(options: PeerOptions) -> PeerResult:
    """Run the spec peer on a fresh asyncio loop (call it from a worker thread)."""
    return asyncio.run(SpecPeer(options).run())


def run_peer_capturing(options: PeerOptions) -> tuple[PeerResult | None, BaseException | None]:
    """Like :func:`run_peer`, returning the exception instead of raising it."""
    peer = SpecPeer(options)
    try:
        return asyncio.run(peer.run()), None
    except Exception as exc:
        peer.result.elapsed = peer.result.elapsed or 0.0
        exc.add_note(f"peer result: {peer.result!r}"[:2000])
        return peer.result, exc


__all__: list[str] = [
    "ALPN",
    "CAP_ZSTD",
    "ConnectionClosedByServer",
    "ErrorCode",
    "PeerOptions",
    "PeerResult",
    "SessionRejectedError",
    "SpecDeviation",
    "canonical_manifest",
    "client_signed_bytes",
    "first_non_point",
    "handshake_transcript",
    "run_peer",
    "run_peer_capturing",
    "schema_hash",
    "server_signed_bytes",
    "siphash24",
]
