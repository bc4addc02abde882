"""Sessions end to end on loopback: the design review's scenarios and the session contract."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import theta
import theta._asset_channel
from theta import ErrorCode, HandshakeRejected, Role, Session, SessionClosed, _client
from theta._quic import ConnectionClosedByPeer, ConnectionStats, QuicConnection, QuicStream
from theta.core import ClientHandshake, FrameLimits, HeartbeatMetrics, ReplicationMessage
from theta.testing import LinkConditioner, LinkConditionerConfig

from .helpers import (
    SessionEnds,
    client_config,
    echo,
    session_task_names,
    start_server,
    tasks_left_after,
)


async def wait_for_heartbeat(session: Session) -> theta.TransportDiagnostics:
    """The first diagnostics snapshot with an RTT sample."""
    async for snapshot in session.watch_diagnostics(0.005):
        if snapshot.rtt_latest is not None:
            return snapshot
    raise AssertionError("session closed before any heartbeat round trip")


async def test_quic_handshake_and_heartbeat_updates_metrics(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    with trio.fail_after(5):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            with trio.fail_after(0.25):
                async for snapshot in session.watch_diagnostics(0.005):
                    if snapshot.heartbeats_received and snapshot.heartbeats_sent:
                        break
            assert snapshot.datagrams_sent > 0
            assert snapshot.datagrams_received > 0
            snapshot = await wait_for_heartbeat(session)  # the first echo: one interval later
            assert snapshot.heartbeats_sent >= 1
            assert snapshot.heartbeats_received >= 1
            assert snapshot.rtt_latest is not None
            assert snapshot.rtt_latest >= 0
            assert snapshot.jitter is not None
            assert snapshot.jitter >= 0
            assert snapshot.datagrams_sent > 0
            assert snapshot.datagrams_received > 0
            assert snapshot.bytes_sent > 0
            assert snapshot.bytes_received > 0
            assert snapshot.compression_ratio is None  # nothing compressed yet


async def test_a_server_validating_every_address_serves_sessions(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo, address_validation="always")
    with trio.fail_after(5):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.replication.send(b"after a Retry", tick=1)
            assert (await session.replication.receive()).payload == b"after a Retry"
    assert server._transport.retries_sent == 1


async def test_handshake_validates_protocol_version(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(nursery, echo)
    monkeypatch.setattr(
        "theta._client.ClientHandshake", functools.partial(ClientHandshake, protocol_version=2)
    )
    with trio.fail_after(5), pytest.raises(HandshakeRejected) as info:
        async with theta.connect("127.0.0.1", server.port, client_config()):
            pytest.fail("the session must not be established")
    assert info.value.code is ErrorCode.VERSION_MISMATCH
    assert info.value.server_protocol_version == 1


async def test_handshake_validates_schema_hash(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo, manifest={"Position": "x:f32,y:f32,z:f32"})
    config = client_config(manifest={"Position": "x:f64,y:f64,z:f64"})
    with trio.fail_after(5), pytest.raises(HandshakeRejected) as info:
        async with theta.connect("127.0.0.1", server.port, config):
            pytest.fail("the session must not be established")
    assert info.value.code is ErrorCode.SCHEMA_MISMATCH
    assert info.value.server_schema_hash == theta.core.schema_hash(
        {"Position": "x:f32,y:f32,z:f32"}
    )
    assert "SCHEMA_MISMATCH" in str(info.value)


async def test_capability_negotiation_filters_unsupported(nursery: trio.Nursery) -> None:
    seen: list[tuple[int, ...]] = []

    async def handler(session: Session) -> None:
        seen.append(session.negotiated_capabilities)
        await echo(session)

    server = await start_server(nursery, handler, capabilities=(1, 2, 3))
    with trio.fail_after(5):
        async with theta.connect(
            "127.0.0.1", server.port, client_config(capabilities=(2, 4, 5))
        ) as session:
            assert session.negotiated_capabilities == (2,)
        while not seen:  # the close does not wait for the server's handler to start
            await trio.testing.wait_all_tasks_blocked()
    assert seen == [(2,)]


async def test_handshake_exchanges_public_keys(nursery: trio.Nursery) -> None:
    server_side: list[Session] = []

    async def handler(session: Session) -> None:
        server_side.append(session)
        await echo(session)

    server = await start_server(nursery, handler)
    with trio.fail_after(5):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.replication.send(b"sync", tick=1)
            await session.replication.receive()  # the handler has run by now
            (peer,) = server_side
            assert len(session.public_key) == len(session.peer_public_key) == 32
            assert session.peer_public_key == peer.public_key
            assert peer.peer_public_key == session.public_key
            assert session.session_id == peer.session_id != 0
            assert session.role == peer.role == Role.REPLICATE | Role.UPLOAD_ASSETS
            assert peer.peer_address[1] != server.port


async def test_one_server_key_per_server_and_a_fresh_client_key_per_session(
    nursery: trio.Nursery,
) -> None:
    server = await start_server(nursery, echo)
    seen: list[tuple[bytes, bytes]] = []
    with trio.fail_after(5):
        for _ in range(2):
            async with theta.connect("127.0.0.1", server.port, client_config()) as session:
                seen.append((session.public_key, session.peer_public_key))
    (first_client, first_server), (second_client, second_server) = seen
    assert first_server == second_server
    assert first_client != second_client
    other = await start_server(nursery, echo)
    with trio.fail_after(5):
        async with theta.connect("127.0.0.1", other.port, client_config()) as session:
            assert session.peer_public_key != first_server


async def test_multiple_clients_receive_heartbeats_independently(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    session_ids = set()
    for _ in range(2):
        with trio.fail_after(5):
            async with theta.connect("127.0.0.1", server.port, client_config()) as session:
                snapshot = await wait_for_heartbeat(session)
                assert snapshot.heartbeats_received >= 1
                session_ids.add(session.session_id)
    assert len(session_ids) == 2


async def test_assets_stream_transfers_large_payloads(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    payload = os.urandom(2 * 1024 * 1024)
    progress: list[int] = []
    with trio.fail_after(20):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            asset_id = await session.assets.send(
                "world.bin", payload, progress=lambda sent, total: progress.append(sent)
            )
            await session.assets.finish()
            echoed = await session.assets.receive()
            assert (echoed.name, len(echoed.data)) == ("world.bin", len(payload))
            assert hashlib.sha256(echoed.data).digest() == hashlib.sha256(payload).digest()
            with pytest.raises(trio.EndOfChannel):
                await session.assets.receive()  # the server finished after echoing
    assert asset_id == 1
    assert progress[-1] == len(payload)
    assert progress == sorted(progress)


async def test_an_asset_given_as_a_view_of_wider_items_is_sized_in_bytes(
    nursery: trio.Nursery,
) -> None:
    server = await start_server(nursery, echo)
    samples = memoryview(array.array("d", range(1000)))  # 8,000 bytes in 1,000 items
    totals: list[int] = []
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.assets.send(
                "samples", samples, total_size=8000, progress=lambda _, total: totals.append(total)
            )
            echoed = await session.assets.receive()
    assert echoed.data == samples.tobytes()
    assert set(totals) == {8000}


async def test_streamed_asset_from_async_iterable(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    pieces = [os.urandom(n) for n in (1, 70_000, 0, 5, 200_000)]

    async def produce() -> object:
        for piece in pieces:
            yield piece

    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.assets.send("stream.bin", produce(), total_size=sum(map(len, pieces)))  # type: ignore[arg-type]
            echoed = await session.assets.receive()
            assert echoed.data == b"".join(pieces)


async def _send_concurrently_and_collect_echoes(
    port: int, assets: dict[str, bytes], config: theta.ClientConfig | None = None
) -> dict[str, bytes]:
    """Send every asset at once (1 KiB chunks) to an echo server; the assets echoed."""
    config = dataclasses.replace(config or client_config(), asset_chunk_size=1024)
    with trio.fail_after(20):
        async with theta.connect("127.0.0.1", port, config) as session:
            async with trio.open_nursery() as senders:
                for name, data in assets.items():
                    senders.start_soon(session.assets.send, name, data)
            echoed = [await session.assets.receive() for _ in assets]
    return {asset.name: asset.data for asset in echoed}


async def test_more_concurrent_assets_than_a_receiver_tracks_wait_their_turn(
    nursery: trio.Nursery,
) -> None:
    """A receiver with theta's defaults tracks 64 unfinished assets: the 65th of 70
    concurrent sends starts once one is complete, instead of the session closing."""
    server = await start_server(nursery, echo)
    assets = {f"a{index}": os.urandom(3000) for index in range(70)}  # three chunks each
    assert await _send_concurrently_and_collect_echoes(server.port, assets) == assets


async def test_concurrent_assets_stay_within_a_receivers_byte_budget(
    nursery: trio.Nursery,
) -> None:
    """The declared sizes of unfinished assets stay within the receiver's budget when it is
    set alike on both sides (or is the default): sends beyond it wait."""
    server = await start_server(nursery, echo, max_buffered_asset_bytes=10_000)
    assets = {f"b{index}": os.urandom(4000) for index in range(6)}
    config = client_config(max_buffered_asset_bytes=10_000)
    assert await _send_concurrently_and_collect_echoes(server.port, assets, config) == assets


class _HeldRoom:
    """Room for one unfinished asset only, taken by an asset whose first chunk goes out
    and whose rest never comes (so it stays unfinished for the session's life)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(theta._asset_channel, "_PEER_MAX_UNFINISHED", 1)
        self.taken = trio.Event()

    async def _data(self) -> AsyncIterator[bytes]:
        yield bytes(2000)
        self.taken.set()
        await trio.sleep_forever()

    async def take(self, session: Session, nursery: trio.Nursery) -> None:
        """Start the held asset's send in ``nursery``; return once it holds the room."""

        async def send() -> None:
            with contextlib.suppress(SessionClosed):
                await session.assets.send("held", self._data(), total_size=4000)

        nursery.start_soon(send)
        await self.taken.wait()


async def test_a_send_reaching_the_wait_for_room_after_the_close_raises(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An iterable's first piece arriving after the close, with no room (an asset left
    unfinished by the close holds it): SessionClosed, not a wait nobody ends."""
    room = _HeldRoom(monkeypatch)
    server = await start_server(nursery, echo)
    closed = trio.Event()

    async def late() -> AsyncIterator[bytes]:
        await closed.wait()
        yield bytes(3000)

    config = client_config(asset_chunk_size=1024)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, config) as session:
            await room.take(session, nursery)
            async with trio.open_nursery() as late_sender:

                async def send_late() -> None:
                    with pytest.raises(SessionClosed):
                        await session.assets.send("late", late(), total_size=3000)

                late_sender.start_soon(send_late)
                await trio.testing.wait_all_tasks_blocked()
                await session.close()
                await trio.testing.wait_all_tasks_blocked()  # the session's tasks are gone
                closed.set()


async def test_sends_given_up_while_waiting_for_room_leave_nothing_behind(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends timing out behind a waiter that cannot move (the room is held by an asset
    that stays unfinished) do not pile up in the queue."""
    room = _HeldRoom(monkeypatch)
    server = await start_server(nursery, echo)
    config = client_config(asset_chunk_size=1024)
    with trio.fail_after(10):
        async with (
            theta.connect("127.0.0.1", server.port, config) as session,
            trio.open_nursery() as senders,
        ):
            await room.take(session, senders)
            senders.start_soon(session.assets.send, "waiting", bytes(3000))
            await trio.testing.wait_all_tasks_blocked()
            for index in range(200):
                with trio.move_on_after(0):
                    await session.assets.send(f"given-up-{index}", bytes(3000))
            assert len(session.assets._waiting) <= 2
            senders.cancel_scope.cancel()


async def test_a_large_asset_waiting_for_room_is_not_overtaken(nursery: trio.Nursery) -> None:
    """Sends wait for room in turn: a small asset that would fit next to the unfinished one
    still waits behind a large one that does not."""
    server = await start_server(nursery, echo, max_buffered_asset_bytes=10_000)
    release = trio.Event()

    async def held(data: bytes) -> AsyncIterator[bytes]:
        yield data[:3000]
        await release.wait()
        yield data[3000:]

    async def send(session: Session, name: str, data: bytes, streamed: bool = False) -> None:
        if streamed:
            await session.assets.send(name, held(data), total_size=len(data))
        else:
            await session.assets.send(name, data)

    config = client_config(asset_chunk_size=1024, max_buffered_asset_bytes=10_000)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, config) as session:
            async with trio.open_nursery() as senders:
                senders.start_soon(send, session, "held", bytes(6000), True)
                await trio.testing.wait_all_tasks_blocked()
                senders.start_soon(send, session, "large", bytes(8000))
                await trio.testing.wait_all_tasks_blocked()
                senders.start_soon(send, session, "small", bytes(2000))
                await trio.testing.wait_all_tasks_blocked()
                release.set()
            order = [(await session.assets.receive()).name for _ in range(3)]
    assert order == ["held", "large", "small"]


@pytest.mark.parametrize("size", [10, 3000])
async def test_an_iterable_ending_with_an_empty_piece_sends_the_whole_asset(
    nursery: trio.Nursery, size: int
) -> None:
    server = await start_server(nursery, echo)

    async def pieces() -> AsyncIterator[bytes]:
        yield b"a" * size
        yield b""

    config = client_config(asset_chunk_size=1024)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, config) as session:
            await session.assets.send("x", pieces(), total_size=size)
            echoed = await session.assets.receive()
            await session.assets.finish()
    assert (echoed.name, echoed.data) == ("x", b"a" * size)


async def test_a_send_waiting_for_room_ends_with_the_session(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    room = _HeldRoom(monkeypatch)
    server = await start_server(nursery, echo)
    with trio.fail_after(10):
        async with theta.connect(
            "127.0.0.1", server.port, client_config(asset_chunk_size=1024)
        ) as session:
            await room.take(session, nursery)
            async with trio.open_nursery() as closer:
                closer.start_soon(session.close)
                with pytest.raises(SessionClosed):
                    await session.assets.send("waiting", bytes(3000))


async def test_an_iterable_yielding_more_than_total_size_delivers_nothing(
    nursery: trio.Nursery,
) -> None:
    """The asset is complete only once the iterable has ended: bytes beyond total_size
    raise ValueError before the last chunk goes out, so a retry cannot deliver it twice."""
    server = await start_server(nursery, echo)

    async def too_much() -> AsyncIterator[bytes]:
        yield b"a" * 10
        yield b"b" * 5

    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            with pytest.raises(ValueError, match="15 bytes fed exceed its total_size of 10"):
                await session.assets.send("too-much", too_much(), total_size=10)
            await session.assets.send("after", b"x")
            assert (await session.assets.receive()).name == "after"


async def test_an_async_progress_callback_is_awaited(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    reported: list[int] = []

    async def progress(sent: int, total: int) -> None:
        await trio.lowlevel.checkpoint()
        reported.append(sent)

    with trio.fail_after(10):
        async with theta.connect(
            "127.0.0.1", server.port, client_config(asset_chunk_size=1024)
        ) as session:
            await session.assets.send("p", bytes(2500), progress=progress)
    assert reported == [1024, 2048, 2500]


async def test_receive_refuses_an_asset_whose_first_chunk_receive_chunk_took(
    nursery: trio.Nursery,
) -> None:
    server = await start_server(nursery, echo, asset_chunk_size=1024)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.assets.send("two", bytes(2000))
            first = await session.assets.receive_chunk()
            assert first.first
            assert not first.complete
            with pytest.raises(RuntimeError, match="first chunk was taken by receive_chunk"):
                await session.assets.receive()


async def test_replication_round_trip_with_compression(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            assert theta.CAP_ZSTD in session.negotiated_capabilities
            for tick in range(1, 21):
                await session.replication.send(b"position=%d;" % tick * 40, tick=tick)
            for tick in range(1, 21):
                message = await session.replication.receive()
                assert message == ReplicationMessage(tick, 0, b"position=%d;" % tick * 40, 0)
            ratio = session.diagnostics().compression_ratio
            assert ratio is not None
            assert ratio > 2


async def test_heartbeat_tasks_stop_after_connection_drop(nursery: trio.Nursery) -> None:
    dropped = trio.Event()

    async def drop(session: Session) -> None:
        session._connection.close_nowait(ErrorCode.INTERNAL_ERROR, "dropped")
        dropped.set()
        await trio.sleep_forever()

    server = await start_server(nursery, drop)

    async def scenario() -> None:
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            closed = await session.wait_closed()
            assert closed.by_peer
            assert closed.code == ErrorCode.INTERNAL_ERROR
            await trio.testing.wait_all_tasks_blocked()
            # The heartbeat sender and receiver (and every other session task) are gone
            # while the application still holds the session: only the block's task is left.
            assert session_task_names() == []
            with pytest.raises(SessionClosed):
                await session.replication.send(b"x", tick=1)

    with trio.fail_after(5):
        assert await tasks_left_after(scenario) == 0
    await dropped.wait()


async def test_every_session_task_gone_after_teardown(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)

    async def scenario() -> None:
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await wait_for_heartbeat(session)
            assert len(session_task_names()) >= 5

    with trio.fail_after(5):
        assert await tasks_left_after(scenario) == 0
    with trio.fail_after(5):
        while server.sessions:  # the server side sees the close too
            await trio.testing.wait_all_tasks_blocked()


async def test_data_sent_before_a_graceful_close_is_delivered(nursery: trio.Nursery) -> None:
    received: list[int] = []
    done = trio.Event()

    async def sink(session: Session) -> None:
        async for message in session.replication:
            received.append(message.tick)
        done.set()

    server = await start_server(nursery, sink)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            for tick in range(1, 201):
                await session.replication.send(b"%d" % tick * 100, tick=tick)
        await done.wait()
    assert received == list(range(1, 201))


@pytest.fixture
def short_close_grace(monkeypatch: pytest.MonkeyPatch) -> float:
    """Closing gives up after 0.2 s without progress (1 s by default)."""
    monkeypatch.setattr(theta._session, "_CLOSE_GRACE", 0.2)
    return 0.2


class _SlowSink:
    """A server handler taking replication messages at ≥ 0.5 ms each until the client's
    direction ends, then recording how the session ended."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.ends = SessionEnds()

    async def handler(self, session: Session) -> None:
        async for message in session.replication:
            self.received.append(message.tick)
            await trio.sleep(0.0005)  # a slow consumer
        await self.ends.handler(session)


async def test_a_slow_handler_gets_everything_sent_before_the_close(
    nursery: trio.Nursery, short_close_grace: float
) -> None:
    """The client sends 1.2 MB (beyond the server's 1 MiB window) and leaves at once; the
    handler takes ≥ 0.5 ms per message, ≥ 0.3 s in all: longer than the close grace, but
    the data keeps moving, so both sides wait for it."""
    sink = _SlowSink()
    server = await start_server(nursery, sink.handler)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.replication.send_many([(tick, os.urandom(2000)) for tick in range(600)])
        (seen,) = await sink.ends.wait()
    assert sink.received == list(range(600))
    assert seen.code == ErrorCode.NO_ERROR


async def test_a_second_close_waits_for_the_first_to_deliver(
    nursery: trio.Nursery, short_close_grace: float
) -> None:
    """Two tasks close the session at once while a slow handler still reads: the second
    close must not cut short the first one's wait for what was sent."""
    sink = _SlowSink()
    server = await start_server(nursery, sink.handler)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.replication.send_many([(tick, os.urandom(2000)) for tick in range(1000)])
            async with trio.open_nursery() as closers:
                closers.start_soon(session.close)
                while not session._connection._acknowledged_waiters:  # the first one waits
                    await trio.lowlevel.checkpoint()
                closers.start_soon(session.close)
        (seen,) = await sink.ends.wait()
    assert sink.received == list(range(1000))
    assert seen.code == ErrorCode.NO_ERROR


async def test_close_stops_a_blocked_send_and_still_ends_every_channel(
    nursery: trio.Nursery, short_close_grace: float
) -> None:
    """A send waits for flow control when another task closes the session: the send stops
    between frames with SessionClosed, what it had written is delivered, and both
    channels end cleanly for the peer (the blocked send used to hold the channel past
    the close's grace, so neither channel got its end of stream)."""
    outcome: dict[str, object] = {}
    received: list[int] = []
    done = trio.Event()

    async def slow_reader(session: Session) -> None:
        await session.wait_closed()  # the client's SessionClose: start reading now
        for name, channel in (("replication", session.replication), ("assets", session.assets)):
            try:
                async for message in channel:
                    if isinstance(message, ReplicationMessage):
                        received.append(message.tick)
                        await trio.sleep(0.0005)  # a slow consumer
                outcome[name] = "ended"
            except SessionClosed as error:
                outcome[name] = error
        done.set()

    server = await start_server(nursery, slow_reader)
    batch = [(tick, bytes(2000)) for tick in range(3000)]
    with trio.fail_after(20):
        async with theta.connect(
            "127.0.0.1", server.port, client_config(capabilities=())
        ) as session:

            async def sender() -> None:
                try:
                    await session.replication.send_many(batch)
                    outcome["send_many"] = "returned"
                except SessionClosed as error:
                    outcome["send_many"] = error

            async with trio.open_nursery() as inner:
                inner.start_soon(sender)
                stream = session.replication._framed.stream
                while not stream._writable.statistics().tasks_waiting:  # blocked sender
                    await trio.testing.wait_all_tasks_blocked()
                await session.close()
        await done.wait()
    assert (outcome["replication"], outcome["assets"]) == ("ended", "ended"), outcome
    stopped = outcome["send_many"]
    assert isinstance(stopped, SessionClosed), outcome
    assert (stopped.code, stopped.by_peer) == (ErrorCode.NO_ERROR, False)
    assert 0 < len(received) < 3000
    assert received == list(range(len(received)))


async def test_close_ends_the_assets_channel_when_queued_asset_sends_wrote_nothing(
    nursery: trio.Nursery, short_close_grace: float
) -> None:
    """Asset sends waiting for the channel when the session closes count as started but
    write nothing once the close refuses writes: the channel still gets its end."""
    outcome: dict[str, object] = {}
    done = trio.Event()

    async def late_reader(session: Session) -> None:
        await session.wait_closed()
        try:
            async for _ in session.assets:
                pass
            outcome["assets"] = "ended"
        except SessionClosed as error:
            outcome["assets"] = error
        done.set()

    server = await start_server(nursery, late_reader, receive_queue=1)  # stalls soon
    with trio.fail_after(20):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            framed = session.assets._framed
            writers = framed.stream._writable

            async def fill() -> None:  # one-chunk assets: never left half sent
                with contextlib.suppress(SessionClosed):
                    for index in itertools.count():
                        await session.assets.send(f"small {index}", bytes(60_000))

            async def big(index: int) -> None:
                with contextlib.suppress(SessionClosed):
                    await session.assets.send(f"big {index}", bytes(500_000))

            async with trio.open_nursery() as senders:
                senders.start_soon(fill)
                while not writers.statistics().tasks_waiting:  # flow control stalled it
                    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                for index in range(4):
                    senders.start_soon(big, index)
                while framed._send_lock.statistics().tasks_waiting < 4:
                    await trio.testing.wait_all_tasks_blocked()
                # Still stalled with the channel: the four have written nothing.
                assert writers.statistics().tasks_waiting == 1
                await session.close()
        with trio.fail_after(20):
            await done.wait()
    assert outcome["assets"] == "ended", outcome


async def test_the_peers_close_stops_a_blocked_send_so_the_handler_can_drain(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The handler is blocked sending to a client that does not read when the client
    closes, with part of what it sent still waiting for the server's credit (1.5 MB
    against a 1 MiB window): the send stops at the SessionClose, and the handler then
    takes everything the client sent (it used to stay blocked until the server gave up
    waiting for progress and cut the rest off)."""
    received: list[int] = []
    stopped: list[SessionClosed] = []
    drained = trio.Event()

    async def send_then_drain(session: Session) -> None:
        try:
            await session.replication.send_many([(tick, bytes(2000)) for tick in range(3000)])
        except SessionClosed as error:
            stopped.append(error)
        async for message in session.replication:
            received.append(message.tick)
        drained.set()

    server = await start_server(nursery, send_then_drain)
    config = client_config(capabilities=())
    with trio.fail_after(60):
        async with theta.connect("127.0.0.1", server.port, config) as session:
            await session.replication.send_many([(tick, bytes(2000)) for tick in range(750)])
        await drained.wait()
    assert [(error.code, error.by_peer) for error in stopped] == [(ErrorCode.NO_ERROR, True)]
    assert received == list(range(750))


async def test_the_receiver_of_a_close_raises_credit_in_small_steps(
    nursery: trio.Nursery,
) -> None:
    """A closing peer gives up a heartbeat timeout after its last acknowledgement; credit
    raised only every half window could look like a stalled reader."""
    eager: list[set[int]] = []
    ended = trio.Event()

    async def note_credit_policy(session: Session) -> None:
        await session.wait_closed()
        eager.append(set(session._connection._quic._theta_eager))
        ended.set()

    server = await start_server(nursery, note_credit_policy)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            data_streams = {
                channel._framed.stream.stream_id
                for channel in (session.replication, session.assets)
            }
        await ended.wait()
    assert eager == [data_streams]


async def test_data_the_application_never_took_is_reported(
    nursery: trio.Nursery, short_close_grace: float
) -> None:
    """The server sends more than the client's buffers hold and leaves; the client takes
    nothing for a while: its iteration then raises instead of ending quietly."""

    async def send_and_leave(session: Session) -> None:
        # Incompressible: 1.5 MB, beyond the client's 1 MiB window and queue, within what
        # its 1 MiB send buffer takes beyond that.
        await session.replication.send_many([(tick, os.urandom(1000)) for tick in range(1500)])

    # Closing, the server waits a heartbeat timeout for acknowledgements to advance: 1.5 s
    # here, three of the client's heartbeat intervals.
    server = await start_server(nursery, send_and_leave, heartbeat_timeout=1.5)
    taken: list[ReplicationMessage] = []

    async def take_all(session: Session) -> None:
        async for message in session.replication:
            taken.append(message)

    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            # Not taking anything: the server gives up waiting for acknowledgements.
            await session._connection.terminated.wait()
            with pytest.raises(SessionClosed) as info:
                await take_all(session)
    assert 0 < len(taken) < 1500
    assert (info.value.code, info.value.by_peer) == (ErrorCode.NO_ERROR, True)
    assert "before the peer finished its replication channel" in str(info.value.__notes__)


async def test_assets_iterate_until_the_peer_finishes(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            for index in range(3):
                await session.assets.send(f"asset-{index}", os.urandom(1000 * index))
            await session.assets.send("empty", b"")
            await session.assets.finish()
            names = [asset.name async for asset in session.assets]
    assert names == ["asset-0", "asset-1", "asset-2", "empty"]


async def test_sending_after_finish_is_a_local_error(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.replication.send(b"one", tick=1)
            await session.replication.finish()
            await session.replication.finish()  # again: nothing more happens
            await session.assets.finish()
            with pytest.raises(trio.ClosedResourceError, match="finished"):
                await session.replication.send(b"two", tick=2)
            with pytest.raises(trio.ClosedResourceError, match="finished"):
                await session.replication.send_many([(2, b"two")])
            with pytest.raises(trio.ClosedResourceError, match="finished"):
                await session.assets.send("late", b"data")
            # The session and the peer carry on: the echo still comes back.
            assert (await session.replication.receive()).payload == b"one"
            await wait_for_heartbeat(session)
            assert session.closed is None
        assert (await session.wait_closed()).code == ErrorCode.NO_ERROR


async def test_a_finish_cancelled_behind_a_blocked_send_can_be_retried(
    nursery: trio.Nursery,
) -> None:
    read_now, ended = trio.Event(), trio.Event()

    async def late_reader(session: Session) -> None:
        await read_now.wait()
        async for _ in session.replication:
            pass
        ended.set()  # the client's direction ended
        await session.wait_closed()

    server = await start_server(nursery, late_reader)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            batch = [(tick, os.urandom(2000)) for tick in range(1500)]  # beyond what QUIC holds
            async with trio.open_nursery() as inner:
                inner.start_soon(session.replication.send_many, batch)
                await trio.testing.wait_all_tasks_blocked(
                    cushion=0.05
                )  # blocked, holding the stream
                with trio.move_on_after(0.1) as waited:
                    await session.replication.finish()
                assert waited.cancelled_caught
                read_now.set()
            await session.replication.finish()  # the retry sends the FIN
            await ended.wait()


async def test_a_large_send_many_stays_within_the_send_bound(nursery: trio.Nursery) -> None:
    async def sink(session: Session) -> None:
        async for _ in session.replication:
            pass

    server = await start_server(nursery, sink)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.replication.send_many([(t, os.urandom(2000)) for t in range(3000)])
            stream = session.replication._framed.stream
            # Written in pieces of at most the mark, not as one 6 MB write.
            assert stream.max_unacked_bytes <= 2 * stream.send_high_water


async def test_send_arguments_are_checked(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            with pytest.raises(TypeError, match="bytes-like, not int"):
                await session.replication.send(5, tick=1)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="bytes-like, not str"):
                await session.replication.send_many([(1, "text")])  # type: ignore[list-item]
            with pytest.raises(TypeError, match="name is a str"):
                await session.assets.send(b"name", b"data")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="bytes-like or an async iterable"):
                await session.assets.send("name", "text")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="total_size 99 != 3"):
                await session.assets.send("name", b"abc", total_size=99)
            assert session.closed is None  # a bad argument never ends the session
            await session.close()
            with pytest.raises(SessionClosed):
                await session.replication.finish()


async def test_server_unreachable() -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as silent:
        await silent.bind(("127.0.0.1", 0))  # bound, never answers
        port = silent.getsockname()[1]
        with trio.fail_after(5), pytest.raises(theta.ServerUnreachable) as info:
            async with theta.connect("127.0.0.1", port, client_config(handshake_timeout=0.3)):
                pytest.fail("nothing should answer")
    assert isinstance(info.value, theta.HandshakeTimeout)
    assert info.value.code is ErrorCode.HANDSHAKE_TIMEOUT


async def test_a_server_that_answered_too_slowly_is_not_unreachable(
    nursery: trio.Nursery,
) -> None:
    server = await start_server(nursery, echo)
    answered = 0

    def after_the_first(_: bytes) -> bool:
        nonlocal answered
        answered += 1
        return answered > 1

    link = LinkConditioner(server.address, to_client=LinkConditionerConfig(drop=after_the_first))
    await nursery.start(link.run)
    config = client_config(handshake_timeout=0.5)
    with trio.fail_after(5), pytest.raises(theta.HandshakeTimeout) as info:
        async with theta.connect("127.0.0.1", link.address[1], config):
            pytest.fail("the handshake cannot complete")
    assert not isinstance(info.value, theta.ServerUnreachable)
    assert "within 0.5 s" in str(info.value)


def test_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval"):
        client_config(heartbeat_interval=5.0, heartbeat_timeout=5.0)
    with pytest.raises(ValueError, match="capability"):
        client_config(capabilities=(2**32,))
    with pytest.raises(ValueError, match="asset_chunk_size"):
        client_config(asset_chunk_size=0)
    config = client_config(manifest={"A": "x:f32"})
    assert config.schema_hash == theta.core.schema_hash({"A": "x:f32"})


async def test_send_many_delivers_a_batch_in_order(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.replication.send_many([])  # nothing to send: no-op
            batch = [(tick, b"delta %d" % tick * (tick % 7)) for tick in range(1, 301)]
            await session.replication.send_many(batch)
            received = [await session.replication.receive() for _ in batch]
            assert [(m.tick, m.payload) for m in received] == batch
            with pytest.raises(ValueError, match="limit"):
                await session.replication.send_many([(1, b"ok"), (2, bytes(2 << 20))])
            await session.replication.send(b"after", tick=999)
            assert (await session.replication.receive()).tick == 999  # nothing half-sent


async def test_server_heartbeat_answers_and_acknowledges_in_one_datagram(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery, Session.wait_closed)
    async with theta.connect("127.0.0.1", server.port, client_config()) as session:
        await trio.sleep(2.25)  # virtual seconds, between two heartbeats; aligned by now
        before = session.diagnostics()
        await trio.sleep(10.0)
        after = session.diagnostics()
    heartbeats_in = after.heartbeats_received - before.heartbeats_received
    heartbeats_out = after.heartbeats_sent - before.heartbeats_sent
    assert heartbeats_out == 20
    assert heartbeats_in in (19, 20, 21)
    # Per period: the client's heartbeat; the server's, which acknowledges it in the same
    # datagram; the client's acknowledgement of that. Nothing else.
    assert after.datagrams_received - before.datagrams_received == heartbeats_in
    assert after.datagrams_sent - before.datagrams_sent == heartbeats_out + heartbeats_in


@pytest.mark.parametrize("send_first", [False, True])
async def test_close_waits_only_for_application_data(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, send_first: bool
) -> None:
    seen: list[SessionClosed] = []
    received: list[bytes] = []
    handled = trio.Event()

    async def handler(session: Session) -> None:
        async for message in session.replication:
            received.append(message.payload)
        seen.append(await session.wait_closed())
        handled.set()

    server = await start_server(nursery, handler)
    one_way = LinkConditionerConfig(delay=0.05)  # virtual seconds: a 100 ms round trip
    link = LinkConditioner(server.address, one_way, one_way, seed=1)
    await nursery.start(link.run)
    async with theta.connect("127.0.0.1", link.address[1], client_config()) as session:
        if send_first:
            await session.replication.send(b"last words", tick=1)
        started = trio.current_time()
        await session.close(ErrorCode.GOING_AWAY, "bye")
        took = trio.current_time() - started
    # Application data is acknowledged before the QUIC close (one round trip); without
    # any, the SessionClose and the QUIC close leave at once.
    assert (took > 0.099) if send_first else (took < 0.01), took
    with trio.fail_after(5):
        await handled.wait()
    assert received == ([b"last words"] if send_first else [])
    assert (seen[0].code, seen[0].reason, seen[0].by_peer) == (ErrorCode.GOING_AWAY, "bye", True)


async def test_sessions_left_at_once_still_reach_the_server(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # The confirm, the channels and the close are written just before the QUIC close:
    # the last flush must not leave any of them to the pacer (nothing is sent after it).
    ends = SessionEnds()
    server = await start_server(nursery, ends.handler)
    for _ in range(3):
        async with theta.connect("127.0.0.1", server.port, client_config()):
            pass
    with trio.fail_after(5):
        seen = await ends.wait(3)
    assert [(closed.code, closed.by_peer) for closed in seen] == [(ErrorCode.NO_ERROR, True)] * 3


async def test_server_keeps_its_interval_with_a_slower_client(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery, Session.wait_closed)  # heartbeat interval 0.5 s
    slow = client_config(heartbeat_interval=2.0, heartbeat_timeout=10.0)
    async with theta.connect("127.0.0.1", server.port, slow) as session:
        await trio.sleep(1.0)
        before = session.diagnostics().heartbeats_received
        await trio.sleep(20.0)
        received = session.diagnostics().heartbeats_received - before
    # Every 0.5 s, but for the one gap that re-aligns on each client heartbeat.
    assert 36 <= received <= 41


async def test_close_on_a_lossy_path_waits_for_its_session_close(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ends = SessionEnds()
    drops = {"heartbeat": 0, "any": 0}

    def drop(datagram: bytes) -> bool:  # client to server
        if drops["heartbeat"] and len(datagram) > 60:  # not an ACK-only datagram
            drops["heartbeat"] -= 1
            return True
        if drops["any"]:
            drops["any"] -= 1
            return True
        return False

    server = await start_server(nursery, ends.handler)
    link = LinkConditioner(
        server.address,
        LinkConditionerConfig(delay=0.01, drop=drop),
        LinkConditionerConfig(delay=0.01),
    )
    await nursery.start(link.run)
    async with theta.connect("127.0.0.1", link.address[1], client_config()) as session:
        drops["heartbeat"] = 1  # the path loses one heartbeat (QUIC repairs it)
        await trio.sleep(2.0)
        engine = session._connection.stats().engine
        assert engine.lost_packets + engine.probe_timeouts > 0
        drops["any"] = 2  # ... and then the whole closing flight
        await session.close(ErrorCode.GOING_AWAY, "bye")
    with trio.fail_after(3):  # well before the server's 5 s heartbeat timeout
        seen = await ends.wait()
    assert (seen[0].code, seen[0].reason, seen[0].by_peer) == (ErrorCode.GOING_AWAY, "bye", True)


def _as_if_it_had_needed_a_probe(connection: QuicConnection) -> None:
    """Make ``connection``'s statistics report one probe timeout (the session's close then
    waits for its SessionClose to be acknowledged too)."""
    real_stats = connection.stats

    def stats_after_a_probe() -> ConnectionStats:
        stats = real_stats()
        engine = dataclasses.replace(stats.engine, probe_timeouts=1)
        return dataclasses.replace(stats, engine=engine)

    connection.stats = stats_after_a_probe  # type: ignore[method-assign]


async def test_a_close_on_a_path_that_needed_probes_reports_nothing_false(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """After retransmissions the closing side waits for its SessionClose to be
    acknowledged too; the peer answers the close with its own as soon as it has read
    everything, and its ACK must not be overtaken by that close (which used to end the
    wait with the SessionClose counted as abandoned)."""
    server = await start_server(nursery, echo)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.replication.send(b"x" * 5000, tick=1)
            await session.replication.receive()
            connection = session._connection
            _as_if_it_had_needed_a_probe(connection)
    assert not [r.message for r in caplog.records if r.levelno >= logging.WARNING]


async def test_the_peer_closing_first_settles_the_session_close(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load the peer's ACK of our SessionClose can arrive after its own close (seen
    when 500 sessions close at once): the control stream then still shows unacknowledged
    bytes, but the peer has closed, so nothing was abandoned."""
    server = await start_server(nursery, echo)

    async def until_the_peer_closes(self: QuicConnection, streams: object = None) -> None:
        await self.terminated.wait()

    def control_bytes_never_acknowledged(self: QuicStream) -> int:
        return 60 if self.stream_id == 0 else 0

    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            connection = session._connection
            _as_if_it_had_needed_a_probe(connection)
            monkeypatch.setattr(QuicConnection, "wait_acknowledged", until_the_peer_closes)
            monkeypatch.setattr(QuicStream, "unacked_bytes", control_bytes_never_acknowledged)
    assert isinstance(connection.error, ConnectionClosedByPeer)
    assert not [r.message for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("peer_code", "reported"), [(0, False), (12, True)])
async def test_only_a_peer_echoing_our_code_settles_the_session_close(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    peer_code: int,
    reported: bool,
) -> None:
    """A peer that closed with another code may never have seen our SessionClose."""
    server = await start_server(nursery, echo)

    async def at_once(self: QuicConnection, streams: object = None) -> None:
        await trio.lowlevel.checkpoint()

    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            connection = session._connection
            with monkeypatch.context() as patches:
                patches.setattr(QuicConnection, "wait_acknowledged", at_once)
                patches.setattr(QuicStream, "unacked_bytes", lambda self: 60)
                patches.setattr(connection, "error", ConnectionClosedByPeer(peer_code, ""))
                patches.setattr(session, "_closed", SessionClosed(0, "", by_peer=False))
                await session._wait_acknowledged([session._control.stream], patient=True)
    warned = [r.message for r in caplog.records if "not acknowledged" in r.message]
    assert bool(warned) is reported


async def test_the_smallest_control_limit_allowed_takes_the_largest_hello(
    nursery: trio.Nursery,
) -> None:
    server = await start_server(nursery, echo, frame_limits=FrameLimits(control=4504))
    config = client_config(capabilities=range(2**32 - 64, 2**32), auth_token=b"t" * 4096)
    with trio.fail_after(5):
        async with theta.connect("127.0.0.1", server.port, config) as session:
            await session.replication.send(b"in", tick=1)
            assert (await session.replication.receive()).payload == b"in"


async def test_the_smallest_client_control_limit_takes_the_largest_frames_servers_send(
    nursery: trio.Nursery,
) -> None:
    """The largest SessionAcknowledge (64 capabilities granted) and the largest SessionClose
    (a reason cut to 1 KiB) both fit the smallest control limit a client accepts."""

    async def close_with_a_long_reason(session: Session) -> None:
        await session.close(ErrorCode.GOING_AWAY, "é" * 1000)

    capabilities = range(2**32 - 64, 2**32)  # all 64 granted
    server = await start_server(nursery, close_with_a_long_reason, capabilities=capabilities)
    config = client_config(capabilities=capabilities, frame_limits=FrameLimits(control=1080))
    with trio.fail_after(5):
        async with theta.connect("127.0.0.1", server.port, config) as session:
            assert len(session.negotiated_capabilities) == 64
            closed = await session.wait_closed()
    assert (closed.code, closed.by_peer) == (ErrorCode.GOING_AWAY, True)
    assert closed.reason == "é" * 512


async def test_chunks_fit_a_lower_assets_limit_set_alike_on_both_sides(
    nursery: trio.Nursery,
) -> None:
    limits = FrameLimits(assets=64 * 1024)  # below a default chunk and its frame
    server = await start_server(nursery, echo, frame_limits=limits)
    with trio.fail_after(10):
        async with theta.connect(
            "127.0.0.1", server.port, client_config(frame_limits=limits)
        ) as session:
            await session.assets.send("a", bytes(200_000))
            echoed = await session.assets.receive()
    assert echoed.data == bytes(200_000)


async def test_chunks_fit_the_peers_default_limit_whatever_this_sides_limit(
    nursery: trio.Nursery,
) -> None:
    """A side that accepts larger asset frames still sends chunks that a peer with the
    spec's default limit accepts, next to a long name."""
    server = await start_server(nursery, echo)
    config = client_config(asset_chunk_size=2**20, frame_limits=FrameLimits(assets=2 * 2**20))
    name, data = "n" * 10_000, bytes(range(256)) * 5000
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, config) as session:
            await session.assets.send(name, data)
            echoed = await session.assets.receive()
    assert (echoed.name, echoed.data) == (name, data)


async def test_a_client_acknowledges_the_servers_heartbeat_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The client's control reader says a heartbeat needs no answer, so the ACK of the
    server's heartbeat leaves on arrival, not after the 1 ms ACK delay."""
    sent: list[tuple[float, int]] = []  # client to server: (time, size)

    def record(datagram: bytes) -> bool:
        sent.append((trio.current_time(), len(datagram)))
        return False

    server = await start_server(nursery, echo)
    delay = 0.01
    link = LinkConditioner(
        server.address,
        LinkConditionerConfig(delay=delay, drop=record),
        LinkConditionerConfig(delay=delay),
    )
    await nursery.start(link.run)
    async with theta.connect("127.0.0.1", link.address[1], client_config()):
        await trio.sleep(1.0)  # settle
        start = len(sent)
        await trio.sleep(2.0)  # four heartbeat periods
    steady = sent[start : len(sent) - 2]  # not the close
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(steady)]
    answered = [gap for gap in gaps if gap < 0.1]  # heartbeat -> ACK of the server's answer
    assert len(answered) >= 3
    assert all(gap < 2 * delay + 0.0005 for gap in answered)


@pytest.mark.parametrize("with_uni_stream", [False, True])
async def test_a_close_in_the_handshakes_last_flight_explains_the_end(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, with_uni_stream: bool
) -> None:
    """A client whose last handshake flight carries the confirm, the channels, a
    unidirectional stream and its close: the server's session ends with the client's
    close, not with a PROTOCOL_VIOLATION of its own for the stream."""
    ends = SessionEnds()
    server = await start_server(nursery, ends.handler)
    establish = _client._establish

    async def establish_then_leave(*args: Any, **kwargs: Any) -> Session:
        session = await establish(*args, **kwargs)
        connection = session._connection
        if with_uni_stream:
            engine = connection._quic
            engine.send_stream_data(
                engine.get_next_available_stream_id(is_unidirectional=True), b"!"
            )
        connection.close_nowait(ErrorCode.GOING_AWAY, "bye")  # no checkpoint since the confirm
        return session

    monkeypatch.setattr(_client, "_establish", establish_then_leave)
    with trio.fail_after(10):
        with contextlib.suppress(SessionClosed, trio.ClosedResourceError):
            async with theta.connect("127.0.0.1", server.port, client_config()):
                pass
        (seen,) = await ends.wait()
    assert (seen.code, seen.reason, seen.by_peer) == (ErrorCode.GOING_AWAY, "bye", True)


async def test_uptime_stops_when_the_session_ends(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery, echo)
    async with theta.connect("127.0.0.1", server.port, client_config()) as session:
        await trio.sleep(2)
    await trio.sleep(100)
    assert 2 <= session.diagnostics().uptime < 2.5


def _raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


async def test_configured_signing_keys_are_each_sides_identity(nursery: trio.Nursery) -> None:
    """Each side signs with the key it was configured with: the peer sees that key, and
    the server's authenticator gets the client's key and address."""
    server_key, client_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    seen: list[tuple[bytes, tuple[str, int] | None]] = []
    peer_keys: list[bytes] = []

    def authenticate(token: bytes, key: bytes, address: tuple[str, int] | None) -> int:
        seen.append((key, address))
        return int(Role.REPLICATE)

    async def note_the_clients_key(session: Session) -> None:
        peer_keys.append(session.peer_public_key)
        await echo(session)

    server = await start_server(
        nursery, note_the_clients_key, signing_key=server_key, authenticator=authenticate
    )
    with trio.fail_after(5):
        config = client_config(signing_key=client_key)
        async with theta.connect("127.0.0.1", server.port, config) as session:
            assert session.public_key == _raw_public_key(client_key)
            assert session.peer_public_key == _raw_public_key(server_key)
            client_port = session._connection.local_address[1]
            await session.replication.send(b"x", tick=1)
            await session.replication.receive()  # the handler has run
    assert seen == [(_raw_public_key(client_key), ("127.0.0.1", client_port))]
    assert peer_keys == [_raw_public_key(client_key)]


async def test_diagnostics_report_the_quic_engines_figures(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Percentiles, the peer's estimates and the QUIC figures reach the snapshot; loss
    shows on a lossy link."""
    server = await start_server(nursery, echo)
    lossy = LinkConditionerConfig(loss=0.2)
    link = LinkConditioner(server.address, lossy, lossy, seed=3)
    await nursery.start(link.run)
    with trio.fail_after(120):  # virtual seconds
        async with theta.connect("127.0.0.1", link.address[1], client_config()) as session:
            await session.replication.send_many([(t, os.urandom(1000)) for t in range(200)])
            for _ in range(200):
                await session.replication.receive()
            await trio.sleep(3)
            snapshot = session.diagnostics()
            engine = session._connection.stats().engine  # at the same moment
    assert snapshot.rtt_p50 is not None
    assert snapshot.peer_rtt is not None
    assert snapshot.quic_smoothed_rtt > 0
    assert snapshot.quic_congestion_window > 0
    assert snapshot.quic_lost_packets > 0
    assert snapshot.quic_lost_packets == engine.lost_packets


async def test_diagnostics_carry_each_heartbeat_figure_to_its_field(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(nursery, echo)
    figures = HeartbeatMetrics(
        latest_rtt=0.001,
        smoothed_rtt=0.002,
        min_rtt=0.003,
        rtt_p50=0.004,
        rtt_p90=0.005,
        rtt_p99=0.006,
        jitter=0.007,
        heartbeats_sent=8,
        heartbeats_received=9,
        peer_rtt=0.010,
        peer_jitter=0.011,
    )
    with trio.fail_after(5):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            monkeypatch.setattr(session._heartbeats, "metrics", lambda: figures)
            snapshot = session.diagnostics()
    assert (
        snapshot.rtt_latest,
        snapshot.rtt_smoothed,
        snapshot.rtt_min,
        snapshot.rtt_p50,
        snapshot.rtt_p90,
        snapshot.rtt_p99,
        snapshot.jitter,
        snapshot.heartbeats_sent,
        snapshot.heartbeats_received,
        snapshot.peer_rtt,
        snapshot.peer_jitter,
    ) == dataclasses.astuple(figures)


async def test_watch_diagnostics_keeps_its_interval(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery, echo)
    with trio.fail_after(30):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            uptimes = []
            async for snapshot in session.watch_diagnostics(0.3):
                uptimes.append(snapshot.uptime)
                if len(uptimes) == 4:
                    break
    steps = [b - a for a, b in itertools.pairwise(uptimes)]
    assert steps == pytest.approx([0.3] * 3, abs=1e-3)


async def test_max_sessions_keeps_further_clients_out_until_a_place_frees(
    nursery: trio.Nursery,
) -> None:
    """Beyond max_sessions a client gets no answer (ServerUnreachable at its timeout);
    one that keeps trying gets in once a place is free."""
    server = await start_server(nursery, echo, max_sessions=1)

    async def second_client() -> None:
        config = client_config(handshake_timeout=0.5)
        async with theta.connect("127.0.0.1", server.port, config):
            pytest.fail("a second session must not be established")

    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", server.port, client_config()):
            with pytest.raises(theta.ServerUnreachable):
                await second_client()
        # The first session's place is given back while this client retries.
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            assert session.session_id
