"""A hand-built client that breaks the rules: the server must close with the spec's code."""

from __future__ import annotations

import contextlib
import functools
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing
import zstandard

from theta import ErrorCode, Session, SessionClosed
from theta._quic import (
    ConnectionClosedByPeer,
    QuicConfig,
    QuicConnection,
    QuicStream,
    open_quic_connection,
)
from theta.core import (
    CAP_ZSTD,
    Channel,
    ChannelOpen,
    ClientHandshake,
    FrameDecoder,
    Heartbeat,
    Message,
    ReplicationMessage,
    SessionClose,
    encode_frame,
    schema_hash,
)

from .helpers import SessionEnds, cancellable_server, certificate, echo, start_server


@contextlib.asynccontextmanager
async def raw_connection(port: int) -> AsyncIterator[QuicConnection]:
    config = QuicConfig(ca_certs=certificate().certificate_pem, server_name="localhost")
    async with open_quic_connection("127.0.0.1", port, config) as connection:
        yield connection


async def send(stream: QuicStream, *messages: Message) -> None:
    await stream.send_all(b"".join(encode_frame(m) for m in messages))


async def handshake(
    connection: QuicConnection, *, confirm: bool = True, capabilities: tuple[int, ...] = ()
) -> QuicStream:
    """Run the client handshake by hand on a new control stream (without the confirm if
    not ``confirm``); return the stream."""
    machine = ClientHandshake(schema_hash=schema_hash({}), capabilities=capabilities)
    control = await connection.open_stream()
    await send(control, machine.start(trio.current_time()))
    decoder = FrameDecoder(Channel.CONTROL)
    replies: list[Message] = []
    while not replies:
        replies = decoder.feed(await control.receive_some())
    if confirm:
        await send(control, machine.receive(replies[0], trio.current_time()))
    return control


async def establish(
    connection: QuicConnection, *, capabilities: tuple[int, ...] = ()
) -> tuple[QuicStream, QuicStream]:
    """Handshake by hand, then open the replication and assets channels (in that order);
    return the control and replication streams."""
    control = await handshake(connection, capabilities=capabilities)
    replication = await connection.open_stream()
    await send(replication, ChannelOpen(Channel.REPLICATION))
    await send(await connection.open_stream(), ChannelOpen(Channel.ASSETS))
    return control, replication


async def closed_code(connection: QuicConnection) -> int:
    with trio.fail_after(5):
        await connection.terminated.wait()
    assert isinstance(connection.error, ConnectionClosedByPeer), connection.error
    return connection.error.code


async def test_stream_beyond_three_during_the_handshake(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        control, _ = await establish(connection)
        await (await connection.open_stream()).send_all(b"\x00\x00")  # a fourth, unidentified
        assert control is not None
        assert await closed_code(connection) == ErrorCode.PROTOCOL_VIOLATION


async def test_second_stream_for_a_channel(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        await handshake(connection)
        for channel in (Channel.REPLICATION, Channel.REPLICATION):
            await send(await connection.open_stream(), ChannelOpen(channel))
        assert await closed_code(connection) == ErrorCode.PROTOCOL_VIOLATION


async def test_channel_stream_ending_before_its_first_frame(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        await handshake(connection)
        await (await connection.open_stream()).send_eof()
        assert await closed_code(connection) == ErrorCode.PROTOCOL_VIOLATION


async def test_control_stream_ending_instead_of_the_confirm(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        control = await handshake(connection, confirm=False)
        await control.send_eof()
        assert await closed_code(connection) == ErrorCode.PROTOCOL_VIOLATION


async def _second_hello(connection: QuicConnection) -> None:
    machine = ClientHandshake(schema_hash=schema_hash({}), capabilities=())
    await send(await connection.open_stream(), machine.start(trio.current_time()))


async def _reset_channel(connection: QuicConnection) -> None:
    stream = await connection.open_stream()
    await stream.send_all(b"\x00\x00")
    await stream.reset(5)


async def _raw_channel(data: bytes, connection: QuicConnection) -> None:
    await (await connection.open_stream()).send_all(data)


@pytest.mark.parametrize(
    ("misbehave", "code"),
    [
        (_second_hello, ErrorCode.PROTOCOL_VIOLATION),
        (functools.partial(_raw_channel, b"\x00\x00\x00\x00"), ErrorCode.MALFORMED_FRAME),
        (functools.partial(_raw_channel, b"\x00\x01\x00\x00"), ErrorCode.FRAME_TOO_LARGE),
        (_reset_channel, ErrorCode.PROTOCOL_VIOLATION),
    ],
    ids=["second-hello", "empty-frame", "oversized-frame", "reset"],
)
async def test_broken_stream_before_the_confirm_fails_at_once(
    nursery: trio.Nursery,
    misbehave: Callable[[QuicConnection], Awaitable[None]],
    code: ErrorCode,
) -> None:
    """Streams are identified as they arrive, not only after the confirm: a broken one
    closes the connection with its code, not with HANDSHAKE_TIMEOUT much later."""
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        await handshake(connection, confirm=False)
        await misbehave(connection)
        with trio.fail_after(1):  # well before the 5 s handshake timeout
            assert await closed_code(connection) == code


async def test_session_hello_on_a_later_stream_while_the_first_is_silent(
    nursery: trio.Nursery,
) -> None:
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        await connection.open_stream()  # the first stream, never written to
        await _second_hello(connection)
        with trio.fail_after(1):
            assert await closed_code(connection) == ErrorCode.PROTOCOL_VIOLATION


async def test_reject_code_survives_the_handshake_deadline(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handshake deadline passing while a SessionReject waits to be acknowledged
    still closes with the reject's code, not HANDSHAKE_TIMEOUT."""
    original = QuicConnection.wait_acknowledged

    async def never_on_the_server(self: QuicConnection, streams: object = None) -> None:
        if self.is_client:
            await original(self)
        else:
            await trio.sleep_forever()

    monkeypatch.setattr(QuicConnection, "wait_acknowledged", never_on_the_server)
    server = await start_server(nursery, echo, authenticator=lambda *_: None, handshake_timeout=0.5)
    async with raw_connection(server.port) as connection:
        await handshake(connection, confirm=False)  # answered with a SessionReject
        assert await closed_code(connection) == ErrorCode.AUTH_FAILED


async def test_heartbeat_before_the_confirm(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        machine = ClientHandshake(schema_hash=schema_hash({}), capabilities=())
        control = await connection.open_stream()
        await send(control, machine.start(trio.current_time()), Heartbeat(1, 1))
        assert await closed_code(connection) == ErrorCode.PROTOCOL_VIOLATION


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (encode_frame(Heartbeat(1, 1)), ErrorCode.PROTOCOL_VIOLATION),
        (encode_frame(ChannelOpen(7)), ErrorCode.PROTOCOL_VIOLATION),
        (b"\x00\x00\x00\x00", ErrorCode.MALFORMED_FRAME),
        (b"\x00\x01\x00\x00", ErrorCode.FRAME_TOO_LARGE),  # 64 KiB > the control limit
        (b"\x00\x00\x00\x08" + b"garbage!", ErrorCode.MALFORMED_FRAME),
    ],
)
async def test_bad_first_frame(nursery: trio.Nursery, first: bytes, code: ErrorCode) -> None:
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        await (await connection.open_stream()).send_all(first)
        assert await closed_code(connection) == code


async def test_replication_frame_on_the_control_stream(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        control, _ = await establish(connection)
        await send(control, ChannelOpen(Channel.REPLICATION))
        assert await closed_code(connection) == ErrorCode.PROTOCOL_VIOLATION


async def test_fin_inside_a_frame_on_the_replication_stream(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        _, replication = await establish(connection)
        await replication.send_all(b"\x00\x00\x00\x10\x01\x02")
        await replication.send_eof()
        assert await closed_code(connection) == ErrorCode.MALFORMED_FRAME


async def test_session_close_code_is_echoed_in_the_quic_close(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        control, _ = await establish(connection)
        await send(control, SessionClose(ErrorCode.GOING_AWAY, "level change"))
        assert await closed_code(connection) == ErrorCode.GOING_AWAY


async def test_no_heartbeat_after_the_peers_session_close(nursery: trio.Nursery) -> None:
    async def forever(session: Session) -> None:
        await trio.sleep_forever()

    server = await start_server(nursery, forever)
    async with raw_connection(server.port) as connection:
        control, _ = await establish(connection)
        await send(control, SessionClose(13, "bye"))  # data streams left open: a 1 s drain
        decoder = FrameDecoder(Channel.CONTROL)
        heartbeats: list[int] = []
        with trio.fail_after(5):
            while not connection.terminated.is_set():
                try:
                    data = await control.receive_some()
                except ConnectionClosedByPeer:
                    break
                heartbeats += [m.sequence for m in decoder.feed(data) if isinstance(m, Heartbeat)]
        assert heartbeats in ([], [1])  # at most the one due at establishment: none in the drain
        assert await closed_code(connection) == 13


async def test_peer_resetting_a_channel_is_a_violation(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        _, replication = await establish(connection)
        await replication.send_all(b"\x00\x00\x00\x20\x01")
        await replication.reset(5)
        assert await closed_code(connection) == ErrorCode.PROTOCOL_VIOLATION


async def test_peer_stopping_a_channel_is_a_violation_seen_by_a_send(
    nursery: trio.Nursery,
) -> None:
    """A STOP_SENDING on a channel shows only when the application next sends on it: the
    same PROTOCOL_VIOLATION as a RESET_STREAM, not this side's INTERNAL_ERROR."""
    raised: list[BaseException] = []

    async def handler(session: Session) -> None:
        message = await session.replication.receive()  # comes after the STOP_SENDING
        try:
            await session.replication.send(message.payload, tick=message.tick)
        except SessionClosed as error:
            raised.append(error)

    server = await start_server(nursery, handler)
    async with raw_connection(server.port) as connection:
        _, replication = await establish(connection)
        connection._quic.stop_stream(replication.stream_id, 5)
        await send(replication, ReplicationMessage(1, 0, b"x", 0))
        assert await closed_code(connection) == ErrorCode.PROTOCOL_VIOLATION
    (error,) = raised
    assert isinstance(error, SessionClosed)
    assert (error.code, error.by_peer) == (ErrorCode.PROTOCOL_VIOLATION, False)


async def test_peers_quic_transport_error_is_reported_in_theta_terms(
    nursery: trio.Nursery,
) -> None:
    """A peer's QUIC stack closing with a transport error: its code (here 0x0a, QUIC's
    PROTOCOL_VIOLATION, which is PERMISSION_DENIED in Theta's table) is no Theta code."""
    ends = SessionEnds()
    server = await start_server(nursery, ends.handler)
    async with raw_connection(server.port) as connection:
        control, _ = await establish(connection)
        decoder = FrameDecoder(Channel.CONTROL)  # the session runs once it heartbeats
        while not any(isinstance(m, Heartbeat) for m in decoder.feed(await control.receive_some())):
            pass
        connection._tell_peer_nowait(0x0A, "quic stack gave up", transport=True)
        with trio.fail_after(5):
            (closed,) = await ends.wait()
    assert (closed.code, closed.by_peer) == (ErrorCode.PROTOCOL_VIOLATION, True)
    assert closed.reason == "QUIC transport error 0xa: quic stack gave up"


async def test_zstd_payloads_waiting_for_the_application_are_bounded_in_bytes(
    nursery: trio.Nursery,
) -> None:
    """66 frames of 132 bytes, each inflating to almost 1 MiB: the inbox's count (64)
    alone let 64 MiB wait for a busy handler, for 9 KB on the wire."""
    read_now = trio.Event()
    ticks: list[int] = []

    async def busy_then_reading(session: Session) -> None:
        await read_now.wait()
        ticks.extend([(await session.replication.receive()).tick for _ in range(66)])

    server = await start_server(nursery, busy_then_reading)
    size = (1 << 20) - 128
    compressed = zstandard.ZstdCompressor().compress(bytes(size))
    frames = b"".join(
        encode_frame(ReplicationMessage(tick, 1, compressed, size)) for tick in range(66)
    )
    assert len(frames) < 10_000
    async with raw_connection(server.port) as connection:
        _, replication = await establish(connection, capabilities=(CAP_ZSTD,))
        tracemalloc.start()
        try:
            await replication.send_all(frames)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the server stopped
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        read_now.set()
        with trio.fail_after(10):
            while len(ticks) < 66:
                await trio.testing.wait_all_tasks_blocked()
    assert held < 8 << 20, f"{held >> 20} MiB held"
    assert ticks == list(range(66))  # nothing lost: the reader only waited


async def test_session_hello_on_a_later_stream(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    async with raw_connection(server.port) as connection:
        machine = ClientHandshake(schema_hash=schema_hash({}), capabilities=())
        await send(await connection.open_stream(), ChannelOpen(Channel.REPLICATION))
        await send(await connection.open_stream(), machine.start(trio.current_time()))
        assert await closed_code(connection) == ErrorCode.PROTOCOL_VIOLATION


async def test_a_peer_trickling_after_its_close_is_cut_off(nursery: trio.Nursery) -> None:
    """After its SessionClose a peer sends one byte of a frame now and then: the data is
    "still moving", but the server waits for it no longer than the idle timeout."""
    outcome_send, outcome = trio.open_memory_channel[BaseException | None](1)

    async def reader(session: Session) -> None:
        try:
            async for _ in session.replication:
                pass
        except SessionClosed as error:  # the frame never came whole
            outcome_send.send_nowait(error)
        else:
            outcome_send.send_nowait(None)

    server = await start_server(nursery, reader, idle_timeout=1.0)
    async with raw_connection(server.port) as connection:
        control, replication = await establish(connection)
        await send(control, SessionClose(ErrorCode.NO_ERROR, "bye"))
        await replication.send_all((10_000).to_bytes(4, "big"))  # a frame that never ends

        async def trickle() -> None:
            while True:
                await replication.send_all(b"\x00")
                await trio.sleep(0.05)  # a slow peer, keeping the connection busy

        async with trio.open_nursery() as inner:
            inner.start_soon(trickle)
            with trio.fail_after(3):
                seen = await outcome.receive()
            assert isinstance(seen, SessionClosed)
            assert (seen.code, seen.by_peer) == (ErrorCode.NO_ERROR, True)
            assert await closed_code(connection) == ErrorCode.NO_ERROR
            inner.cancel_scope.cancel()


async def test_cancelling_serve_says_going_away_to_a_client_still_handshaking() -> None:
    """A client between its hello and its confirm when the server shuts down is told
    GOING_AWAY at once (not left to its handshake timeout)."""
    async with (
        cancellable_server(echo) as (server, serving),
        raw_connection(server.port) as connection,
    ):
        await handshake(connection, confirm=False)  # the server has answered the hello
        serving.cancel()
        with trio.fail_after(2):
            assert await closed_code(connection) == ErrorCode.GOING_AWAY
