"""An independent Theta wire-v1 *server*, written from ``wire-v1.md`` alone.

It imports nothing from ``theta``.  The codec (bounds-checked FlatBuffers reader, the
``flatbuffers`` builder for client-side tables), SipHash, the handshake transcript and the
Ed25519 point check are reused from :mod:`spec_peer` (itself written from the spec); the two
server-only tables (``SessionAcknowledge`` and ``SessionReject``) are encoded here.

The server runs on aioquic's asyncio API on its own event loop in a worker thread
(:class:`SpecServer`), accepts connections on 127.0.0.1, validates everything a client sends
against the spec and records each deviation (naming the section) in a
:class:`ConnectionRecord`.  A :class:`ServerBehaviour` turns on deliberate misbehaviours so
that tests can check how a client reacts to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import os
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import zstandard
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from .spec_peer import (
    ALPN,
    ASSETS_LIMIT,
    CAP_ZSTD,
    CLIENT_SIGNATURE_CONTEXT,
    CONTROL_LIMIT,
    FILE_IDENTIFIER,
    FLAG_COMPRESSED,
    KEY_SIZE,
    MAX_AUTH_TOKEN,
    MAX_CAPABILITIES,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    REPLICATION_LIMIT,
    SERVER_SIGNATURE_CONTEXT,
    AssetChunk,
    BodyType,
    ChannelIndex,
    ChannelOpen,
    ErrorCode,
    Heartbeat,
    Message,
    ReplicationMessage,
    SessionAcknowledge,
    SessionClose,
    SessionConfirm,
    SessionHello,
    SessionReject,
    SpecDeviation,
    build_heartbeat,
    decompress_replication,
    encode_frame,
    handshake_transcript,
    is_ed25519_point,
    raw_public_key,
    read_spec_frame,
    schema_hash,
    take_asset_chunk,
)

ROLE_REPLICATE = 1 << 0
ROLE_UPLOAD_ASSETS = 1 << 1
ROLE_ADMIN = 1 << 2


def now_us() -> int:
    return time.monotonic_ns() // 1000


# --------------------------------------------------------------------------------------------
# Encoding of the server-only tables (section 4)
# --------------------------------------------------------------------------------------------


def _u32_vector(builder: flatbuffers.Builder, values: Sequence[int]) -> int:
    builder.StartVector(4, len(values), 4)
    for value in reversed(values):
        builder.PrependUint32(value)
    return int(builder.EndVector())


def _finish(builder: flatbuffers.Builder, body_type: BodyType, body: int) -> bytes:
    builder.StartObject(2)
    builder.PrependUint8Slot(0, int(body_type), 0)
    builder.PrependUOffsetTRelativeSlot(1, body, 0)
    frame = builder.EndObject()
    builder.Finish(frame, file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def encode_server_frame(
    message: Message, *, explicit_empty: bool = False, extra_field: int | None = None
) -> bytes:
    """Length prefix (u32 BE) + ``Frame`` payload, for any message a server sends.

    For ``SessionAcknowledge`` only: ``explicit_empty`` writes empty vectors instead of
    leaving them absent, and ``extra_field`` appends a uint32 field with id 8 that a v1
    reader does not know (FlatBuffers readers skip unknown fields).
    """
    if isinstance(message, SessionAcknowledge):
        b = flatbuffers.Builder(256)

        def vec(data: bytes) -> int:
            return int(b.CreateByteVector(data)) if (data or explicit_empty) else 0

        nonce = vec(message.nonce)
        caps = (
            _u32_vector(b, message.capabilities) if (message.capabilities or explicit_empty) else 0
        )
        key = vec(message.public_key)
        sig = vec(message.signature)
        b.StartObject(8 if extra_field is None else 9)
        if extra_field is not None:
            b.PrependUint32Slot(8, extra_field, 0)
        b.PrependUint16Slot(0, message.protocol_version, 0)
        b.PrependUint64Slot(1, message.schema_hash, 0)
        b.PrependUOffsetTRelativeSlot(2, nonce, 0)
        b.PrependUint64Slot(3, message.session_id, 0)
        b.PrependUint32Slot(4, message.role, 0)
        b.PrependUOffsetTRelativeSlot(5, caps, 0)
        b.PrependUOffsetTRelativeSlot(6, key, 0)
        b.PrependUOffsetTRelativeSlot(7, sig, 0)
        payload = _finish(b, BodyType.SESSION_ACKNOWLEDGE, b.EndObject())
    elif isinstance(message, SessionReject):
        b = flatbuffers.Builder(256)
        reason = b.CreateString(message.reason) if message.reason else 0
        b.StartObject(4)
        b.PrependUint16Slot(0, message.code, 0)
        b.PrependUOffsetTRelativeSlot(1, reason, 0)
        b.PrependUint16Slot(2, message.protocol_version, 0)
        b.PrependUint64Slot(3, message.schema_hash, 0)
        payload = _finish(b, BodyType.SESSION_REJECT, b.EndObject())
    else:
        return encode_frame(message)
    return struct.pack(">I", len(payload)) + payload


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


# --------------------------------------------------------------------------------------------
# Behaviour knobs and the record of what a client did
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AckPlan:
    """What goes into the SessionAcknowledge, and what the signature covers.

    ``signed`` overrides transcript fields for the signature only (so the signature does not
    match what is sent); ``context`` is the signature's domain-separation prefix.
    """

    protocol_version: int
    schema_hash: int
    nonce: bytes
    session_id: int
    role: int
    capabilities: tuple[int, ...]
    public_key: bytes
    signing_key: Ed25519PrivateKey
    context: bytes = SERVER_SIGNATURE_CONTEXT
    signed: Mapping[str, Any] = field(default_factory=dict)
    mutate_signature: Callable[[bytes], bytes] | None = None


Authenticator = Callable[[bytes, bytes, tuple[str, int]], "int | None"]


@dataclass(frozen=True)
class ServerBehaviour:
    manifest: Mapping[str, str] = field(default_factory=dict)
    capabilities: tuple[int, ...] = (CAP_ZSTD,)
    role: int = ROLE_REPLICATE | ROLE_UPLOAD_ASSETS
    # (auth_token, client public key, address) -> role, or None to refuse (AUTH_FAILED)
    authenticator: Authenticator | None = None
    signing_key: Ed25519PrivateKey | None = None
    handshake_timeout: float = 5.0
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 5.0
    heartbeat_limit: int | None = None  # stop heartbeating after this many
    # deliberate handshake misbehaviours
    reject: tuple[int, str] | None = None  # always answer SessionReject{code, reason}
    reject_protocol_version: int = PROTOCOL_VERSION
    answer_hello: bool = True
    close_on_hello: tuple[int, str] | None = None  # QUIC close with no SessionReject at all
    ack_tweak: Callable[[AckPlan], AckPlan] | None = None
    # established session
    echo: bool = True
    compress_echo: bool = True
    asset_chunk_size: int = 64 * 1024
    on_established: Callable[[ServerConnection], Awaitable[None]] | None = None
    ack_explicit_empty: bool = False
    ack_extra_field: int | None = None
    fragment_control: bool = False  # write control-stream frames one byte per STREAM frame
    alpn: str = ALPN
    close_grace: float = 3.0  # wait for the client's QUIC close after its SessionClose
    ack_wait: float = 2.0  # bound on waiting for our data to be acknowledged before a close

    @property
    def schema_hash(self) -> int:
        return schema_hash(self.manifest)


@dataclass
class ConnectionRecord:
    """Everything the server saw on one connection (read it once ``done`` is set)."""

    alpn: str | None = None
    stream_ids: list[int] = field(default_factory=list)
    hello: SessionHello | None = None
    acknowledge: SessionAcknowledge | None = None
    reject: SessionReject | None = None
    confirm_verified: bool = False
    channels_opened: list[int] = field(default_factory=list)
    replication_frames: list[ReplicationMessage] = field(default_factory=list)
    replication_payloads: list[tuple[int, bytes]] = field(default_factory=list)
    assets_received: list[tuple[int, str, bytes]] = field(default_factory=list)
    assets_sent: int = 0
    heartbeats_sent: list[Heartbeat] = field(default_factory=list)
    heartbeats_received: list[Heartbeat] = field(default_factory=list)
    rtt_us: list[int] = field(default_factory=list)
    negative_rtt_samples: int = 0
    client_close: SessionClose | None = None
    server_close_sent: bool = False
    frames_after_server_close: list[str] = field(default_factory=list)
    peer_idle_timeout_ms: int | None = None
    peer_max_datagram_frame_size: int | None = None
    fins: list[str] = field(default_factory=list)
    # QUIC close: (error code, frame type or None for an application close, reason phrase)
    quic_close: tuple[int, int | None, str] | None = None
    closed_by_client: bool | None = None
    deviations: list[SpecDeviation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def deviation_text(self) -> list[str]:
        return [str(d) for d in self.deviations]


class _Ended(Exception):
    """The connection is over (closed by either side); stop quietly."""


# --------------------------------------------------------------------------------------------
# One connection
# --------------------------------------------------------------------------------------------


class ServerConnection(QuicConnectionProtocol):
    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        server: SpecServer,
    ) -> None:
        super().__init__(quic, stream_handler=stream_handler)
        self.server = server
        self.behaviour = server.behaviour
        self.record = ConnectionRecord()
        self.accepted_at = time.monotonic()
        self.readers: dict[int, asyncio.StreamReader] = {}
        self.fin_streams: set[int] = set()
        self.reset_streams: set[int] = set()
        self.new_streams: asyncio.Queue[int] = asyncio.Queue()
        self.changed = asyncio.Event()
        self.terminated = asyncio.Event()
        self.established = asyncio.Event()
        self.ready = asyncio.Event()
        self.stop_sending = asyncio.Event()
        self.heartbeat_seen = asyncio.Event()
        self.closed_by_us = False
        self.control_sid: int | None = None
        self.channel_sids: dict[int, int] = {}
        self.finished_sids: set[int] = set()
        self.negotiated: tuple[int, ...] = ()
        self.role = 0
        self.key = self.behaviour.signing_key or server.signing_key
        # heartbeat state (section 4.4)
        self.next_sequence = 1
        self.sent_at: dict[int, int] = {}
        self.last_peer_sequence = 0
        self.last_peer_sent_at = 0
        self.last_peer_received_at = 0
        self.last_echo = 0
        self.rtt: int | None = None
        self.jitter = 0.0
        self.next_asset_id = 1
        self.task = asyncio.get_running_loop().create_task(self._main())

    # -- QUIC plumbing -------------------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        self._check_close()
        self.changed.set()

    def _handle_timer(self) -> None:
        super()._handle_timer()
        self._check_close()

    def _check_close(self) -> None:
        event = self._quic._close_event
        if event is None or self.terminated.is_set():
            return
        if self.record.quic_close is None:
            self.record.quic_close = (event.error_code, event.frame_type, event.reason_phrase)
            self.record.closed_by_client = not self.closed_by_us
        self.terminated.set()
        for reader in self.readers.values():
            reader.feed_eof()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.record.alpn = event.alpn_protocol
            idle = self._quic._remote_max_idle_timeout  # seconds, from transport parameters
            self.record.peer_idle_timeout_ms = round(idle * 1000) if idle else None
            self.record.peer_max_datagram_frame_size = self._quic._remote_max_datagram_frame_size
        elif isinstance(event, events.StreamDataReceived):
            reader = self.readers.get(event.stream_id)
            if reader is None:
                reader = self.readers[event.stream_id] = asyncio.StreamReader()
                self.record.stream_ids.append(event.stream_id)
                self.new_streams.put_nowait(event.stream_id)
            if event.data:
                reader.feed_data(event.data)
            if event.end_stream:
                self.fin_streams.add(event.stream_id)
                reader.feed_eof()
        elif isinstance(event, events.StreamReset):
            self.reset_streams.add(event.stream_id)
            self._note_deviation(
                SpecDeviation(
                    "3/4.6",
                    ErrorCode.PROTOCOL_VIOLATION,
                    f"client reset stream {event.stream_id} (code {event.error_code}) instead "
                    "of ending it on a frame boundary",
                )
            )
            target = self.readers.get(event.stream_id)
            if target is not None:
                target.feed_eof()
        elif isinstance(event, events.DatagramFrameReceived):
            self._note_deviation(
                SpecDeviation("1", ErrorCode.PROTOCOL_VIOLATION, "client sent a DATAGRAM frame")
            )
        elif isinstance(event, events.ConnectionTerminated):
            self._check_close()
        self.changed.set()

    def _note_deviation(self, deviation: SpecDeviation) -> None:
        self.record.deviations.append(deviation)

    def send(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        if self.terminated.is_set() or self._quic._close_event is not None:
            raise _Ended
        self._quic.send_stream_data(stream_id, data, end_stream=end)
        if end:
            self.finished_sids.add(stream_id)
        self.transmit()

    def send_message(self, stream_id: int, message: Message, *, end: bool = False) -> None:
        data = encode_server_frame(message)
        if self.behaviour.fragment_control and stream_id == self.control_sid:
            for i in range(len(data)):
                self.send(stream_id, data[i : i + 1])
            data = b""
        self.send(stream_id, data, end=end)

    def close_connection(self, code: int, reason: str) -> None:
        if self._quic._close_event is None:
            self.closed_by_us = True
        # a long reason phrase would not fit in one packet (aioquic cannot split it)
        phrase = reason.encode()[:200].decode(errors="ignore")
        self.close(error_code=code, reason_phrase=phrase)
        self._check_close()

    async def wait_acked(self, stream_ids: Sequence[int]) -> bool:
        """Wait (bounded) until everything sent on ``stream_ids``, FIN included, is acked."""
        streams = self._quic._streams

        def acked() -> bool:
            return all(sid not in streams or streams[sid].sender.is_finished for sid in stream_ids)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.behaviour.ack_wait):
                while not acked() and not self.terminated.is_set():
                    self.changed.clear()
                    await self.changed.wait()
        return acked()

    # -- framing (section 3) -------------------------------------------------------------

    async def read_frame(self, stream_id: int, limit: int) -> tuple[BodyType, Message] | None:
        """The next frame on a stream, or None on a clean FIN on a frame boundary."""
        frame = await self._read_frame(stream_id, limit)
        if frame is not None and self.record.server_close_sent:
            self.record.frames_after_server_close.append(frame[0].name)
        return frame

    async def _read_frame(self, stream_id: int, limit: int) -> tuple[BodyType, Message] | None:
        return await read_spec_frame(
            self.readers[stream_id],
            limit,
            f"stream {stream_id}",
            functools.partial(self._raise_if_abnormal_eof, stream_id),
        )

    def _raise_if_abnormal_eof(self, stream_id: int) -> None:
        if stream_id in self.fin_streams:
            return
        if stream_id in self.reset_streams:
            raise SpecDeviation(
                "3", ErrorCode.PROTOCOL_VIOLATION, f"stream {stream_id} was reset by the client"
            )
        raise _Ended

    # -- the connection's life -----------------------------------------------------------

    async def _main(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._end_watch())
                group.create_task(self._handshake_deadline())
                group.create_task(self._dispatch(group))
        except* _Ended:
            pass
        except* SpecDeviation as failures:
            first = failures.exceptions[0]
            assert isinstance(first, SpecDeviation)
            self._note_deviation(first)
            if self._quic._close_event is None:
                self.close_connection(first.code, first.message[:200])
        except* Exception as failures:  # a bug in this server: make it visible
            self.record.notes.append(f"spec server internal error: {failures.exceptions!r}")
            self._note_deviation(
                SpecDeviation("-", ErrorCode.INTERNAL_ERROR, f"server bug: {failures!r}")
            )
            if self._quic._close_event is None:
                self.close_connection(ErrorCode.INTERNAL_ERROR, "spec server bug")
        finally:
            if self._quic._close_event is None:
                self.close_connection(ErrorCode.INTERNAL_ERROR, "spec server stopped")
            self._check_close()
            self.record.done.set()

    async def _end_watch(self) -> None:
        await self.terminated.wait()
        raise _Ended

    async def _handshake_deadline(self) -> None:
        """Section 4.1: one deadline from the moment the connection is accepted."""
        remaining = self.behaviour.handshake_timeout - (time.monotonic() - self.accepted_at)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, remaining)):
                await self.established.wait()
                return
        self.record.notes.append("server handshake deadline passed")
        self.close_connection(ErrorCode.HANDSHAKE_TIMEOUT, "no verified SessionConfirm in time")
        raise _Ended

    async def _dispatch(self, group: asyncio.TaskGroup) -> None:
        while True:
            stream_id = await self.new_streams.get()
            group.create_task(self._stream(stream_id, group))

    async def _stream(self, stream_id: int, group: asyncio.TaskGroup) -> None:
        if stream_id % 4 != 0:
            what = "unidirectional" if stream_id & 2 else "server-initiated"
            raise SpecDeviation(
                "1/2", ErrorCode.PROTOCOL_VIOLATION, f"client used a {what} stream {stream_id}"
            )
        first = await self.read_frame(stream_id, CONTROL_LIMIT)
        if first is None:
            raise SpecDeviation(
                "2", ErrorCode.PROTOCOL_VIOLATION, f"stream {stream_id} ended before a frame"
            )
        kind, message = first
        if isinstance(message, SessionHello):
            if self.control_sid is not None or stream_id != 0:
                raise SpecDeviation(
                    "2", ErrorCode.PROTOCOL_VIOLATION, f"SessionHello on stream {stream_id}"
                )
            self.control_sid = stream_id
            await self._control(stream_id, message, group)
        elif isinstance(message, ChannelOpen):
            await self._channel(stream_id, message.channel)
        else:
            raise SpecDeviation(
                "2",
                ErrorCode.PROTOCOL_VIOLATION,
                f"stream {stream_id} starts with {kind.name}, not SessionHello/ChannelOpen",
            )

    # -- handshake (section 4.1) ---------------------------------------------------------

    def _validate_hello(self, hello: SessionHello) -> tuple[int, str] | None:
        b = self.behaviour
        if hello.protocol_version != PROTOCOL_VERSION:
            return ErrorCode.VERSION_MISMATCH, f"protocol version {hello.protocol_version}"
        if hello.schema_hash != b.schema_hash:
            return ErrorCode.SCHEMA_MISMATCH, f"schema hash {hello.schema_hash:#x}"
        if len(hello.nonce) != NONCE_SIZE:
            return ErrorCode.HANDSHAKE_FAILED, f"nonce of {len(hello.nonce)} bytes"
        if len(hello.public_key) != KEY_SIZE or not is_ed25519_point(hello.public_key):
            return ErrorCode.HANDSHAKE_FAILED, "public key is not an Ed25519 point"
        if len(hello.capabilities) > MAX_CAPABILITIES:
            return ErrorCode.MALFORMED_FRAME, f"{len(hello.capabilities)} capabilities"
        if len(hello.auth_token) > MAX_AUTH_TOKEN:
            return ErrorCode.MALFORMED_FRAME, f"auth token of {len(hello.auth_token)} bytes"
        role: int | None = b.role
        if b.authenticator is not None:
            role = b.authenticator(hello.auth_token, hello.public_key, self._peer_address())
        if role is None:
            return ErrorCode.AUTH_FAILED, "authenticator refused the token"
        self.role = role
        return None

    def _peer_address(self) -> tuple[str, int]:
        path = self._quic._network_paths[0]
        host, port = path.addr[0], path.addr[1]
        return str(host), int(port)

    async def _reject(self, stream_id: int, code: int, reason: str) -> None:
        reject = SessionReject(
            code, reason, self.behaviour.reject_protocol_version, self.behaviour.schema_hash
        )
        self.record.reject = reject
        self.send_message(stream_id, reject, end=True)
        await self.wait_acked([stream_id])
        self.close_connection(code, reason)
        raise _Ended

    def _transcript(self, hello: SessionHello, plan: AckPlan, *, signed: bool) -> bytes:
        fields: dict[str, Any] = {
            "protocol_version": plan.protocol_version,
            "schema_hash": plan.schema_hash,
            "client_nonce": hello.nonce,
            "client_public_key": hello.public_key,
            "client_capabilities": hello.capabilities,
            "auth_token": hello.auth_token,
            "server_nonce": plan.nonce,
            "server_public_key": plan.public_key,
            "session_id": plan.session_id,
            "role": plan.role,
            "negotiated_capabilities": plan.capabilities,
        }
        if signed:
            fields.update(plan.signed)
        return handshake_transcript(**fields)

    async def _control(self, sid: int, hello: SessionHello, group: asyncio.TaskGroup) -> None:
        b = self.behaviour
        self.record.hello = hello
        failure = self._validate_hello(hello)
        if failure is None and b.reject is not None:
            failure = b.reject
        if b.close_on_hello is not None:
            self.close_connection(*b.close_on_hello)
            raise _Ended
        if failure is not None:
            await self._reject(sid, *failure)
        if not b.answer_hello:
            await self.terminated.wait()
            raise _Ended
        negotiated = tuple(sorted(set(hello.capabilities) & set(b.capabilities)))
        plan = AckPlan(
            protocol_version=hello.protocol_version,
            schema_hash=hello.schema_hash,
            nonce=os.urandom(NONCE_SIZE),
            session_id=int.from_bytes(os.urandom(8), "big") or 1,
            role=self.role,
            capabilities=negotiated,
            public_key=raw_public_key(self.key),
            signing_key=self.key,
        )
        if b.ack_tweak is not None:
            plan = b.ack_tweak(plan)
        signature = plan.signing_key.sign(
            plan.context + hashlib.sha256(self._transcript(hello, plan, signed=True)).digest()
        )
        if plan.mutate_signature is not None:
            signature = plan.mutate_signature(signature)
        ack = SessionAcknowledge(
            plan.protocol_version,
            plan.schema_hash,
            plan.nonce,
            plan.session_id,
            plan.role,
            plan.capabilities,
            plan.public_key,
            signature,
        )
        self.record.acknowledge = ack
        self.negotiated = plan.capabilities
        frame = encode_server_frame(
            ack, explicit_empty=b.ack_explicit_empty, extra_field=b.ack_extra_field
        )
        if b.fragment_control:
            for i in range(len(frame)):
                self.send(sid, frame[i : i + 1])
        else:
            self.send(sid, frame)

        answer = await self.read_frame(sid, CONTROL_LIMIT)
        if answer is None:
            raise SpecDeviation(
                "4.1", ErrorCode.PROTOCOL_VIOLATION, "control stream ended before SessionConfirm"
            )
        kind, confirm = answer
        if not isinstance(confirm, SessionConfirm):
            raise SpecDeviation(
                "4.1",
                ErrorCode.PROTOCOL_VIOLATION,
                f"{kind.name} on the control stream before SessionConfirm",
            )
        transcript = self._transcript(hello, plan, signed=False)
        try:
            Ed25519PublicKey.from_public_bytes(hello.public_key).verify(
                confirm.signature, CLIENT_SIGNATURE_CONTEXT + hashlib.sha256(transcript).digest()
            )
        except (InvalidSignature, ValueError):
            raise SpecDeviation(
                "4.1", ErrorCode.HANDSHAKE_FAILED, "SessionConfirm signature does not verify"
            ) from None
        self.record.confirm_verified = True
        self.established.set()
        group.create_task(self._heartbeat_sender(sid))
        group.create_task(self._when_ready())
        await self._control_loop(sid)

    async def _when_ready(self) -> None:
        await self.ready.wait()
        if self.behaviour.on_established is not None:
            await self.behaviour.on_established(self)

    # -- heartbeats (section 4.4) --------------------------------------------------------

    def send_heartbeat(self, sequence: int | None = None) -> Heartbeat:
        assert self.control_sid is not None
        now = now_us()
        if sequence is None:
            sequence = self.next_sequence
            self.next_sequence += 1
        heartbeat = build_heartbeat(
            sequence,
            now,
            (self.last_peer_sequence, self.last_peer_sent_at, self.last_peer_received_at),
            self.rtt,
            self.jitter,
        )
        self.sent_at[sequence] = now
        self.send_message(self.control_sid, heartbeat)
        self.record.heartbeats_sent.append(heartbeat)
        return heartbeat

    async def _heartbeat_sender(self, sid: int) -> None:
        limit = self.behaviour.heartbeat_limit
        while not self.stop_sending.is_set():
            if limit is not None and len(self.record.heartbeats_sent) >= limit:
                return
            self.send_heartbeat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_sending.wait(), self.behaviour.heartbeat_interval)

    def _on_heartbeat(self, hb: Heartbeat) -> None:
        def deviation(what: str) -> SpecDeviation:
            return SpecDeviation("4.4", ErrorCode.PROTOCOL_VIOLATION, f"client Heartbeat: {what}")

        now = now_us()
        if hb.sequence <= self.last_peer_sequence:
            raise deviation(f"sequence {hb.sequence} does not increase ({self.last_peer_sequence})")
        if hb.sequence != self.last_peer_sequence + 1:
            self._note_deviation(
                deviation(f"sequence {hb.sequence} is not previous+1 ('increases by 1')")
            )
        if hb.echo_sequence == 0:
            if hb.echo_sent_at_us or hb.echo_delay_us:
                self._note_deviation(deviation("echo_sequence 0 with non-zero echo fields"))
        else:
            sent = self.sent_at.get(hb.echo_sequence)
            if sent is None:
                self._note_deviation(deviation(f"echo_sequence {hb.echo_sequence} never sent"))
            elif hb.echo_sent_at_us != sent:
                self._note_deviation(
                    deviation(f"echo_sent_at_us {hb.echo_sent_at_us} != our sent_at_us {sent}")
                )
            if hb.echo_sequence < self.last_echo:
                self._note_deviation(deviation("echo_sequence went backwards (not the latest)"))
            self.last_echo = hb.echo_sequence
            raw = now - hb.echo_sent_at_us - hb.echo_delay_us
            if raw < 0:
                self.record.negative_rtt_samples += 1
            rtt = max(0, raw)
            if self.rtt is not None:
                self.jitter += (abs(rtt - self.rtt) - self.jitter) / 16
            self.rtt = rtt
            self.record.rtt_us.append(rtt)
        self.last_peer_sequence = hb.sequence
        self.last_peer_sent_at = hb.sent_at_us
        self.last_peer_received_at = now
        self.record.heartbeats_received.append(hb)
        self.heartbeat_seen.set()

    async def _control_loop(self, sid: int) -> None:
        timeout = self.behaviour.heartbeat_timeout
        while True:
            try:
                async with asyncio.timeout(timeout):
                    frame = await self.read_frame(sid, CONTROL_LIMIT)
            except TimeoutError:
                if self.record.client_close is not None:
                    continue  # the client is closing; _close_watch bounds this
                raise SpecDeviation(
                    "4.4", ErrorCode.HEARTBEAT_TIMEOUT, f"no client Heartbeat within {timeout} s"
                ) from None
            if frame is None:
                self.record.fins.append("control")
                if self.record.client_close is None:
                    raise SpecDeviation(
                        "4.6",
                        ErrorCode.PROTOCOL_VIOLATION,
                        "client ended the control stream without SessionClose",
                    )
                await self.terminated.wait()
                raise _Ended
            kind, message = frame
            if isinstance(message, Heartbeat):
                if self.record.client_close is not None:
                    self.record.notes.append("client Heartbeat after its SessionClose")
                self._on_heartbeat(message)
            elif isinstance(message, SessionClose):
                if self.record.client_close is not None:
                    raise SpecDeviation("4.6", ErrorCode.PROTOCOL_VIOLATION, "second SessionClose")
                self.record.client_close = message
                self.stop_sending.set()  # "The receiver of a SessionClose stops sending"
                asyncio.get_running_loop().create_task(self._close_watch(message))
            else:
                raise SpecDeviation(
                    "2/4",
                    ErrorCode.PROTOCOL_VIOLATION,
                    f"{kind.name} is not allowed client->server on the control stream now",
                )

    async def _close_watch(self, close: SessionClose) -> None:
        """Section 4.6: the client closes QUIC with the same code after its SessionClose."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.behaviour.close_grace):
                await self.terminated.wait()
                return
        self._note_deviation(
            SpecDeviation(
                "4.6",
                ErrorCode.PROTOCOL_VIOLATION,
                f"client sent SessionClose but did not close QUIC within "
                f"{self.behaviour.close_grace} s",
            )
        )
        self.close_connection(close.code, close.reason)

    # -- replication and assets channels (sections 2, 4.5, 6) ----------------------------

    async def _channel(self, sid: int, channel: int) -> None:
        if self.control_sid is None:
            raise SpecDeviation("2", ErrorCode.PROTOCOL_VIOLATION, "ChannelOpen before the hello")
        if channel not in (ChannelIndex.REPLICATION, ChannelIndex.ASSETS):
            raise SpecDeviation("4.5", ErrorCode.PROTOCOL_VIOLATION, f"ChannelOpen({channel})")
        if channel in self.channel_sids:
            raise SpecDeviation(
                "2", ErrorCode.PROTOCOL_VIOLATION, f"second stream for channel {channel}"
            )
        self.channel_sids[channel] = sid
        self.record.channels_opened.append(channel)
        # Section 4.1: hold the stream unread until SessionConfirm is verified.
        await self.established.wait()
        if len(self.channel_sids) == 2:
            self.ready.set()
        if channel == ChannelIndex.REPLICATION:
            await self._replication(sid)
        else:
            await self._assets(sid)

    def _replication_payload(self, message: ReplicationMessage) -> bytes:
        if message.flags & ~FLAG_COMPRESSED:
            self._note_deviation(
                SpecDeviation(
                    "4.5",
                    ErrorCode.PROTOCOL_VIOLATION,
                    f"reserved flag bits {message.flags:#x} set; 'senders set them to 0'",
                )
            )
        if not message.flags & FLAG_COMPRESSED:
            if message.uncompressed_size:
                self._note_deviation(
                    SpecDeviation(
                        "4.5",
                        ErrorCode.PROTOCOL_VIOLATION,
                        "uncompressed_size set with bit 0 clear; 'senders set it to 0'",
                    )
                )
            return message.payload
        if CAP_ZSTD not in self.negotiated:
            raise SpecDeviation(
                "4.5", ErrorCode.PROTOCOL_VIOLATION, "compressed payload without CAP_ZSTD"
            )
        return decompress_replication(message)

    def replication_frame(self, tick: int, payload: bytes) -> ReplicationMessage:
        if self.behaviour.compress_echo and CAP_ZSTD in self.negotiated and payload:
            compressed = zstandard.ZstdCompressor().compress(payload)
            return ReplicationMessage(tick, FLAG_COMPRESSED, compressed, len(payload))
        return ReplicationMessage(tick, 0, payload, 0)

    async def _replication(self, sid: int) -> None:
        while True:
            frame = await self.read_frame(sid, REPLICATION_LIMIT)
            if frame is None:
                self.record.fins.append("replication")
                return
            kind, message = frame
            if not isinstance(message, ReplicationMessage):
                raise SpecDeviation(
                    "2/4", ErrorCode.PROTOCOL_VIOLATION, f"{kind.name} on the replication channel"
                )
            if not self.role & ROLE_REPLICATE:
                raise SpecDeviation("6", ErrorCode.PERMISSION_DENIED, "role lacks REPLICATE")
            payload = self._replication_payload(message)
            self.record.replication_frames.append(message)
            self.record.replication_payloads.append((message.tick, payload))
            if self.behaviour.echo and not self.stop_sending.is_set():
                self.send_message(sid, self.replication_frame(message.tick, payload))

    async def _assets(self, sid: int) -> None:
        partial: dict[int, tuple[str, int, bytearray]] = {}
        while True:
            frame = await self.read_frame(sid, ASSETS_LIMIT)
            if frame is None:
                self.record.fins.append("assets")
                if partial:
                    raise SpecDeviation("4.5", ErrorCode.MALFORMED_FRAME, "FIN mid-asset")
                return
            kind, chunk = frame
            if not isinstance(chunk, AssetChunk):
                raise SpecDeviation(
                    "2/4", ErrorCode.PROTOCOL_VIOLATION, f"{kind.name} on the assets channel"
                )
            if not self.role & ROLE_UPLOAD_ASSETS:
                raise SpecDeviation("6", ErrorCode.PERMISSION_DENIED, "role lacks UPLOAD_ASSETS")

            complete = take_asset_chunk(partial, chunk)
            if complete is not None:
                name, data = complete
                self.record.assets_received.append((chunk.asset_id, name, data))
                if self.behaviour.echo and not self.stop_sending.is_set():
                    self.send_asset(sid, name, data)

    def send_asset(self, sid: int, name: str, data: bytes) -> None:
        asset_id = self.next_asset_id
        self.next_asset_id += 1
        size = self.behaviour.asset_chunk_size
        for offset in range(0, len(data), size) if data else range(1):
            self.send_message(
                sid,
                AssetChunk(
                    asset_id,
                    offset,
                    len(data),
                    name if offset == 0 else None,
                    data[offset : offset + size],
                ),
            )
        self.record.assets_sent += 1

    # -- server-initiated close (section 4.6) --------------------------------------------

    async def close_session(self, code: int, reason: str, *, quic_close: bool = True) -> None:
        """SessionClose on control, FIN on every stream, then the QUIC close (same code)."""
        assert self.control_sid is not None
        self.stop_sending.set()
        self.send_message(self.control_sid, SessionClose(code, reason), end=True)
        self.record.server_close_sent = True
        for sid in self.channel_sids.values():
            if sid not in self.finished_sids:
                self.send(sid, b"", end=True)
        await self.wait_acked([self.control_sid, *self.channel_sids.values()])
        if quic_close:
            self.close_connection(code, reason)


# --------------------------------------------------------------------------------------------
# The server, in a worker thread with its own asyncio loop
# --------------------------------------------------------------------------------------------


class SpecServer:
    def __init__(
        self, certificate_pem: bytes, private_key_pem: bytes, behaviour: ServerBehaviour
    ) -> None:
        self.certificate_pem = certificate_pem
        self.private_key_pem = private_key_pem
        self.behaviour = behaviour
        self.signing_key = Ed25519PrivateKey.generate()
        self.records: list[ConnectionRecord] = []
        self.port = 0
        self._records_changed = threading.Condition()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def public_key(self) -> bytes:
        return raw_public_key(self.behaviour.signing_key or self.signing_key)

    def start(self, timeout: float = 5.0) -> int:
        """Start the server thread; return the bound UDP port (blocking, bounded)."""
        self._thread = threading.Thread(target=self._run, name="spec-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("spec server did not start in time")
        if self._error is not None:
            raise RuntimeError("spec server failed to start") from self._error
        return self.port

    def stop(self, timeout: float = 5.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("spec server thread did not stop in time")

    def wait_record(self, index: int = 0, timeout: float = 5.0) -> ConnectionRecord:
        """Wait (blocking, bounded) until connection ``index`` has ended; return its record."""
        deadline = time.monotonic() + timeout
        with self._records_changed:
            if not self._records_changed.wait_for(lambda: len(self.records) > index, timeout):
                raise TimeoutError(f"no connection #{index} reached the spec server")
            record = self.records[index]
        if not record.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"connection #{index} did not end within {timeout} s")
        return record

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported through start()/stop()
            self._error = exc
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        config = QuicConfiguration(
            is_client=False, alpn_protocols=[self.behaviour.alpn], idle_timeout=30.0
        )
        config.certificate = x509.load_pem_x509_certificate(self.certificate_pem)
        config.private_key = load_pem_private_key(self.private_key_pem, password=None)

        def create_protocol(quic: QuicConnection, stream_handler: Any = None) -> ServerConnection:
            connection = ServerConnection(quic, stream_handler, server=self)
            with self._records_changed:
                self.records.append(connection.record)
                self._records_changed.notify_all()
            return connection

        server: QuicServer = await serve(
            "127.0.0.1", 0, configuration=config, create_protocol=create_protocol
        )
        transport = server._transport
        assert transport is not None
        self.port = int(transport.get_extra_info("sockname")[1])
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            try:
                server.close()
            finally:
                transport.close()
            # transport.close() completes in a callback scheduled on the loop: yield once so
            # it runs before asyncio.run() closes the loop
            await asyncio.sleep(0)


def corrupt_first_byte(signature: bytes) -> bytes:
    return bytes([signature[0] ^ 0x01]) + signature[1:]


def replace_plan(**changes: Any) -> Callable[[AckPlan], AckPlan]:
    def tweak(plan: AckPlan) -> AckPlan:
        return dataclasses.replace(plan, **changes)

    return tweak


__all__ = [
    "ROLE_ADMIN",
    "ROLE_REPLICATE",
    "ROLE_UPLOAD_ASSETS",
    "AckPlan",
    "ConnectionRecord",
    "ServerBehaviour",
    "ServerConnection",
    "SpecServer",
    "corrupt_first_byte",
    "encode_server_frame",
    "now_us",
    "raw_frame",
    "replace_plan",
]
