"""Bulk transfer, EOF semantics, concurrency and stream conformance over loopback."""

from __future__ import annotations

import collections
import hashlib
from typing import Any

import pytest
import trio
import trio.testing

from theta._quic import QuicConnection, QuicServer, QuicStream, _engine, open_quic_connection
from theta.testing import LinkConditioner, LinkConditionerConfig

from .quic_helpers import (
    client_config,
    digest_handler,
    echo_handler,
    payload,
    read_all,
    send_in_chunks,
    start_server,
)


async def _upload(port: int, data: bytes, host: str = "127.0.0.1") -> None:
    async with open_quic_connection(host, port, client_config()) as connection:
        stream = await connection.open_stream()
        await send_in_chunks(stream, data)
        await stream.send_eof()
        assert await read_all(stream) == hashlib.sha256(data).digest()


async def test_2mib_echo_both_directions_with_eof(echo_server: QuicServer) -> None:
    data = payload(2 << 20)
    with trio.fail_after(20):
        async with open_quic_connection("127.0.0.1", echo_server.port, client_config()) as conn:
            stream = await conn.open_stream()
            received = bytearray()

            async def reader() -> None:
                received.extend(await read_all(stream))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await send_in_chunks(stream, data)
                await stream.send_eof()  # our FIN -> the server's EOF -> its FIN -> our EOF
                with pytest.raises(trio.ClosedResourceError):
                    await stream.send_all(b"after eof")
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
            assert await stream.receive_some() == b""  # EOF is sticky
            stats = conn.stats()
            assert stats.bytes_sent > len(data)
            assert stats.bytes_received > len(data)
            assert stats.engine.min_rtt > 0


async def test_32mib_one_stream_ipv4(nursery: trio.Nursery) -> None:
    """Twice the connection window and 32 times the stream window, intact (speed is
    measured in benchmarks/, not here)."""
    server = await start_server(nursery, digest_handler)
    with trio.fail_after(40):
        await _upload(server.port, payload(32 << 20, seed=1))


async def test_2mib_over_ipv6(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, digest_handler, host="::1")
    with trio.fail_after(20):
        await _upload(server.port, payload(2 << 20, seed=2), host="::1")


async def test_three_concurrent_streams_no_crosstalk(echo_server: QuicServer) -> None:
    with trio.fail_after(20):
        async with open_quic_connection("127.0.0.1", echo_server.port, client_config()) as conn:

            async def exchange(index: int) -> None:
                stream = await conn.open_stream()
                data = payload(300_000 + index * 1000, seed=10 + index)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_then_eof, stream, data)
                    assert await read_all(stream) == data

            async def send_then_eof(stream: QuicStream, data: bytes) -> None:
                await send_in_chunks(stream, data, chunk=1000)  # small chunks interleave
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                for index in range(3):
                    nursery.start_soon(exchange, index)


async def test_2mib_through_hostile_link(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery, digest_handler)
    impairments = LinkConditionerConfig(
        loss=0.05, reorder=0.05, duplicate=0.02, delay=0.020, jitter=0.010
    )
    link = LinkConditioner(server.address, impairments, impairments, seed=7)
    await nursery.start(link.run)
    with trio.fail_after(600):  # virtual seconds
        await _upload(link.address[1], payload(2 << 20, seed=3))
    for stats in link.stats.values():
        assert stats.dropped > 0
        assert stats.duplicated > 0
        assert stats.reordered > 0


async def test_half_closeable_stream_conformance() -> None:
    server_streams: trio.MemorySendChannel[QuicStream]
    server_streams, accepted = trio.open_memory_channel[QuicStream](1)

    async def handler(connection: QuicConnection) -> None:
        while True:
            stream = await connection.accept_stream()
            assert await stream.receive_some(1) == b"!"  # the maker's opening byte
            await server_streams.send(stream)

    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, handler)
        async with open_quic_connection("127.0.0.1", server.port, client_config()) as conn:

            async def stream_maker() -> tuple[QuicStream, QuicStream]:
                client_stream = await conn.open_stream()
                await client_stream.send_all(b"!")
                return client_stream, await accepted.receive()

            with trio.fail_after(60):
                await trio.testing.check_half_closeable_stream(stream_maker, None)
        nursery.cancel_scope.cancel()


async def test_small_writes_share_datagrams(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, digest_handler)  # reads, answers only at EOF
    messages = [b"message %03d;" % index for index in range(200)]
    async with open_quic_connection("127.0.0.1", server.port, client_config()) as conn:
        stream = await conn.open_stream()
        before = conn.stats().datagrams_sent
        for message in messages:
            await stream.send_all(message)
        sent = conn.stats().datagrams_sent - before
        await stream.send_eof()
        assert await read_all(stream) == hashlib.sha256(b"".join(messages)).digest()
    # One datagram per write without coalescing (~200); ACKs arriving in between end a
    # coalescing round early, so allow a generous margin.
    assert sent < 100


async def test_an_answer_leaves_in_the_round_that_received_the_request(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transmits = collections.Counter[bool]()
    original = _engine.EngineConnection.datagrams_to_send

    def counting(self: _engine.EngineConnection, now: float) -> list[tuple[bytes, Any]]:
        transmits[self.configuration.is_client] += 1
        return original(self, now=now)

    monkeypatch.setattr(_engine.EngineConnection, "datagrams_to_send", counting)
    server = await start_server(nursery, echo_handler)
    async with open_quic_connection("127.0.0.1", server.port, client_config()) as connection:
        stream = await connection.open_stream()
        await stream.send_all(b"warm-up")
        assert await stream.receive_some() == b"warm-up"
        transmits.clear()
        for index in range(50):
            request = b"request %d" % index
            await stream.send_all(request)
            assert await stream.receive_some() == request
        server_transmits = transmits[False]
    # Each request (which also acknowledges the previous answer) is answered, and
    # acknowledged, by one transmit of the server: not one for the ACK and one for the echo.
    assert server_transmits <= 52


@pytest.mark.parametrize("passes", [0, 15], ids=["at once", "after the round ended"])
async def test_a_reader_that_flushes_is_acknowledged_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, passes: int
) -> None:
    """A reader that needs no answer says so, and the transport acknowledges what it read
    at once instead of waiting out its ACK delay (1 ms); also when it says so only after
    more scheduler passes than the transport waits for an answer."""

    async def handler(connection: QuicConnection) -> None:
        stream = await connection.accept_stream()
        while await stream.receive_some():
            for _ in range(passes):
                await trio.lowlevel.checkpoint()
            stream.request_flush()
        await stream.aclose()

    server = await start_server(nursery, handler)
    async with open_quic_connection("127.0.0.1", server.port, client_config()) as connection:
        stream = await connection.open_stream()
        for _ in range(5):
            started = trio.current_time()
            await stream.send_all(b"ping")
            await connection.wait_acknowledged([stream])
            assert trio.current_time() - started < 0.0005
            await trio.sleep(1.0)  # a quiet link: no other packet to carry the ACK
        await stream.send_eof()


async def test_a_hint_on_one_stream_does_not_cut_short_the_writes_of_another(
    nursery: trio.Nursery,
) -> None:
    """A task that flushes its own stream after each write (a heartbeat, say) leaves the
    rounds of a busy writer on another stream to coalesce as usual."""
    server = await start_server(nursery, digest_handler)
    async with open_quic_connection("127.0.0.1", server.port, client_config()) as conn:
        busy, hinting = await conn.open_stream(), await conn.open_stream()
        messages = [b"message %03d;" % index for index in range(100)]
        before = conn.stats().datagrams_sent

        async def write_busily() -> None:
            for message in messages:
                await busy.send_all(message)

        async def write_and_hint() -> None:
            for _ in range(100):
                await hinting.send_all(b"h")
                hinting.request_flush()

        async with trio.open_nursery() as writers:
            writers.start_soon(write_busily)
            writers.start_soon(write_and_hint)
        sent = conn.stats().datagrams_sent - before
        for stream in (busy, hinting):
            await stream.send_eof()
        assert await read_all(busy) == hashlib.sha256(b"".join(messages)).digest()
        assert await read_all(hinting) == hashlib.sha256(b"h" * 100).digest()
    # 4-5 datagrams here; a round ended by every hint made ~70 (ACKs arriving in between
    # end some rounds early).
    assert sent < 30
