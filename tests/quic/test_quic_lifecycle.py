"""Closing, cancellation, resets, backpressure and timers."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from theta._quic import (
    ConnectionClosedByPeer,
    HandshakeTimeout,
    IdleTimeout,
    QuicConnection,
    QuicServer,
    QuicStream,
    StreamResetError,
    TransportError,
    generate_self_signed_certificate,
    open_quic_connection,
    serve_quic,
)
from theta.testing import LinkConditioner, LinkConditionerConfig

from .quic_helpers import (
    client_config,
    count_tasks,
    digest_handler,
    echo_handler,
    echo_stream,
    payload,
    read_all,
    send_in_chunks,
    server_config,
    start_server,
)


async def test_peer_application_close_reaches_pending_receive(nursery: trio.Nursery) -> None:
    async def handler(connection: QuicConnection) -> None:
        stream = await connection.accept_stream()
        assert await stream.receive_some(5) == b"hello"
        await connection.close(42, "bye")

    server = await start_server(nursery, handler)
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", server.port, client_config()) as conn:
            stream = await conn.open_stream()
            await stream.send_all(b"hello")
            with pytest.raises(ConnectionClosedByPeer) as caught:
                await stream.receive_some()
            assert (caught.value.code, caught.value.reason) == (42, "bye")
            assert conn.error is caught.value
            with pytest.raises(ConnectionClosedByPeer):
                await conn.accept_stream()


async def test_cancelling_owner_closes_socket_and_leaves_no_task(
    echo_server: QuicServer,
) -> None:
    me = trio.lowlevel.current_task()
    assert count_tasks(me) == 1
    sockets: list[socket.socket] = []
    with trio.fail_after(10):
        with trio.CancelScope() as owner:
            async with open_quic_connection("127.0.0.1", echo_server.port, client_config()) as conn:
                sockets.append(conn._endpoint.socket)
                stream = await conn.open_stream()
                await stream.send_all(b"x")
                assert count_tasks(me) > 1  # the receive loop and the connection driver
                owner.cancel()
                await stream.receive_some()  # blocks until cancelled
        assert owner.cancelled_caught
    assert sockets[0].fileno() == -1
    assert count_tasks(me) == 1


async def test_cancelling_server_closes_socket_and_leaves_no_task(
    echo_server: QuicServer,
) -> None:
    before = count_tasks()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, digest_handler)
            async with open_quic_connection("127.0.0.1", server.port, client_config()):
                assert len(server.connections) == 1
            nursery.cancel_scope.cancel()
    assert server._endpoint.socket.fileno() == -1
    assert count_tasks() == before


async def test_stream_reset_wakes_blocked_reader(nursery: trio.Nursery) -> None:
    async def handler(connection: QuicConnection) -> None:
        stream = await connection.accept_stream()
        assert await stream.receive_some(1) == b"x"
        await stream.send_all(b"partial")
        await stream.reset(7)
        await connection.terminated.wait()

    server = await start_server(nursery, handler)
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", server.port, client_config()) as conn:
            stream = await conn.open_stream()
            await stream.send_all(b"x")

            async def read_until_error() -> None:
                while await stream.receive_some():  # "partial" may or may not arrive first
                    pass
                pytest.fail("a reset stream must not end cleanly")  # pragma: no cover

            with pytest.raises(StreamResetError) as caught:
                await read_until_error()
            assert caught.value.code == 7


async def test_slow_reader_blocks_sender_within_bound(nursery: trio.Nursery) -> None:
    high_water = 256 * 1024
    window = 128 * 1024
    reader_ready = trio.Event()
    streams: list[QuicStream] = []

    async def stalled_handler(connection: QuicConnection) -> None:
        streams.append(await connection.accept_stream())
        reader_ready.set()
        await connection.terminated.wait()  # never reads

    server = await start_server(nursery, stalled_handler, stream_receive_window=window)
    config = client_config(stream_send_high_water=high_water, stream_receive_window=window)
    with trio.fail_after(20):
        async with open_quic_connection("127.0.0.1", server.port, config) as conn:
            stream = await conn.open_stream()
            sent = 0

            async def sender() -> None:
                nonlocal sent
                for chunk in range((64 << 20) // 65536):
                    await stream.send_all(payload(65536, seed=chunk % 4))
                    sent += 65536

            async with trio.open_nursery() as inner:
                inner.start_soon(sender)
                await reader_ready.wait()
                # Let the sender run until nothing can move: it must be parked in send_all.
                for _ in range(50):
                    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                assert sent < 64 << 20
                assert stream.unacked_bytes() <= high_water
                assert stream.max_unacked_bytes <= high_water
                assert streams[0]._buffer.__len__() <= window  # the receiver's bound
                inner.cancel_scope.cancel()
            await stream.reset(1)  # abandon the unread data so the exit does not wait for it
            assert sent <= high_water + window + 65536


async def test_handshake_timeout_against_silent_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    silent = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with silent:
        await silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        with trio.fail_after(60), pytest.raises(HandshakeTimeout):
            async with open_quic_connection("127.0.0.1", port, client_config()):
                pytest.fail("handshake cannot complete")  # pragma: no cover
        assert trio.current_time() >= client_config().handshake_timeout


async def test_idle_timeout_and_retransmission_need_only_the_timer(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """After the handshake the link goes dark both ways: only the connection's timer can
    act. It must keep probing (retransmissions) and then end with IdleTimeout."""
    server = await start_server(nursery, digest_handler)
    link = LinkConditioner(server.address)
    await nursery.start(link.run)
    with trio.fail_after(300):
        async with open_quic_connection("127.0.0.1", link.address[1], client_config()) as conn:
            dark = LinkConditionerConfig(drop=lambda _: True)
            link.configure(to_server=dark, to_client=dark)
            stream = await conn.open_stream()
            await stream.send_all(b"lost in the dark" * 100)
            started = trio.current_time()
            with pytest.raises(IdleTimeout):
                await stream.receive_some()
            assert trio.current_time() - started >= 29.0
            assert conn.stats().engine.probe_timeouts >= 3


async def test_lost_acks_recovered_by_probe_timer(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Drop the next 8 server->client datagrams (ACKs) mid-transfer: the client hears
    nothing, so only its probe timer can restart the flow; the transfer must complete."""
    server = await start_server(nursery, digest_handler)
    link = LinkConditioner(server.address)
    await nursery.start(link.run)
    to_drop = [8]

    def drop_some(_: bytes) -> bool:
        if to_drop[0] > 0:
            to_drop[0] -= 1
            return True
        return False

    with trio.fail_after(300):
        async with open_quic_connection("127.0.0.1", link.address[1], client_config()) as conn:
            stream = await conn.open_stream()
            data = payload(256 * 1024, seed=5)
            await send_in_chunks(stream, data[:1000])
            link.configure(to_client=LinkConditionerConfig(drop=drop_some))
            await send_in_chunks(stream, data[1000:])
            await stream.send_eof()
            import hashlib

            digest = b""
            while chunk := await stream.receive_some():
                digest += chunk
            assert digest == hashlib.sha256(data).digest()
            assert to_drop[0] == 0
            assert conn.stats().engine.probe_timeouts >= 1


async def test_untrusted_certificate_is_rejected(echo_server: QuicServer) -> None:
    stranger = generate_self_signed_certificate()
    config = client_config().__class__(ca_certs=stranger.certificate_pem, handshake_timeout=5)
    with trio.fail_after(10), pytest.raises(TransportError) as caught:
        async with open_quic_connection("127.0.0.1", echo_server.port, config):
            pytest.fail("must not connect")  # pragma: no cover
    assert not isinstance(caught.value, HandshakeTimeout)


async def test_a_close_of_the_engines_own_is_reported_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The client's engine refuses the certificate and closes with a TLS alert: connect
    fails as that close leaves (one round trip in), not after the closing period (3 PTO,
    ≥ 3 round trips here)."""
    server = await start_server(nursery, echo_handler)
    half_round_trip = LinkConditionerConfig(delay=0.05)
    link = LinkConditioner(server.address, half_round_trip, half_round_trip)
    await nursery.start(link.run)
    stranger = generate_self_signed_certificate()
    config = client_config().__class__(ca_certs=stranger.certificate_pem, handshake_timeout=5)
    started = trio.current_time()
    with trio.fail_after(10), pytest.raises(TransportError, match="self-signed"):
        async with open_quic_connection("127.0.0.1", link.address[1], config):
            pytest.fail("must not connect")  # pragma: no cover
    assert trio.current_time() - started < 0.15


async def test_send_whole_writes_all_or_nothing(nursery: trio.Nursery) -> None:
    high_water, window = 64 * 1024, 16 * 1024
    received: list[QuicStream] = []
    accepted = trio.Event()

    async def stalled_handler(connection: QuicConnection) -> None:
        received.append(await connection.accept_stream())
        accepted.set()
        await connection.terminated.wait()  # reads only when the test says so

    server = await start_server(nursery, stalled_handler, stream_receive_window=window)
    config = client_config(stream_send_high_water=high_water)
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", server.port, config) as connection:
            stream = await connection.open_stream()
            await stream.send_whole(payload(1000, seed=1))
            await accepted.wait()
            with trio.move_on_after(0.2) as waited:  # send_all would block half-way
                await stream.send_whole(payload(2 * high_water, seed=2))
            assert not waited.cancelled_caught  # below the mark: written whole at once
            with trio.move_on_after(0.2) as waited:
                await stream.send_whole(payload(5000, seed=3))
            assert waited.cancelled_caught  # above the mark: blocked, and nothing of it left
            assert stream.unacked_bytes() <= 1000 + 2 * high_water
            await stream.send_eof()
            data = bytearray()
            while chunk := await received[0].receive_some():
                data += chunk
            assert data == payload(1000, seed=1) + payload(2 * high_water, seed=2)


async def run_cancellable_server(
    scope: trio.CancelScope,
    handler: Callable[[QuicConnection], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[QuicServer],
) -> None:
    with scope:
        config = server_config(idle_timeout=3)
        await serve_quic(handler, "127.0.0.1", 0, config, task_status=task_status)


async def test_cancelling_either_side_tells_the_peer_at_once() -> None:
    """Whichever task trio cancels first, the driver closes on its way out: the peer
    learns at once, not by its idle timeout (3 s here). Repeated: the order varies."""
    ended_send, ended = trio.open_memory_channel[BaseException | None](1)

    async def echo_once(connection: QuicConnection) -> None:
        stream = await connection.accept_stream()
        await stream.send_all(await stream.receive_some())
        await connection.terminated.wait()
        ended_send.send_nowait(connection.error)

    async def ping(connection: QuicConnection) -> None:
        """A round trip: both sides are past the handshake (a close during it is sent
        as a transport error, RFC 9000 section 10.2.3)."""
        stream = await connection.open_stream()
        await stream.send_all(b"x")
        assert await stream.receive_some() == b"x"

    for _ in range(3):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, echo_once, idle_timeout=3)
            with trio.CancelScope() as owner:
                async with open_quic_connection(
                    "127.0.0.1", server.port, client_config(idle_timeout=3)
                ) as connection:
                    await ping(connection)
                    owner.cancel()
                    await trio.sleep_forever()
            with trio.fail_after(1):
                error = await ended.receive()
            assert isinstance(error, ConnectionClosedByPeer)
            assert error.code == 0
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            server_scope = trio.CancelScope()
            server = await nursery.start(run_cancellable_server, server_scope, echo_once)
            async with open_quic_connection(
                "127.0.0.1", server.port, client_config(idle_timeout=3)
            ) as connection:
                await ping(connection)
                server_scope.cancel()
                with trio.fail_after(1):
                    await connection.terminated.wait()
                assert isinstance(connection.error, ConnectionClosedByPeer)
                assert connection.error.code == 0


async def test_an_engine_failure_tells_the_peer(nursery: trio.Nursery) -> None:
    connections: list[QuicConnection] = []
    received = trio.Event()

    async def handler(connection: QuicConnection) -> None:
        connections.append(connection)
        assert await (await connection.accept_stream()).receive_some() == b"x"
        received.set()
        await connection.terminated.wait()

    server = await start_server(nursery, handler, idle_timeout=3)
    with trio.fail_after(5):
        async with open_quic_connection(
            "127.0.0.1", server.port, client_config(idle_timeout=3)
        ) as connection:
            stream = await connection.open_stream()
            await stream.send_all(b"x")
            await received.wait()

            def fail(*args: object, **kwargs: object) -> None:
                raise IndexError("an engine bug met by hostile input")

            connections[0]._quic.receive_datagram = fail  # type: ignore[method-assign]
            await stream.send_all(b"y")
            with trio.fail_after(1):  # not the idle timeout
                await connection.terminated.wait()
    assert isinstance(connection.error, TransportError)
    assert connection.error.code == 1
    assert isinstance(connections[0].error, TransportError)


async def test_nothing_is_accepted_for_sending_once_closing(echo_server: QuicServer) -> None:
    with trio.fail_after(5):
        async with open_quic_connection("127.0.0.1", echo_server.port, client_config()) as conn:
            stream = await conn.open_stream()
            await stream.send_all(b"x")
            conn.close_nowait()
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"lost otherwise")
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_eof()
            with pytest.raises(trio.ClosedResourceError):
                await conn.open_stream()


async def test_open_stream_waits_for_the_peers_stream_limit(nursery: trio.Nursery) -> None:
    async def one_at_a_time(connection: QuicConnection) -> None:
        await echo_stream(await connection.accept_stream())
        await echo_stream(await connection.accept_stream())
        await connection.terminated.wait()

    server = await start_server(nursery, one_at_a_time, max_concurrent_peer_streams=1)
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", server.port, client_config()) as connection:
            first = await connection.open_stream()
            await first.send_all(b"first")
            opened: list[QuicStream] = []

            async def open_second() -> None:
                opened.append(await connection.open_stream())

            async with trio.open_nursery() as inner:
                inner.start_soon(open_second)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert opened == []  # the peer allows one stream at a time
                await first.send_eof()
                assert await read_all(first) == b"first"  # the first stream is over...
            second = opened[0]  # ... so the peer allowed the second
            await second.send_all(b"second")
            assert await second.receive_some() == b"second"
            await second.reset(3)  # a stream the peer allowed: the connection lives on
            ping = await connection.open_stream()  # the reset stream freed its place
            await ping.send_all(b"x")
            assert connection.error is None


async def test_unaccepted_peer_streams_hold_their_places(nursery: trio.Nursery) -> None:
    """A peer stream finished inside the engine (data, FIN, STOP_SENDING) still counts
    against MAX_STREAMS until the application has closed it: what a peer can make this
    side buffer stays within max_concurrent_peer_streams x stream_receive_window."""
    window, places = 16 * 1024, 4
    server_side: list[QuicConnection] = []
    release = trio.Event()

    async def slow_to_accept(connection: QuicConnection) -> None:
        server_side.append(connection)
        await release.wait()
        async with await connection.accept_stream():
            pass  # one place freed
        await connection.terminated.wait()

    server = await start_server(
        nursery, slow_to_accept, stream_receive_window=window, max_concurrent_peer_streams=places
    )
    opened = 0
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", server.port, client_config()) as connection:

            async def upload_and_leave() -> None:
                nonlocal opened
                while True:
                    stream = await connection.open_stream()
                    opened += 1
                    await stream.send_all(bytes(window))
                    await stream.send_eof()
                    await connection.wait_acknowledged([stream])
                    await stream.aclose()  # STOP_SENDING: the stream finishes in the engine

            async with trio.open_nursery() as inner:
                inner.start_soon(upload_and_leave)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                peer = server_side[0]
                assert opened == places
                assert peer.pending_streams == places
                assert sum(len(stream._buffer) for stream in peer._streams.values()) <= (
                    places * window
                )
                release.set()  # the handler closes one: one more may open
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert opened == places + 1
                inner.cancel_scope.cancel()


class _PeerReader:
    """A server handler that reads the first stream the client opens, whole, once
    ``read_now`` is set: :meth:`outcome` is the bytes up to a clean end, or the error."""

    def __init__(self) -> None:
        self.read_now = trio.Event()
        self._send, self._outcome = trio.open_memory_channel[BaseException | bytes](1)

    async def handler(self, connection: QuicConnection) -> None:
        stream = await connection.accept_stream()
        await self.read_now.wait()
        try:
            self._send.send_nowait(await read_all(stream))
        except trio.BrokenResourceError as error:
            self._send.send_nowait(error)
        await connection.terminated.wait()

    async def outcome(self) -> BaseException | bytes:
        return await self._outcome.receive()


async def test_a_send_interrupted_part_way_resets_instead_of_fin(nursery: trio.Nursery) -> None:
    high_water, window = 64 * 1024, 16 * 1024
    peer = _PeerReader()
    server = await start_server(nursery, peer.handler, stream_receive_window=window)
    config = client_config(stream_send_high_water=high_water)
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", server.port, config) as connection:
            stream = await connection.open_stream()
            with trio.move_on_after(0.2) as waited:  # blocks at the mark, part-way
                await stream.send_all(payload(4 * high_water))
            assert waited.cancelled_caught
            with pytest.raises(trio.BrokenResourceError, match="interrupted"):
                await stream.send_all(b"more")
            with pytest.raises(trio.BrokenResourceError, match="interrupted"):
                await stream.send_eof()
            await stream.aclose()
            peer.read_now.set()
            result = await peer.outcome()
    assert isinstance(result, StreamResetError)  # not a clean end after a partial message


async def test_aclose_beside_a_blocked_send_all_resets_instead_of_fin(
    nursery: trio.Nursery,
) -> None:
    """Another task closes the stream while ``send_all`` waits part-way through its data:
    the peer must not read the written part followed by a clean end of stream."""
    high_water = window = 1024
    peer = _PeerReader()
    server = await start_server(nursery, peer.handler, stream_receive_window=window)
    config = client_config(stream_send_high_water=high_water)
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", server.port, config) as connection:
            stream = await connection.open_stream()

            async def send() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await stream.send_all(payload(8 * high_water))

            async with trio.open_nursery() as inner:
                inner.start_soon(send)
                while not stream._writable.statistics().tasks_waiting:  # blocked part-way
                    await trio.testing.wait_all_tasks_blocked()
                await stream.aclose()
            peer.read_now.set()
            result = await peer.outcome()
    assert isinstance(result, StreamResetError), result


def _closes_after_the_first_bytes(
    code: int, reason: str
) -> Callable[[QuicConnection], Awaitable[None]]:
    """A server handler: read the client's first bytes, then close with ``code``."""

    async def handler(connection: QuicConnection) -> None:
        await (await connection.accept_stream()).receive_some()
        await connection.close(code, reason)

    return handler


async def test_send_eof_on_a_broken_stream_raises(nursery: trio.Nursery) -> None:
    """Like ``send_all``, ``send_eof`` says that the end of the stream cannot be sent
    (trio's HalfCloseableStream contract): here the peer has closed the connection."""

    server = await start_server(nursery, _closes_after_the_first_bytes(5, "go away"))
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", server.port, client_config()) as connection:
            stream = await connection.open_stream()
            await stream.send_all(b"x")
            await connection.terminated.wait()
            with pytest.raises(ConnectionClosedByPeer):
                await stream.send_eof()


async def test_a_long_close_reason_is_cut_on_a_character(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, _closes_after_the_first_bytes(7, "é" * 150))  # 300 B
    with trio.fail_after(5):
        async with open_quic_connection("127.0.0.1", server.port, client_config()) as conn:
            await (await conn.open_stream()).send_all(b"x")
            await conn.terminated.wait()
    assert isinstance(conn.error, ConnectionClosedByPeer)
    assert (conn.error.code, conn.error.reason) == (7, "é" * 100)


async def test_a_peer_ignoring_stop_sending_keeps_its_streams_places(
    nursery: trio.Nursery,
) -> None:
    """The application closes each stream, but the peer never finishes its side (no FIN,
    no RESET_STREAM for the STOP_SENDING): the engine still holds every one of them, so
    their places are not given back and the peer cannot open more than the limit."""
    places = 4

    async def take_one_byte_each(connection: QuicConnection) -> None:
        while True:
            stream = await connection.accept_stream()
            await stream.receive_some()
            await stream.aclose()

    server = await start_server(nursery, take_one_byte_each, max_concurrent_peer_streams=places)
    opened: list[QuicStream] = []
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", server.port, client_config()) as connection:

            async def open_and_linger() -> None:
                while True:
                    stream = await connection.open_stream()
                    engine_stream = connection._quic._streams[stream.stream_id]
                    engine_stream.sender.reset = lambda **_: None  # type: ignore[method-assign]
                    await stream.send_all(b"x")  # and never a FIN
                    opened.append(stream)

            async with trio.open_nursery() as inner:
                inner.start_soon(open_and_linger)
                await trio.testing.wait_all_tasks_blocked(cushion=0.1)
                assert len(opened) == places
                inner.cancel_scope.cancel()


async def test_a_send_all_failing_on_its_last_chunk_is_interrupted(
    nursery: trio.Nursery,
) -> None:
    peer = _PeerReader()
    peer.read_now.set()
    server = await start_server(nursery, peer.handler)
    config = client_config(stream_send_high_water=1024)
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", server.port, config) as connection:
            stream = await connection.open_stream()
            write = connection._quic.send_stream_data
            writes: list[int] = []

            def second_write_fails(stream_id: int, data: bytes, end_stream: bool = False) -> None:
                if data:
                    writes.append(len(data))
                    if len(writes) == 2:
                        raise ValueError("the engine refused the write")
                write(stream_id, data, end_stream=end_stream)

            connection._quic.send_stream_data = second_write_fails  # type: ignore[method-assign]
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(bytes(2000))  # the first chunk went out, the last did not
            connection._quic.send_stream_data = write  # type: ignore[method-assign]
            await stream.aclose()
            assert isinstance(await peer.outcome(), StreamResetError)  # not a clean end


async def test_eager_credit_on_a_closed_stream_leaves_nothing_behind(
    echo_server: QuicServer,
) -> None:
    with trio.fail_after(5):
        async with open_quic_connection("127.0.0.1", echo_server.port, client_config()) as conn:
            stream = await conn.open_stream()
            await stream.send_all(b"x")
            stream.credit_eagerly()
            assert stream.stream_id in conn._quic._theta_eager
            await stream.aclose()
            stream.credit_eagerly()
            assert stream.stream_id not in conn._quic._theta_eager
            assert stream.stream_id not in conn._quic._theta_consumed
