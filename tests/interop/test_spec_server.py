"""theta's client against an independent server built from wire-v1.md (``spec_server``).

The client side uses theta's public API only (``theta.connect``, ``ClientConfig``,
``generate_self_signed_certificate`` and the documented errors); the server side imports
nothing from theta and runs on its own asyncio loop in a worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import theta

from . import spec_peer
from .spec_peer import (
    ASSETS_LIMIT,
    CAP_ZSTD,
    CLIENT_SIGNATURE_CONTEXT,
    CONTROL_LIMIT,
    FLAG_COMPRESSED,
    MAX_ASSET_SIZE,
    REPLICATION_LIMIT,
    AssetChunk,
    ChannelOpen,
    ErrorCode,
    Heartbeat,
    ReplicationMessage,
    SessionAcknowledge,
    SessionClose,
    SessionReject,
)
from .spec_server import (
    ROLE_REPLICATE,
    ROLE_UPLOAD_ASSETS,
    AckPlan,
    ConnectionRecord,
    ServerBehaviour,
    ServerConnection,
    SpecServer,
    corrupt_first_byte,
    encode_server_frame,
    now_us,
    raw_frame,
    replace_plan,
)

MANIFEST = {"Velocity": "dx:f32,dy:f32,dz:f32", "Position": "x:f32,y:f32,z:f32"}
SCHEMA_HASH = 0x431E408540BE313B
CERT = theta.generate_self_signed_certificate()
STEP = 5.0  # bound on any single wait


def behaviour(**changes: Any) -> ServerBehaviour:
    return ServerBehaviour(manifest=MANIFEST, **changes)


def client_config(**changes: Any) -> theta.ClientConfig:
    settings: dict[str, Any] = {
        "ca_certs": CERT.certificate_pem,
        "server_name": "localhost",
        "manifest": MANIFEST,
    }
    return theta.ClientConfig(**(settings | changes))


@asynccontextmanager
async def spec_server(server_behaviour: ServerBehaviour) -> AsyncIterator[SpecServer]:
    server = SpecServer(CERT.certificate_pem, CERT.private_key_pem, server_behaviour)
    await trio.to_thread.run_sync(server.start, STEP)
    try:
        yield server
    finally:
        await trio.to_thread.run_sync(server.stop, STEP)


async def record_of(server: SpecServer, index: int = 0) -> ConnectionRecord:
    return await trio.to_thread.run_sync(server.wait_record, index, STEP)


async def drain(session: theta.Session) -> None:
    """Read both channels like a well-behaved application until the session ends."""

    async def replication() -> None:
        try:
            async for _ in session.replication:
                pass
        except theta.SessionClosed:
            pass

    async def assets() -> None:
        try:
            async for _ in session.assets:
                pass
        except theta.SessionClosed:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(replication)
        nursery.start_soon(assets)


async def session_end(
    server_behaviour: ServerBehaviour, config: theta.ClientConfig
) -> tuple[theta.SessionClosed, ConnectionRecord]:
    """Connect, keep reading, and return how theta's session ended plus the server's view."""
    async with spec_server(server_behaviour) as server:
        with trio.fail_after(STEP):
            async with (
                theta.connect("127.0.0.1", server.port, config) as session,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(drain, session)
                closed = await session.wait_closed()
        record = await record_of(server)
    return closed, record


def only_one_connection(server: SpecServer) -> None:
    assert len(server.records) == 1


# --------------------------------------------------------------------------------------------
# The server's own encoders (section 4): the server-only tables decode back with the
# independent bounds-checked reader.
# --------------------------------------------------------------------------------------------


def test_server_tables_round_trip() -> None:
    ack = SessionAcknowledge(
        1, SCHEMA_HASH, bytes(range(24)), 0x0123456789ABCDEF, 7, (2, CAP_ZSTD), bytes(32), b"s" * 64
    )
    reject = SessionReject(ErrorCode.SCHEMA_MISMATCH, "schema differs", 1, SCHEMA_HASH)
    for message in (ack, reject, SessionReject(ErrorCode.AUTH_FAILED, "", 1, 0)):
        frame = encode_server_frame(message)
        (length,) = struct.unpack_from(">I", frame)
        assert length == len(frame) - 4
        assert spec_peer.decode_payload(frame[4:])[1] == message


# --------------------------------------------------------------------------------------------
# Interop: handshake, replication (with and without zstd), assets, heartbeats, close
# --------------------------------------------------------------------------------------------


PAYLOADS = [
    (1, b"position=1,2,3"),
    (2, b""),
    (3, b"compressible " * 4000),
    (4, os.urandom(3000)),
    (2**64 - 1, bytes(range(256))),
]


@pytest.mark.parametrize("server_caps", [(2, CAP_ZSTD, 9), (2, 9)], ids=["zstd", "no-zstd"])
async def test_handshake_and_replication_echo(server_caps: tuple[int, ...]) -> None:
    async with spec_server(behaviour(capabilities=server_caps)) as server:
        config = client_config(capabilities=(5, 2, CAP_ZSTD))
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, config) as session:
                for tick, payload in PAYLOADS:
                    await session.replication.send(payload, tick=tick)
                echoed = [await session.replication.receive() for _ in PAYLOADS]
                negotiated = session.negotiated_capabilities
                info = (
                    session.session_id,
                    session.role,
                    session.peer_public_key,
                    session.public_key,
                    session.protocol_version,
                    session.schema_hash,
                )
        record = await record_of(server)
        only_one_connection(server)
    assert record.deviation_text() == []
    # section 1/2: ALPN, three client-initiated bidirectional streams 0, 4, 8
    assert record.alpn == "theta/1"
    assert record.stream_ids == [0, 4, 8]
    assert record.peer_idle_timeout_ms == 30_000  # section 1 default max_idle_timeout
    assert sorted(record.channels_opened) == [1, 2]
    # section 4.1: what theta sent and what it took from the acknowledge
    hello, ack = record.hello, record.acknowledge
    assert hello is not None
    assert ack is not None
    assert hello.protocol_version == 1
    assert hello.schema_hash == SCHEMA_HASH
    assert len(hello.nonce) == 24
    assert hello.capabilities == (5, 2, CAP_ZSTD)
    assert hello.auth_token == b""
    assert record.confirm_verified
    expected = (2, CAP_ZSTD) if CAP_ZSTD in server_caps else (2,)
    assert ack.capabilities == expected
    assert tuple(negotiated) == expected
    assert info == (ack.session_id, ack.role, server.public_key, hello.public_key, 1, SCHEMA_HASH)
    # section 4.5: echo byte-exact in both directions, compression only when negotiated
    assert record.replication_payloads == PAYLOADS
    assert [(m.tick, m.payload) for m in echoed] == PAYLOADS
    compressed = [m.flags & FLAG_COMPRESSED for m in record.replication_frames]
    if CAP_ZSTD in server_caps:
        # README: "zstd compression of replication payloads is used when both sides offer it"
        assert compressed[2] == FLAG_COMPRESSED
    else:
        assert not any(compressed)
    for frame in record.replication_frames:
        if not frame.flags & FLAG_COMPRESSED:
            assert frame.uncompressed_size == 0


async def test_asset_round_trip() -> None:
    big = os.urandom(200_000)
    assets = [("level/ünïcode.bin", big), ("empty", b""), ("small", b"abc")]
    async with spec_server(behaviour()) as server:
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, client_config()) as session:
                for name, data in assets:
                    await session.assets.send(name, data)
                received = [await session.assets.receive() for _ in assets]
        record = await record_of(server)
    assert record.deviation_text() == []
    assert [(name, data) for _, name, data in record.assets_received] == assets
    assert [(a.name, a.data) for a in received] == assets


class _Stop(Exception):
    pass


async def test_an_asset_left_half_sent_gets_no_end_of_stream() -> None:
    """Spec 4.5: a FIN inside an asset is MALFORMED_FRAME. After a send stopped part-way,
    finish() refuses and a graceful close leaves the stream to the QUIC close; an asset
    whose send failed before its first chunk leaves the channel free to end."""

    def stop_after_a_chunk(sent: int, total: int) -> None:
        raise _Stop

    async with spec_server(behaviour(echo=False)) as server:
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, client_config()) as session:
                with pytest.raises(_Stop):
                    await session.assets.send("big", bytes(200_000), progress=stop_after_a_chunk)
                with pytest.raises(trio.BrokenResourceError, match="inside an asset: 1 not"):
                    await session.assets.finish()
                assert session.closed is None  # the application's mistake, not the session's
                await session.close()
                with pytest.raises(theta.SessionClosed):
                    await session.assets.finish()
        record = await record_of(server)
    assert record.deviation_text() == []


async def test_finish_waiting_behind_the_first_chunk_of_an_asset_sends_no_fin() -> None:
    async with spec_server(behaviour(echo=False)) as server:
        with trio.fail_after(STEP):
            config = client_config(asset_chunk_size=1000)
            async with theta.connect("127.0.0.1", server.port, config) as session:
                lock = session.assets._framed._send_lock
                await lock.acquire()  # as if another send of the channel were under way
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(session.assets.send, "a", bytes(3000))
                    await trio.testing.wait_all_tasks_blocked()  # its first chunk waits
                    with pytest.raises(trio.BrokenResourceError, match="inside an asset"):
                        await session.assets.finish()
                    lock.release()
                await session.assets.finish()  # the asset is complete: now it may end
        record = await record_of(server)
    assert record.deviation_text() == []
    assert [(name, len(data)) for _, name, data in record.assets_received] == [("a", 3000)]


async def test_an_asset_refused_before_its_first_chunk_leaves_the_channel_free() -> None:
    async def too_long() -> AsyncGenerator[bytes]:
        yield b"four"

    async with spec_server(behaviour(echo=False)) as server:
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, client_config()) as session:
                async with contextlib.aclosing(too_long()) as pieces:
                    with pytest.raises(ValueError, match="exceed"):
                        await session.assets.send("short", pieces, total_size=3)
                await session.assets.send("whole", b"abc")
                await session.assets.finish()
        record = await record_of(server)
    assert record.deviation_text() == []
    assert [(name, data) for _, name, data in record.assets_received] == [("whole", b"abc")]


async def test_heartbeats_both_ways_and_rtt() -> None:
    async with spec_server(behaviour(heartbeat_interval=0.05)) as server:
        config = client_config(heartbeat_interval=0.05)
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, config) as session:
                async for snapshot in session.watch_diagnostics(0.05):
                    if (
                        snapshot.rtt_latest is not None
                        and snapshot.peer_rtt is not None
                        and snapshot.heartbeats_received >= 3
                        and snapshot.heartbeats_sent >= 3
                    ):
                        break
        record = await record_of(server)
    assert record.deviation_text() == []
    assert snapshot.rtt_latest is not None
    assert snapshot.rtt_latest >= 0
    received = record.heartbeats_received
    assert [hb.sequence for hb in received] == list(range(1, len(received) + 1))
    assert received[0].echo_sequence in (0, 1)
    assert record.rtt_us, "theta never echoed a server heartbeat"
    assert any(hb.rtt_us > 0 for hb in received), "theta never reported its RTT estimate"
    # one clock on both ends: echo_delay_us never exceeds the real hold time
    assert record.negative_rtt_samples == 0


@pytest.mark.parametrize(
    ("code", "reason"),
    [(None, ""), (ErrorCode.GOING_AWAY, "client leaving"), (ErrorCode.NO_ERROR, "done ✓")],
    ids=["leave-block", "going-away", "no-error-with-reason"],
)
async def test_graceful_close_by_client(code: int | None, reason: str) -> None:
    async with spec_server(behaviour()) as server:
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, client_config()) as session:
                await session.replication.send(b"last words", tick=1)
                if code is not None:
                    await session.close(code, reason)
            record = await record_of(server)
    expected = ErrorCode.NO_ERROR if code is None else code
    assert record.deviation_text() == []
    assert record.client_close is not None
    assert (record.client_close.code, record.client_close.reason) == (expected, reason)
    # section 4.6: SessionClose, FIN on every stream, QUIC application close with the code
    assert sorted(record.fins) == ["assets", "control", "replication"]
    assert record.quic_close is not None
    assert record.quic_close[:2] == (expected, None)
    assert record.closed_by_client
    assert record.replication_payloads == [(1, b"last words")]


@pytest.mark.parametrize(
    "encoding",
    [{"ack_explicit_empty": True, "capabilities": ()}, {"ack_extra_field": 0xDEADBEEF}],
    ids=["empty-vectors-present", "unknown-extra-field"],
)
async def test_acknowledge_encoding_variants(encoding: dict[str, Any]) -> None:
    """Section 4: an empty vector may be present or absent; a reader skips unknown fields."""
    async with spec_server(behaviour(**encoding)) as server:
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, client_config()) as session:
                negotiated = tuple(session.negotiated_capabilities)
        record = await record_of(server)
    assert record.acknowledge is not None
    assert negotiated == record.acknowledge.capabilities
    assert record.deviation_text() == []
    assert record.client_close == SessionClose(ErrorCode.NO_ERROR, "")


async def test_fragmented_control_frames() -> None:
    """Section 3: frames are reassembled from any fragmentation (1 byte per STREAM frame)."""
    server_behaviour = behaviour(fragment_control=True, heartbeat_interval=0.05)
    async with spec_server(server_behaviour) as server:
        config = client_config(heartbeat_interval=0.05)
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, config) as session:
                async for snapshot in session.watch_diagnostics(0.05):
                    if snapshot.heartbeats_received >= 2:
                        break
                await session.close(ErrorCode.GOING_AWAY, "fragments ok")
        record = await record_of(server)
    assert record.deviation_text() == []
    assert record.client_close == SessionClose(ErrorCode.GOING_AWAY, "fragments ok")


@pytest.mark.parametrize("case", ["untrusted-certificate", "wrong-server-name", "wrong-alpn"])
async def test_transport_refused(case: str) -> None:
    """Section 1: the certificate is verified; the ALPN is theta/1."""
    cert = theta.generate_self_signed_certificate() if case == "untrusted-certificate" else CERT
    server_behaviour = behaviour(alpn="theta/2" if case == "wrong-alpn" else "theta/1")
    server = SpecServer(cert.certificate_pem, cert.private_key_pem, server_behaviour)
    await trio.to_thread.run_sync(server.start, STEP)
    try:
        name = "example.com" if case == "wrong-server-name" else "localhost"
        config = client_config(server_name=name)
        with trio.fail_after(STEP), pytest.raises(theta.TransportError):
            async with theta.connect("127.0.0.1", server.port, config):
                pytest.fail("connect() succeeded over a refused transport")
        record = await record_of(server)
    finally:
        await trio.to_thread.run_sync(server.stop, STEP)
    assert record.hello is None


# --------------------------------------------------------------------------------------------
# Section 4.1: SessionReject, the server's own checks, and acknowledges theta must refuse
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [c for c in ErrorCode if c != ErrorCode.NO_ERROR])
async def test_session_reject_each_code(code: ErrorCode) -> None:
    reason = "" if code == ErrorCode.SERVER_BUSY else f"rejected with {code.name}"
    async with spec_server(behaviour(reject=(code, reason), reject_protocol_version=3)) as server:
        with trio.fail_after(STEP), pytest.raises(theta.HandshakeRejected) as info:
            async with theta.connect("127.0.0.1", server.port, client_config()):
                pytest.fail("connect() yielded a session after SessionReject")
        record = await record_of(server)
    error = info.value
    assert int(error.code) == code
    assert error.reason == reason
    assert error.server_protocol_version == 3
    assert error.server_schema_hash == SCHEMA_HASH
    assert record.quic_close is not None
    # the server closes after the reject has been acknowledged; theta may close first (with
    # the same code), which the spec allows
    assert record.quic_close[:2] == (code, None)
    assert record.deviation_text() == []


async def test_quic_close_without_reject() -> None:
    """README: HandshakeRejected without version/hash when only the QUIC close arrived."""
    server_behaviour = behaviour(close_on_hello=(ErrorCode.SERVER_BUSY, "too many sessions"))
    async with spec_server(server_behaviour) as server:
        with trio.fail_after(STEP), pytest.raises(theta.HandshakeRejected) as info:
            async with theta.connect("127.0.0.1", server.port, client_config()):
                pytest.fail("connect() yielded a session after the server closed")
        await record_of(server)
    assert int(info.value.code) == ErrorCode.SERVER_BUSY
    assert info.value.server_protocol_version is None
    assert info.value.server_schema_hash is None


async def test_schema_mismatch_detected_by_server() -> None:
    server_manifest = {"Position": "x:f64"}
    async with spec_server(ServerBehaviour(manifest=server_manifest)) as server:
        with trio.fail_after(STEP), pytest.raises(theta.HandshakeRejected) as info:
            async with theta.connect("127.0.0.1", server.port, client_config()):
                pytest.fail("connect() yielded a session after SessionReject")
        record = await record_of(server)
    assert int(info.value.code) == ErrorCode.SCHEMA_MISMATCH
    assert info.value.server_schema_hash == spec_peer.schema_hash(server_manifest)
    assert info.value.server_protocol_version == 1
    assert record.hello is not None
    assert record.hello.schema_hash == SCHEMA_HASH


async def test_authenticator_sees_token_and_key_and_assigns_role() -> None:
    seen: list[tuple[bytes, bytes, tuple[str, int]]] = []

    def authenticate(token: bytes, key: bytes, address: tuple[str, int]) -> int | None:
        seen.append((token, key, address))
        return (1 << 16) | ROLE_REPLICATE | ROLE_UPLOAD_ASSETS if token == b"good" else None

    async with spec_server(behaviour(authenticator=authenticate)) as server:
        with trio.fail_after(STEP):
            config = client_config(auth_token=b"good")
            async with theta.connect("127.0.0.1", server.port, config) as session:
                role, key = session.role, session.public_key
            with pytest.raises(theta.HandshakeRejected) as info:
                async with theta.connect("127.0.0.1", server.port, client_config(auth_token=b"x")):
                    pytest.fail("connect() yielded a session after SessionReject")
        first, second = await record_of(server, 0), await record_of(server, 1)
    assert role == (1 << 16) | 3
    # section 4.1: a fresh nonce (and, per the README, a fresh key) for every hello
    assert first.hello is not None
    assert second.hello is not None
    assert first.hello.nonce != second.hello.nonce
    assert first.hello.public_key != second.hello.public_key
    assert second.hello.auth_token == b"x"
    assert seen[0][:2] == (b"good", key)
    assert seen[0][2][0] == "127.0.0.1"
    assert int(info.value.code) == ErrorCode.AUTH_FAILED
    assert first.deviation_text() == []
    assert second.quic_close is not None
    assert second.quic_close[0] == ErrorCode.AUTH_FAILED


OTHER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x03" * 32)


def _tweak(**changes: Any) -> Callable[[AckPlan], AckPlan]:
    return replace_plan(**changes)


def _signed(**fields: Any) -> Callable[[AckPlan], AckPlan]:
    return replace_plan(signed=fields)


def _derived(fn: Callable[[AckPlan], dict[str, Any]]) -> Callable[[AckPlan], AckPlan]:
    return lambda plan: dataclasses.replace(plan, **fn(plan))


BAD_ACKS: dict[str, Callable[[AckPlan], AckPlan]] = {
    "signature-bit-flip": _tweak(mutate_signature=corrupt_first_byte),
    "signature-63-bytes": _tweak(mutate_signature=lambda s: s[:63]),
    "signature-absent": _tweak(mutate_signature=lambda s: b""),
    "signed-with-client-context": _tweak(context=CLIENT_SIGNATURE_CONTEXT),
    "signed-by-another-key": _tweak(signing_key=OTHER_KEY),
    "public-key-31-bytes": _derived(lambda p: {"public_key": p.public_key[:31]}),
    "public-key-not-a-point": _tweak(public_key=spec_peer.first_non_point()),
    "server-nonce-23-bytes": _derived(lambda p: {"nonce": p.nonce[:23]}),
    "server-nonce-25-bytes": _derived(lambda p: {"nonce": p.nonce + b"\x00"}),
    "server-nonce-not-the-signed-one": _signed(server_nonce=bytes(24)),
    "client-nonce-replayed": _signed(client_nonce=bytes(range(24))),
    "client-key-not-the-hello-one": _signed(client_public_key=bytes(32)),
    "client-capabilities-reordered": _signed(client_capabilities=(CAP_ZSTD, 2, 5)),
    "auth-token-not-signed": _signed(auth_token=b""),
    "session-id-not-the-signed-one": _signed(session_id=42),
    "role-not-the-signed-one": _signed(role=0xFFFF),
    "negotiated-not-the-signed-one": _signed(negotiated_capabilities=(2,)),
    "protocol-version-2": _tweak(protocol_version=2),
    "schema-hash-not-echoed": _derived(lambda p: {"schema_hash": p.schema_hash ^ 1}),
    "capabilities-not-a-subset": _tweak(capabilities=(2, 7, CAP_ZSTD)),
    "capability-never-requested": _tweak(capabilities=(0x80000002,)),
}


@pytest.mark.parametrize("name", list(BAD_ACKS))
async def test_bad_acknowledge_refused(name: str) -> None:
    server_behaviour = behaviour(ack_tweak=BAD_ACKS[name], capabilities=(2, CAP_ZSTD))
    async with spec_server(server_behaviour) as server:
        config = client_config(capabilities=(5, 2, CAP_ZSTD), auth_token=b"tok")
        with trio.fail_after(STEP), pytest.raises(theta.HandshakeFailed):
            async with theta.connect("127.0.0.1", server.port, config):
                pytest.fail("connect() accepted a bad SessionAcknowledge")
        record = await record_of(server)
    # section 4.1: "any failure closes with HANDSHAKE_FAILED"
    assert record.quic_close is not None
    assert record.quic_close[:2] == (ErrorCode.HANDSHAKE_FAILED, None)
    assert record.closed_by_client
    assert not record.confirm_verified


async def test_server_never_answers_hello() -> None:
    async with spec_server(behaviour(answer_hello=False)) as server:
        started = trio.current_time()
        with trio.fail_after(STEP), pytest.raises(theta.HandshakeTimeout) as info:
            async with theta.connect("127.0.0.1", server.port, client_config(handshake_timeout=1)):
                pytest.fail("connect() yielded a session without an acknowledge")
        elapsed = trio.current_time() - started
        record = await record_of(server)
    assert not isinstance(info.value, theta.ServerUnreachable)  # QUIC did answer
    assert elapsed >= 0.9
    assert record.hello is not None
    assert record.quic_close is not None
    assert record.quic_close[:2] == (ErrorCode.HANDSHAKE_TIMEOUT, None)
    assert record.closed_by_client


# --------------------------------------------------------------------------------------------
# Established sessions: the server misbehaves, theta must close with the spec's code
# --------------------------------------------------------------------------------------------

Hook = Callable[[ServerConnection], None]


def _control(data: bytes) -> Hook:
    def hook(c: ServerConnection) -> None:
        assert c.control_sid is not None
        c.send(c.control_sid, data)

    return hook


def _on(channel: int, data: bytes | Callable[[], bytes], *, end: bool = False) -> Hook:
    def hook(c: ServerConnection) -> None:
        c.send(c.channel_sids[channel], data() if callable(data) else data, end=end)

    return hook


def _frames(*messages: Any) -> bytes:
    return b"".join(encode_server_frame(m) for m in messages)


def _bad_identifier() -> bytes:
    payload = bytearray(spec_peer.encode_payload(Heartbeat(1000, now_us())))
    payload[4:8] = b"XXXX"
    return raw_frame(bytes(payload))


def _repeat_heartbeat(c: ServerConnection) -> None:
    last = c.send_heartbeat()
    c.send_heartbeat(sequence=last.sequence)


def _server_stream(unidirectional: bool) -> Hook:
    def hook(c: ServerConnection) -> None:
        stream_id = c._quic.get_next_available_stream_id(is_unidirectional=unidirectional)
        c.send(stream_id, _frames(ChannelOpen(1)))

    return hook


def _chunk(asset_id: int, offset: int, total: int, name: str | None, data: bytes) -> AssetChunk:
    return AssetChunk(asset_id, offset, total, name, data)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


REPL, ASSETS = 1, 2
P, M, L = ErrorCode.PROTOCOL_VIOLATION, ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE

MISBEHAVIOURS: dict[str, tuple[Hook, ErrorCode, dict[str, Any]]] = {
    # section 3
    "zero-length": (_control(bytes(4)), M, {}),
    "control-too-large": (_control(struct.pack(">I", CONTROL_LIMIT + 1)), L, {}),
    "replication-too-large": (_on(REPL, struct.pack(">I", REPLICATION_LIMIT + 1)), L, {}),
    "assets-too-large": (_on(ASSETS, struct.pack(">I", ASSETS_LIMIT + 1)), L, {}),
    "garbage-payload": (_control(raw_frame(b"\xff" * 16)), M, {}),
    "bad-identifier": (_control(_bad_identifier()), M, {}),
    "unknown-union-type": (
        _control(raw_frame(spec_peer.encode_payload(ChannelOpen(1), body_type_override=10))),
        M,
        {},
    ),
    "absent-body": (
        _control(raw_frame(spec_peer.encode_payload(ChannelOpen(1), body_type_override=0))),
        M,
        {},
    ),
    "vector-length-past-end": (
        _on(REPL, spec_peer._hostile(ReplicationMessage(1, 0, b"abcdef", 0), 2, "length", 2**31)),
        M,
        {},
    ),
    "root-offset-past-end": (
        _control(spec_peer._hostile(Heartbeat(1000, 1), None, "root", 10_000)),
        M,
        {},
    ),
    "body-offset-past-end": (
        _control(spec_peer._hostile(Heartbeat(1000, 1), None, "body", 10_000)),
        M,
        {},
    ),
    "vtable-past-end": (
        _control(spec_peer._hostile(Heartbeat(1000, 1), None, "vtable", 10_000)),
        M,
        {},
    ),
    "string-length-past-end": (
        _on(ASSETS, spec_peer._hostile(AssetChunk(1, 0, 3, "name", b"abc"), 3, "length", 10_000)),
        M,
        {},
    ),
    "fin-inside-length-prefix": (_on(REPL, b"\x00\x00", end=True), M, {}),
    "fin-inside-frame": (_on(REPL, struct.pack(">I", 100) + bytes(10), end=True), M, {}),
    # section 2 / 4 "allowed on"
    "channel-open-on-control": (_control(_frames(ChannelOpen(1))), P, {}),
    "acknowledge-again": (
        _control(_frames(SessionAcknowledge(1, SCHEMA_HASH, bytes(24), 1, 0, (), bytes(32), b""))),
        P,
        {},
    ),
    "reject-after-handshake": (_control(_frames(SessionReject(6, "late", 1, 0))), P, {}),
    "heartbeat-on-replication": (_on(REPL, lambda: _frames(Heartbeat(1000, now_us()))), P, {}),
    "replication-on-assets": (_on(ASSETS, _frames(ReplicationMessage(1, 0, b"x", 0))), P, {}),
    "server-initiated-stream": (_server_stream(False), P, {}),
    "unidirectional-stream": (_server_stream(True), P, {}),
    # section 4.4
    "heartbeat-sequence-repeats": (_repeat_heartbeat, P, {}),
    # section 4.5
    "compressed-without-capability": (
        _on(REPL, _frames(ReplicationMessage(1, FLAG_COMPRESSED, _zstd(b"x"), 1))),
        P,
        {"capabilities": ()},
    ),
    "zstd-size-mismatch": (
        _on(REPL, _frames(ReplicationMessage(1, FLAG_COMPRESSED, _zstd(b"xy"), 3))),
        M,
        {},
    ),
    "zstd-larger-than-declared": (
        _on(REPL, _frames(ReplicationMessage(1, FLAG_COMPRESSED, _zstd(b"xyz"), 2))),
        M,
        {},
    ),
    "zstd-over-replication-limit": (
        _on(
            REPL,
            _frames(
                ReplicationMessage(
                    1, FLAG_COMPRESSED, _zstd(bytes(REPLICATION_LIMIT + 1)), REPLICATION_LIMIT + 1
                )
            ),
        ),
        M,
        {},
    ),
    "zstd-garbage": (
        _on(REPL, _frames(ReplicationMessage(1, FLAG_COMPRESSED, b"not zstd", 8))),
        M,
        {},
    ),
    "asset-gap": (
        _on(ASSETS, _frames(_chunk(1, 0, 10, "n", b"abc"), _chunk(1, 5, 10, None, b"abc"))),
        M,
        {},
    ),
    "asset-first-chunk-without-name": (_on(ASSETS, _frames(_chunk(1, 0, 3, None, b"abc"))), M, {}),
    "asset-data-past-total": (_on(ASSETS, _frames(_chunk(1, 0, 3, "n", b"abcd"))), M, {}),
    "asset-total-changes": (
        _on(ASSETS, _frames(_chunk(1, 0, 10, "n", b"abc"), _chunk(1, 3, 11, None, b"abc"))),
        M,
        {},
    ),
    "asset-too-big": (_on(ASSETS, _frames(_chunk(1, 0, MAX_ASSET_SIZE + 1, "n", b"a"))), L, {}),
    "asset-unfinished-at-fin": (
        _on(ASSETS, _frames(_chunk(1, 0, 10, "n", b"abc")), end=True),
        M,
        {},
    ),
}


def _hook(fn: Hook) -> Callable[[ServerConnection], Awaitable[None]]:
    async def run(connection: ServerConnection) -> None:
        fn(connection)

    return run


@pytest.mark.parametrize("name", list(MISBEHAVIOURS))
async def test_server_misbehaviour_closes_with_spec_code(name: str) -> None:
    hook, code, extra = MISBEHAVIOURS[name]
    server_behaviour = behaviour(on_established=_hook(hook), **extra)
    closed, record = await session_end(server_behaviour, client_config())
    assert (closed.code, closed.by_peer) == (code, False), closed.reason
    # section 4.6: an application CONNECTION_CLOSE with the spec code and a reason phrase
    assert record.quic_close is not None
    assert record.quic_close[:2] == (code, None), record.quic_close
    assert record.quic_close[2], "empty reason phrase"
    assert record.closed_by_client


@pytest.mark.parametrize("unidirectional", [False, True], ids=["bidirectional", "unidirectional"])
async def test_server_stream_closes_at_once(unidirectional: bool) -> None:
    """Sections 2 and 4.6: a server-opened stream is PROTOCOL_VIOLATION, and "Errors detected
    by either side ... close the QUIC connection at once".  With heartbeats every 2 s, the
    close must not wait for the next heartbeat (bound: 1 s, vs. milliseconds expected)."""
    server_behaviour = behaviour(
        on_established=_hook(_server_stream(unidirectional)), heartbeat_interval=2.0
    )
    async with spec_server(server_behaviour) as server:
        config = client_config(heartbeat_interval=2.0)
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, config) as session:
                with trio.move_on_after(1.0) as prompt:
                    await session.wait_closed()
                closed = await session.wait_closed()
        record = await record_of(server)
    assert (closed.code, closed.by_peer) == (ErrorCode.PROTOCOL_VIOLATION, False)
    assert record.quic_close is not None
    assert record.quic_close[:2] == (ErrorCode.PROTOCOL_VIOLATION, None)
    assert not prompt.cancelled_caught, "theta did not close within 1 s of the violation"


@pytest.mark.parametrize("sent", [0, 2])
async def test_server_stops_heartbeating(sent: int) -> None:
    server_behaviour = behaviour(heartbeat_interval=0.05, heartbeat_limit=sent)
    config = client_config(heartbeat_interval=0.05, heartbeat_timeout=0.5)
    closed, record = await session_end(server_behaviour, config)
    assert (closed.code, closed.by_peer) == (ErrorCode.HEARTBEAT_TIMEOUT, False)
    assert record.quic_close is not None
    assert record.quic_close[:2] == (ErrorCode.HEARTBEAT_TIMEOUT, None)
    assert record.closed_by_client
    assert len(record.heartbeats_sent) == sent
    assert record.deviation_text() == []


@pytest.mark.parametrize(
    ("code", "reason"),
    [(ErrorCode.GOING_AWAY, "maintenance window"), (ErrorCode.NO_ERROR, "")],
)
async def test_server_session_close(code: ErrorCode, reason: str) -> None:
    async def close(connection: ServerConnection) -> None:
        await connection.close_session(code, reason)

    closed, record = await session_end(behaviour(on_established=close), client_config())
    assert (closed.code, closed.reason, closed.by_peer) == (code, reason, True)
    # the server closes QUIC once its SessionClose and FINs are acknowledged; theta, as the
    # receiver, "may close the QUIC connection with the same code itself" first
    assert record.quic_close is not None
    assert record.quic_close[:2] == (code, None)
    assert record.client_close is None  # "The receiver of a SessionClose stops sending"
    assert record.deviation_text() == []


async def test_replication_encodings_accepted() -> None:
    """Section 4.5: reserved flag bits and a stray uncompressed_size are ignored; any valid
    zstd frame (also one without a content-size header, or of empty content) is accepted."""
    text = b"no content size in this zstd frame " * 300
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(text)
    messages = [
        ReplicationMessage(7, 0b110, b"abc", 0),
        ReplicationMessage(8, 0, b"def", 99),
        ReplicationMessage(9, FLAG_COMPRESSED | 0x80000000, no_size, len(text)),
        ReplicationMessage(10, FLAG_COMPRESSED, _zstd(b""), 0),
    ]

    async def send(connection: ServerConnection) -> None:
        for message in messages:
            connection.send_message(connection.channel_sids[REPL], message)

    async with spec_server(behaviour(on_established=send)) as server:
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, client_config()) as session:
                got = [await session.replication.receive() for _ in messages]
        record = await record_of(server)
    assert [(m.tick, m.payload) for m in got] == [
        (7, b"abc"),
        (8, b"def"),
        (9, text),
        (10, b""),
    ]
    assert record.client_close is not None
    assert record.client_close.code == ErrorCode.NO_ERROR


async def test_server_ends_its_directions_only() -> None:
    """Section 4.5: FIN on replication/assets ends that direction; the rest stays usable."""

    async def finish(connection: ServerConnection) -> None:
        sid = connection.channel_sids[REPL]
        connection.send_message(sid, ReplicationMessage(1, 0, b"bye", 0), end=True)
        sid = connection.channel_sids[ASSETS]
        connection.send_message(sid, AssetChunk(5, 0, 4, "last", b"last"), end=True)

    async with spec_server(behaviour(on_established=finish, echo=False)) as server:
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, client_config()) as session:
                got = [(m.tick, m.payload) async for m in session.replication]
                assets = [(a.name, a.data) async for a in session.assets]
                await session.replication.send(b"still open", tick=2)
                await session.assets.send("after", b"xyz")
                still_open = session.closed is None
        record = await record_of(server)
    assert still_open
    assert got == [(1, b"bye")]
    assert assets == [("last", b"last")]
    assert record.replication_payloads == [(2, b"still open")]
    assert [(n, d) for _, n, d in record.assets_received] == [("after", b"xyz")]
    assert record.deviation_text() == []


def _sized(make: Callable[[int], Any], size: int) -> Any:
    """The message ``make(n)`` whose FlatBuffers payload is exactly ``size`` bytes."""
    overhead = len(spec_peer.encode_payload(make(64))) - 64
    for n in range(size - overhead - 8, size - overhead + 9):
        message = make(n)
        if len(spec_peer.encode_payload(message)) == size:
            return message
    raise AssertionError(f"no payload of exactly {size} bytes")


async def test_frames_of_exactly_the_limit_are_accepted() -> None:
    """Section 3: "a payload of exactly the limit is legal"; section 4.5 likewise for zstd."""
    replication = _sized(lambda n: ReplicationMessage(1, 0, b"r" * n, 0), REPLICATION_LIMIT)
    chunk = _sized(lambda n: AssetChunk(1, 0, n, "big", b"a" * n), ASSETS_LIMIT)
    close = _sized(lambda n: SessionClose(ErrorCode.GOING_AWAY, "c" * n), CONTROL_LIMIT)
    inflated = bytes(REPLICATION_LIMIT)

    async def send(connection: ServerConnection) -> None:
        connection.send_message(connection.channel_sids[REPL], replication)
        connection.send_message(
            connection.channel_sids[REPL],
            ReplicationMessage(2, FLAG_COMPRESSED, _zstd(inflated), len(inflated)),
        )
        connection.send_message(connection.channel_sids[ASSETS], chunk)
        await connection.close_session(close.code, close.reason)

    async with spec_server(behaviour(on_established=send)) as server:
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, client_config()) as session:
                first = await session.replication.receive()
                second = await session.replication.receive()
                asset = await session.assets.receive()
                closed = await session.wait_closed()
        record = await record_of(server)
    assert (first.tick, first.payload) == (1, replication.payload)
    assert (second.tick, second.payload) == (2, inflated)
    assert (asset.name, asset.data) == ("big", chunk.data)
    assert (closed.code, closed.by_peer) == (ErrorCode.GOING_AWAY, True)
    assert close.reason.startswith(closed.reason)  # theta may shorten a long reason
    assert record.deviation_text() == []


async def test_server_assets_interleaved_empty_and_id_reuse() -> None:
    """Section 4.5: chunks of different assets interleave; an id is reusable once complete."""
    chunks = [
        AssetChunk(1, 0, 6, "one", b"abc"),
        AssetChunk(2, 0, 0, "empty", b""),
        AssetChunk(3, 0, 2, "three", b"xy"),
        AssetChunk(1, 3, 6, None, b"def"),
        AssetChunk(2, 0, 1, "two-again", b"z"),
    ]

    async def send(connection: ServerConnection) -> None:
        for each in chunks:
            connection.send_message(connection.channel_sids[ASSETS], each)

    async with spec_server(behaviour(on_established=send)) as server:
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, client_config()) as session:
                got = [await session.assets.receive() for _ in range(4)]
        record = await record_of(server)
    assert [(a.name, a.data) for a in got] == [
        ("empty", b""),
        ("three", b"xy"),
        ("one", b"abcdef"),
        ("two-again", b"z"),
    ]
    assert record.deviation_text() == []


async def test_forged_future_echo_clamps_rtt_to_zero() -> None:
    """Section 4.4: "rtt = 0 when that is negative ... clamp, never underflow"."""

    async def forge(connection: ServerConnection) -> None:
        await connection.heartbeat_seen.wait()
        assert connection.control_sid is not None
        connection.send_message(
            connection.control_sid,
            Heartbeat(
                sequence=1,
                sent_at_us=now_us(),
                echo_sequence=connection.last_peer_sequence,
                echo_sent_at_us=now_us() + 10_000_000,
                echo_delay_us=2**64 - 1,
                rtt_us=2**32 - 1,
                jitter_us=2**32 - 1,
            ),
        )

    server_behaviour = behaviour(on_established=forge, heartbeat_limit=0)
    async with spec_server(server_behaviour) as server:
        config = client_config(heartbeat_interval=0.05)
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, config) as session:
                async for snapshot in session.watch_diagnostics(0.05):
                    if snapshot.heartbeats_received >= 1:
                        break
                still_open = session.closed is None
        record = await record_of(server)
    assert still_open
    assert snapshot.rtt_latest == 0
    assert snapshot.peer_rtt == pytest.approx((2**32 - 1) / 1e6)
    assert record.client_close is not None
    assert record.client_close.code == ErrorCode.NO_ERROR


async def test_role_without_replicate() -> None:
    """Section 6: the server enforces the role (PERMISSION_DENIED); theta may refuse first."""
    async with spec_server(behaviour(role=ROLE_UPLOAD_ASSETS)) as server:
        with trio.fail_after(STEP):
            async with theta.connect("127.0.0.1", server.port, client_config()) as session:
                refused_locally = False
                try:
                    await session.replication.send(b"not allowed", tick=1)
                except PermissionError:
                    refused_locally = True
                if not refused_locally:
                    closed = await session.wait_closed()
                    assert (closed.code, closed.by_peer) == (ErrorCode.PERMISSION_DENIED, True)
        record = await record_of(server)
    assert record.replication_payloads == []
    if refused_locally:  # theta checks its role before sending: nothing forbidden on the wire
        assert record.deviation_text() == []
        assert record.quic_close is not None
        assert record.quic_close[:2] == (ErrorCode.NO_ERROR, None)


async def test_block_raising_closes_with_internal_error() -> None:
    """README: leaving the block closes with INTERNAL_ERROR if the block raised."""
    async with spec_server(behaviour()) as server:
        with trio.fail_after(STEP), pytest.raises(KeyError):
            async with theta.connect("127.0.0.1", server.port, client_config()):
                raise KeyError("application bug")
        record = await record_of(server)
    assert record.client_close is not None
    assert record.client_close.code == ErrorCode.INTERNAL_ERROR
    assert record.quic_close is not None
    assert record.quic_close[:2] == (ErrorCode.INTERNAL_ERROR, None)


# --------------------------------------------------------------------------------------------
# Self-check: the spec server against the other independent implementation (the spec peer
# client), so that a failure above is theta's and not this server's
# --------------------------------------------------------------------------------------------


def _peer_options(port: int, **changes: Any) -> spec_peer.PeerOptions:
    return spec_peer.PeerOptions(
        host="127.0.0.1",
        port=port,
        ca_pem=CERT.certificate_pem,
        manifest=MANIFEST,
        heartbeat_interval=0.05,
        step_timeout=STEP,
        **changes,
    )


async def test_spec_peer_against_spec_server() -> None:
    payloads = [(1, b"a" * 5000), (2, b""), (3, os.urandom(100))]
    assets = [("x", os.urandom(150_000)), ("empty", b"")]
    async with spec_server(behaviour(heartbeat_interval=0.05)) as server:
        options = _peer_options(
            server.port,
            capabilities=(CAP_ZSTD,),
            compress_replication=True,
            replication=payloads,
            assets=assets,
            min_server_heartbeats=2,
            close_code=ErrorCode.GOING_AWAY,
            close_reason="peer done",
        )
        result, error = await trio.to_thread.run_sync(spec_peer.run_peer_capturing, options)
        record = await record_of(server)
    assert error is None, error
    assert result is not None
    assert result.replication_payloads == payloads
    assert [(name, data) for _, name, data in result.assets_echoed] == assets
    assert record.deviation_text() == []
    assert record.client_close == SessionClose(ErrorCode.GOING_AWAY, "peer done")
    assert record.quic_close is not None
    assert record.quic_close[:2] == (ErrorCode.GOING_AWAY, None)


SERVER_DETECTS: dict[str, tuple[dict[str, Any], ErrorCode]] = {
    "zero-length": ({"scenario": "zero-length"}, M),
    "control-too-large": ({"scenario": "control-too-large"}, L),
    "bad-identifier": ({"scenario": "bad-identifier"}, M),
    "heartbeat-repeat": ({"scenario": "heartbeat-repeat"}, P),
    "second-confirm": ({"scenario": "second-confirm"}, P),
    "channel-open-3": ({"scenario": "channel-open-3"}, P),
    "second-replication-stream": ({"scenario": "second-replication-stream"}, P),
    "unidirectional-stream": ({"scenario": "unidirectional-stream"}, P),
    "compressed-without-capability": ({"scenario": "compressed-without-capability"}, P),
    "asset-gap": ({"scenario": "asset-gap"}, M),
    "asset-unfinished-at-fin": ({"scenario": "asset-unfinished-at-fin"}, M),
    "heartbeat-before-confirm": ({"scenario": "heartbeat-before-confirm"}, P),
    "bad-confirm-signature": ({"corrupt_confirm_signature": True}, ErrorCode.HANDSHAKE_FAILED),
    "no-hello": ({"scenario": "no-hello"}, ErrorCode.HANDSHAKE_TIMEOUT),
    "schema-mismatch": ({"schema_hash_override": 1}, ErrorCode.SCHEMA_MISMATCH),
    "version-mismatch": ({"protocol_version": 2}, ErrorCode.VERSION_MISMATCH),
    "short-nonce": ({"nonce": bytes(23)}, ErrorCode.HANDSHAKE_FAILED),
}


@pytest.mark.parametrize("name", list(SERVER_DETECTS))
async def test_spec_server_detects_peer_violation(name: str) -> None:
    changes, code = SERVER_DETECTS[name]
    async with spec_server(behaviour(handshake_timeout=0.5)) as server:
        options = _peer_options(server.port, **changes)
        _, error = await trio.to_thread.run_sync(spec_peer.run_peer_capturing, options)
        record = await record_of(server)
    assert record.quic_close is not None
    assert record.quic_close[:2] == (code, None), record.quic_close
    assert record.closed_by_client is False
    if isinstance(error, spec_peer.SessionRejectedError):
        assert error.reject.code == code
    else:
        assert isinstance(error, spec_peer.ConnectionClosedByServer), error
        assert error.error_code == code
