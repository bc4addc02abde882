"""A whole session over a hostile link (loss, bursts, reordering, duplication, delay)."""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import trio
import trio.testing

import theta
from theta.testing import GilbertElliott, LinkConditioner, LinkConditionerConfig

from .helpers import client_config, echo, start_server


async def test_session_survives_a_hostile_link(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery, echo)
    impairments = LinkConditionerConfig(
        loss=0.05,
        burst_loss=GilbertElliott(p_enter_bad=0.02, p_leave_bad=0.4, loss_in_bad=0.5),
        reorder=0.05,
        duplicate=0.02,
        delay=0.020,
        jitter=0.010,
    )
    link = LinkConditioner(server.address, impairments, impairments, seed=11)
    await nursery.start(link.run)
    asset = os.urandom(256 * 1024)
    with trio.fail_after(300):  # virtual seconds
        async with theta.connect("127.0.0.1", link.address[1], client_config()) as session:
            await session.replication.send_many([(tick, b"%d" % tick * 30) for tick in range(100)])
            await session.assets.send("level.bin", asset)
            ticks = [(await session.replication.receive()).tick for _ in range(100)]
            echoed = await session.assets.receive()
            await trio.sleep(3)  # a few heartbeat round trips on the bad link
            snapshot = session.diagnostics()
    assert ticks == list(range(100))
    assert echoed.data == asset
    assert snapshot.heartbeats_received >= 5
    assert snapshot.rtt_min is not None
    assert snapshot.rtt_min >= 0.020  # two one-way delays of at least 20 - 10 ms
    assert all(stats.dropped > 0 for stats in link.stats.values())


async def test_session_follows_a_client_whose_nat_rebinds(nursery: trio.Nursery) -> None:
    """The client's address changes mid-session: the server moves to the new one (QUIC
    migration), nothing is lost, and ``peer_address`` says where the client is now."""
    seen: list[tuple[str, int]] = []

    async def echo_noting_the_address(session: theta.Session) -> None:
        async for message in session.replication:
            seen.append(session.peer_address)
            await session.replication.send(message.payload, tick=message.tick)

    server = await start_server(nursery, echo_noting_the_address)
    link = LinkConditioner(server.address)
    await nursery.start(link.run)
    with trio.fail_after(10):
        async with theta.connect("127.0.0.1", link.address[1], client_config()) as session:
            for tick in range(6):
                if tick == 3:
                    link.rebind()
                await session.replication.send(b"where am I", tick=tick)
                assert (await session.replication.receive()).tick == tick
            assert session.closed is None
    before, after = set(seen[:3]), set(seen[3:])
    assert len(before) == len(after) == 1
    assert before != after


async def test_a_rebinding_also_moves_the_datagrams_still_on_their_way(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A datagram delayed on the link when the NAT rebinds leaves from the new port, like
    the next one, and is counted once as forwarded."""
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as server:
        await server.bind(("127.0.0.1", 0))
        link = LinkConditioner(server.getsockname(), LinkConditionerConfig(delay=0.2))
        await nursery.start(link.run)
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as client:
            await client.sendto(b"one", link.address)
            await trio.sleep(0.05)
            link.rebind()
            await client.sendto(b"two", link.address)
            with trio.fail_after(5):
                received = [await server.recvfrom(100) for _ in range(2)]
    assert [data for data, _ in received] == [b"one", b"two"]
    assert received[0][1] == received[1][1]  # one new mapping
    stats = link.stats["to_server"]
    assert (stats.received, stats.forwarded, stats.dropped) == (2, 2, 0)


def test_impairments_are_checked_when_configured() -> None:
    with pytest.raises(ValueError, match="loss must be a probability in"):
        LinkConditionerConfig(loss=1.5)
    with pytest.raises(ValueError, match="delay must be a finite number of seconds"):
        LinkConditionerConfig(delay=-0.1)
    with pytest.raises(ValueError, match="loss_in_bad must be a probability in"):
        GilbertElliott(loss_in_bad=2)
    with pytest.raises(TypeError, match="drop must be callable"):
        LinkConditionerConfig(drop=True)  # type: ignore[arg-type]


def test_a_conditioner_holds_no_socket_until_it_runs() -> None:
    link = LinkConditioner(("127.0.0.1", 9))
    with pytest.raises(RuntimeError, match="not running"):
        link.address  # noqa: B018
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del link
        gc.collect()


async def test_a_conditioner_can_run_again() -> None:
    with (
        trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as server,
        trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as client,
    ):
        await server.bind(("127.0.0.1", 0))
        link = LinkConditioner(server.getsockname())
        for round_trip in (b"first run", b"second run"):
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    await nursery.start(link.run)
                    await client.sendto(round_trip, link.address)
                    assert (await server.recvfrom(100))[0] == round_trip
                    nursery.cancel_scope.cancel()
            with pytest.raises(RuntimeError, match="not running"):
                link.address  # noqa: B018
