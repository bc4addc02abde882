"""Server endpoint: many clients, caps, hostile datagrams, version negotiation."""

from __future__ import annotations

import errno
import random
import socket
import struct
from typing import Any, cast

import pytest
import trio
import trio.lowlevel
import trio.testing

from theta._quic import HandshakeTimeout, QuicConnection, QuicServer, open_quic_connection
from theta._quic._endpoint import UdpEndpoint
from theta.testing import LinkConditioner, LinkConditionerConfig

from .quic_helpers import client_config, echo_handler, send_silent_initial, start_server


async def _echo_once(port: int, message: bytes) -> None:
    async with open_quic_connection("127.0.0.1", port, client_config()) as conn:
        stream = await conn.open_stream()
        await stream.send_all(message)
        await stream.send_eof()
        received = b""
        while chunk := await stream.receive_some():
            received += chunk
        assert received == message


async def test_200_concurrent_clients_with_cap(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Cap 150: exactly 150 are served; the other 50 Initials are dropped silently and
    those clients fail with HandshakeTimeout, as documented in ``_endpoint``."""
    cap, clients = 150, 200
    release = trio.Event()
    served: list[QuicConnection] = []

    async def holding_handler(connection: QuicConnection) -> None:
        served.append(connection)
        await release.wait()

    server = await start_server(
        nursery, holding_handler, max_connections=cap, max_handshakes=clients
    )
    outcomes: list[str] = []
    all_done = trio.Event()

    async def client() -> None:
        try:
            async with open_quic_connection("127.0.0.1", server.port, client_config()):
                record("served")
                await release.wait()
        except HandshakeTimeout:
            record("refused")

    def record(outcome: str) -> None:
        outcomes.append(outcome)
        if len(outcomes) == clients:
            all_done.set()

    with trio.fail_after(120):
        async with trio.open_nursery() as clients_nursery:
            for _ in range(clients):
                clients_nursery.start_soon(client)
            await all_done.wait()
            release.set()
    assert outcomes.count("served") == cap
    assert outcomes.count("refused") == clients - cap
    assert server.refused_initials >= clients - cap


async def test_200_concurrent_clients_all_served(echo_server: QuicServer) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for index in range(200):
                nursery.start_soon(_echo_once, echo_server.port, b"client %d" % index)


async def test_hostile_datagrams_do_not_kill_the_server(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo_handler, handshake_timeout=0.5)
    captured: list[bytes] = []

    def capture(data: bytes) -> bool:
        captured.append(data)
        return False

    link = LinkConditioner(server.address, LinkConditionerConfig(drop=capture))
    await nursery.start(link.run)
    rng = random.Random(1234)
    with trio.fail_after(30):
        async with open_quic_connection("127.0.0.1", server.port, client_config()) as good:
            await _echo_once(link.address[1], b"capture a real handshake")
            attacker = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with attacker:
                for index in range(3000):
                    base = bytearray(rng.choice(captured))
                    for _ in range(rng.randint(1, 8)):
                        base[rng.randrange(len(base))] = rng.randrange(256)
                    if index % 3 == 0:  # plus plain garbage shaped like a v1 Initial
                        base = bytearray(
                            b"\xc0"
                            + struct.pack("!I", 1)
                            + b"\x08"
                            + rng.randbytes(8)
                            + b"\x08"
                            + rng.randbytes(1200)
                        )
                    await attacker.sendto(bytes(base), server.address)
                    if index % 100 == 0:
                        await trio.lowlevel.checkpoint()
            stream = await good.open_stream()
            await stream.send_all(b"still alive")
            assert await stream.receive_some() == b"still alive"
        # Once the bogus handshakes time out (0.5 s), the server accepts new clients again.
        for connection in server.connections:
            await connection.terminated.wait()
        await _echo_once(server.port, b"new client after the storm")


async def test_undecryptable_initials_hold_no_handshake_slot(nursery: trio.Nursery) -> None:
    # Each forged datagram would otherwise hold one of the 8 slots for 10 s.
    server = await start_server(nursery, echo_handler, max_handshakes=8, handshake_timeout=10)
    rng = random.Random(7)
    forged = 50
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker, trio.fail_after(5):
        for _ in range(forged):  # shaped like v1 Initials, with keys nobody derived
            header = b"\xc3" + struct.pack("!I", 1) + b"\x08" + rng.randbytes(8) + b"\x08"
            await attacker.sendto(header + rng.randbytes(1200), server.address)
        await _echo_once(server.port, b"a real client still gets in")  # not after 10 s
    assert server._endpoint.dropped_datagrams >= forged
    assert len(server.connections) <= 1  # at most the real client, closing


async def test_version_negotiation_reply(echo_server: QuicServer) -> None:
    probe = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with probe, trio.fail_after(5):
        dcid, scid = b"D" * 8, b"S" * 8
        packet = b"\xc0" + struct.pack("!I", 0x1A2A3A4A) + b"\x08" + dcid + b"\x08" + scid
        await probe.sendto(packet.ljust(1200, b"\0"), echo_server.address)
        reply, _ = await probe.recvfrom(2048)
        assert reply[1:5] == b"\0\0\0\0"  # version negotiation
        assert reply[6:14] == scid  # echoes our ids swapped
        assert struct.pack("!I", 1) in reply[14:]
        # A VN packet is never answered, and a short unknown-version datagram is dropped.
        await probe.sendto(reply, echo_server.address)
        await probe.sendto(packet, echo_server.address)
        with trio.move_on_after(0.2):
            await probe.recvfrom(2048)
            raise AssertionError("unexpected reply")


class _RefusingOnceSocket(socket.socket):
    """A UDP socket whose first receive fails like an ICMP port-unreachable would."""

    refused = False

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        if not self.refused:
            self.refused = True
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return super().recvfrom(bufsize, flags)


async def test_receive_errors_do_not_stop_the_endpoint() -> None:
    sock = _RefusingOnceSocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    endpoint = UdpEndpoint(sock)
    sender = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(endpoint.receive_loop)
            for expected_drops in (1, 2):
                await sender.sendto(b"\x40unroutable short header", endpoint.local_address)
                while endpoint.dropped_datagrams < expected_drops:
                    await trio.lowlevel.checkpoint()  # the loop runs once it is readable
            nursery.cancel_scope.cancel()
    endpoint.close()
    assert endpoint.receive_errors == 1


class _FailingSendSocket(socket.socket):
    """A UDP socket whose sends fail with the errors queued in ``failures``."""

    failures: list[OSError]

    def sendto(self, data: Any, *args: Any) -> int:
        if self.failures:
            raise self.failures.pop(0)
        return len(data)


class _UnreachableCounter:
    unreachable = 0

    def peer_unreachable(self) -> None:
        self.unreachable += 1


async def test_icmp_errors_reported_by_a_send_reach_the_client_connection() -> None:
    sock = _FailingSendSocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.failures = [
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        OSError(errno.EMSGSIZE, "Message too long"),  # not about the peer: ignored
        OSError(errno.EHOSTUNREACH, "No route to host"),
    ]
    sock.bind(("127.0.0.1", 0))
    endpoint = UdpEndpoint(sock)
    client = _UnreachableCounter()
    endpoint.add_client_connection(cast(QuicConnection, client))
    peer = ("127.0.0.1", 9)
    await endpoint.send_datagrams([(b"first", peer), (b"second", peer)])
    assert client.unreachable == 1
    endpoint.send_datagrams_nowait([(b"third", peer)])
    assert client.unreachable == 2
    assert not sock.failures
    endpoint.close()


async def test_handshakes_in_progress_are_counted_until_they_end(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The cap on handshakes reads a count the connections keep (not a scan of every
    connection per Initial): up when a server connection is created, down once when its
    handshake completes or it ends first."""
    server = await start_server(nursery, echo_handler, handshake_timeout=2.0)
    endpoint = server._endpoint
    with trio.fail_after(30):
        await send_silent_initial(server)
        await send_silent_initial(server)
        silent = server.connections
        assert endpoint.handshaking == 2 == len(silent)
        await _echo_once(server.port, b"completes its handshake")
        assert endpoint.handshaking == 2
        for connection in silent:
            await connection.terminated.wait()
            assert isinstance(connection.error, HandshakeTimeout)
        assert endpoint.handshaking == 0


async def test_a_handshake_timeout_says_whether_the_peer_answered(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that answers with something that is not QUIC, and a silent one."""
    babbler = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await babbler.bind(("127.0.0.1", 0))

    async def babble() -> None:
        while True:
            _, addr = await babbler.recvfrom(65535)
            await babbler.sendto(b"\x40" + bytes(40), addr)

    nursery.start_soon(babble)
    silent = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await silent.bind(("127.0.0.1", 0))
    with babbler, silent, trio.fail_after(30):
        for peer, answered in ((babbler, True), (silent, False)):
            config = client_config(handshake_timeout=1.0)
            with pytest.raises(HandshakeTimeout) as info:
                async with open_quic_connection("127.0.0.1", peer.getsockname()[1], config):
                    pytest.fail("the handshake cannot complete")
            assert info.value.peer_answered is answered
        nursery.cancel_scope.cancel()
