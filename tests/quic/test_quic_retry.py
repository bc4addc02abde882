"""Address validation: Retry tokens, and the server's policy of when to ask for one."""

from __future__ import annotations

import functools
import socket
from typing import Any

import pytest
import trio
import trio.testing
from aioquic.quic.configuration import QuicConfiguration

from theta._quic import (
    QuicConfig,
    QuicServer,
    _engine,
    generate_self_signed_certificate,
    open_quic_connection,
    serve_quic,
)
from theta._quic._retry import RetryTokens
from theta.testing import LinkConditioner, LinkConditionerConfig

from .quic_helpers import client_config, echo_handler, send_silent_initial, start_server

ADDRESS = ("127.0.0.1", 4433)
ORIGINAL, RETRY = b"\x01" * 8, b"\x02" * 8


def test_a_token_gives_back_the_original_connection_id() -> None:
    tokens = RetryTokens(lifetime=10.0)
    token = tokens.issue(ADDRESS, ORIGINAL, RETRY, now=100.0)
    assert tokens.validate(ADDRESS, token, RETRY, now=100.0) == (ORIGINAL, True)
    assert tokens.validate(ADDRESS, token, RETRY, now=110.0) == (ORIGINAL, True)
    assert tokens.validate(ADDRESS, token, RETRY, now=110.001) == (ORIGINAL, False)
    assert tokens.validate(ADDRESS, token, RETRY, now=99.999) == (ORIGINAL, False)
    long_original = bytes(range(20))
    token = tokens.issue(("::1", 1, 0, 0), long_original, RETRY, now=0.0)
    assert tokens.validate(("::1", 1, 0, 0), token, RETRY, now=0.0) == (long_original, True)


@pytest.mark.parametrize(
    "case",
    [
        "other port",
        "other host",
        "other connection id",
        "tampered",
        "truncated",
        "empty",
        "other endpoint",
    ],
)
def test_a_token_is_worth_nothing_elsewhere(case: str) -> None:
    tokens = RetryTokens(lifetime=10.0)
    token = tokens.issue(ADDRESS, ORIGINAL, RETRY, now=100.0)
    address, cid, now = ADDRESS, RETRY, 100.0
    if case == "other port":
        address = ("127.0.0.1", 4434)
    elif case == "other host":
        address = ("127.0.0.2", 4433)
    elif case == "other connection id":
        cid = b"\x03" * 8
    elif case == "tampered":
        token = token[:10] + bytes([token[10] ^ 1]) + token[11:]
    elif case == "truncated":
        token = token[:-1]
    elif case == "empty":
        token = b""
    elif case == "other endpoint":
        tokens = RetryTokens(lifetime=10.0)
    assert tokens.validate(address, token, cid, now) is None


def test_address_validation_is_checked() -> None:
    with pytest.raises(ValueError, match="address_validation"):
        QuicConfig(address_validation="sometimes")


async def _echo(server: QuicServer) -> None:
    async with open_quic_connection("127.0.0.1", server.port, client_config()) as connection:
        stream = await connection.open_stream()
        await stream.send_all(b"validated")
        await stream.send_eof()
        assert await stream.receive_some() == b"validated"


async def test_always_every_client_proves_its_address_first(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo_handler, address_validation="always")
    with trio.fail_after(10):
        await _echo(server)
        await _echo(server)
    assert server.retries_sent == 2


async def test_never_no_client_is_asked(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery, echo_handler, address_validation="never", max_handshakes=4)
    with trio.fail_after(30):
        for _ in range(3):
            await send_silent_initial(server)
        assert len(server.connections) == 3  # beyond half of the places, and still asked nothing
        await _echo(server)
    assert server.retries_sent == 0


async def test_under_load_once_half_the_handshake_places_are_taken(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Two silent clients hold 2 of 4 handshake places: the next client is asked to
    prove its address, gets in, and once the silent ones time out nobody is asked."""
    server = await start_server(nursery, echo_handler, max_handshakes=4, handshake_timeout=2.0)
    with trio.fail_after(30):
        await _echo(server)
        assert server.retries_sent == 0
        await send_silent_initial(server)
        await send_silent_initial(server)
        silent = server.connections
        assert len(silent) == 2
        await _echo(server)
        assert server.retries_sent == 1
        for connection in silent:
            await connection.terminated.wait()
        await _echo(server)
        assert server.retries_sent == 1


@pytest.mark.parametrize("mode", ["never", "under_load", "always"])
async def test_a_token_this_server_did_not_issue_counts_as_none(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Another server's NEW_TOKEN, say (RFC 9000, section 8.1.3): the client still gets
    in, after a Retry when one is asked for."""
    server = await start_server(nursery, echo_handler, address_validation=mode)
    build = _engine.build_configuration

    def with_a_foreign_token(config: QuicConfig, **kwargs: Any) -> QuicConfiguration:
        configuration = build(config, **kwargs)
        if kwargs["is_client"]:
            configuration.token = b"\x01" + bytes(40)
        return configuration

    monkeypatch.setattr(_engine, "build_configuration", with_a_foreign_token)
    with trio.fail_after(10):
        await _echo(server)
    assert server.retries_sent == (1 if mode == "always" else 0)


def test_a_token_cannot_be_recut_for_another_address() -> None:
    """The MAC input length-prefixes every field: a client that chose its first
    destination id to end like another address's encoding cannot move the boundary
    between id and address and present its token from that address."""
    tokens = RetryTokens(lifetime=10.0)
    attacker, victim = ("127.0.0.1", 40000), ("10.9.8.7", 53)
    host = victim[0].encode()
    tail = bytes([len(host)]) + host + victim[1].to_bytes(2, "big")
    original = b"\xaa" * (20 - len(tail)) + tail
    token = tokens.issue(attacker, original, RETRY, now=1.0)
    mac = token[-16:]
    own_host = attacker[0].encode()
    flat = token[:-16] + bytes([len(own_host)]) + own_host + attacker[1].to_bytes(2, "big") + RETRY
    cut = len(token) - 16 - len(tail)
    forged_body, forged_cid = flat[:cut], flat[cut + len(tail) :]
    assert tokens._mac(forged_body, victim, forged_cid) != mac
    assert tokens.validate(victim, forged_body + mac, forged_cid, now=1.0) is None


async def test_a_late_copy_of_the_first_initial_reaches_the_validated_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A retransmission of the client's tokenless Initial that arrives after the Retry
    (or a duplicate) goes to the connection the token made, not to a new one."""
    server = await start_server(nursery, echo_handler, max_handshakes=2, handshake_timeout=1.0)
    first: list[bytes] = []

    def keep_the_first(data: bytes) -> bool:
        if not first:
            first.append(data)
        return False

    link = LinkConditioner(server.address, LinkConditionerConfig(drop=keep_the_first))
    await nursery.start(link.run)
    with trio.fail_after(30):
        await send_silent_initial(server)  # one of two places: a Retry is asked for
        silent = server.connections
        async with open_quic_connection("127.0.0.1", link.address[1], client_config()) as conn:
            assert server.retries_sent == 1
            for connection in silent:
                await connection.terminated.wait()  # no load any more
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as late:
                await late.sendto(first[0], server.address)
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.connections) == 1
            assert server._endpoint.handshaking == 0
            stream = await conn.open_stream()
            await stream.send_all(b"still fine")
            await stream.send_eof()
            assert await stream.receive_some() == b"still fine"


async def test_a_token_that_expired_in_flight_still_gets_the_client_in(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The client's Initials carrying its token are lost until the token has expired
    (and the load has gone): the token is still this server's, for this address, so the
    connection is made with the Retry's ids (without them the client must abort)."""
    server = await start_server(nursery, echo_handler, max_handshakes=2, handshake_timeout=1.0)
    started = trio.current_time()

    def lose_tokens_for_a_while(data: bytes) -> bool:
        header = _engine.parse_header_untrusted(data, _engine.CID_LENGTH)
        carries_token = header is not None and bool(header.token)
        return carries_token and trio.current_time() - started < 1.6

    link = LinkConditioner(server.address, LinkConditionerConfig(drop=lose_tokens_for_a_while))
    await nursery.start(link.run)
    await send_silent_initial(server)  # one of two places: a Retry is asked for
    config = client_config(handshake_timeout=10.0)
    with trio.fail_after(30):
        async with open_quic_connection("127.0.0.1", link.address[1], config) as connection:
            stream = await connection.open_stream()
            await stream.send_all(b"late but in")
            await stream.send_eof()
            assert await stream.receive_some() == b"late but in"
    assert server.retries_sent == 1


@functools.cache
def _large_certificate() -> tuple[bytes, bytes]:
    """A self-signed certificate of ≈ 6 KB (many names), so that the server's first
    flight is more than three times a client's 1200-byte Initial."""
    names = ["localhost", *(f"host-{index:04d}.example.com" for index in range(250))]
    pair = generate_self_signed_certificate(names)
    assert len(pair.certificate_pem) > 4 * 3 * 1200 // 3  # base64: 4 characters per 3 bytes
    return pair.certificate_pem, pair.private_key_pem


async def _serve_large_certificate(nursery: trio.Nursery, **overrides: Any) -> QuicServer:
    certificate_pem, key_pem = _large_certificate()
    config = QuicConfig(certificate=certificate_pem, private_key=key_pem, **overrides)
    server: QuicServer = await nursery.start(serve_quic, echo_handler, "127.0.0.1", 0, config)
    return server


@pytest.mark.parametrize("validated", [True, False])
def test_a_validated_address_gets_the_whole_first_flight(validated: bool) -> None:
    certificate_pem, key_pem = _large_certificate()
    client = _engine.create_connection(
        _engine.build_configuration(
            QuicConfig(ca_certs=certificate_pem), is_client=True, server_name="localhost"
        )
    )
    client.connect(ADDRESS, now=1.0)
    initial = [data for data, _ in client.datagrams_to_send(now=1.0)]
    header = _engine.parse_header_untrusted(initial[0], _engine.CID_LENGTH)
    assert header is not None
    server = _engine.create_connection(
        _engine.build_configuration(
            QuicConfig(certificate=certificate_pem, private_key=key_pem), is_client=False
        ),
        original_destination_cid=header.destination_cid,
        validated_address=ADDRESS if validated else None,
    )
    for data in initial:
        server.receive_datagram(data, ADDRESS, now=1.0)
    flight = sum(len(data) for data, _ in server.datagrams_to_send(now=1.0))
    received = sum(map(len, initial))
    if validated:
        assert flight > 3 * received  # the whole certificate, in one go
    else:
        assert flight <= 3 * received  # RFC 9000, section 8.1


async def test_after_a_retry_a_large_certificate_costs_no_extra_round_trip(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Retry (1 RTT), then the Initial with the token is answered by the whole flight:
    the client completes its handshake after 2 round trips, not 3."""
    server = await _serve_large_certificate(nursery, address_validation="always")
    delay = 0.05  # each way
    impairments = LinkConditionerConfig(delay=delay)
    link = LinkConditioner(server.address, impairments, impairments)
    await nursery.start(link.run)
    config = QuicConfig(ca_certs=_large_certificate()[0], server_name="localhost")
    with trio.fail_after(30):
        started = trio.current_time()
        async with open_quic_connection("127.0.0.1", link.address[1], config):
            elapsed = trio.current_time() - started
    assert server.retries_sent == 1
    assert 4 * delay <= elapsed < 5 * delay


def test_only_the_first_use_of_a_retry_counts_as_proof() -> None:
    tokens = RetryTokens(lifetime=2.0)
    assert tokens.first_use(RETRY, now=1.0)
    assert not tokens.first_use(RETRY, now=2.9)  # a replay within the lifetime
    assert tokens.first_use(ORIGINAL, now=2.9)
    assert not tokens.first_use(RETRY, now=3.0)  # a token issued at 1.0 is still fresh
    assert tokens.first_use(RETRY, now=3.1)  # forgotten once any token for it has expired
    assert list(tokens._used) == [ORIGINAL, RETRY]  # nothing kept beyond that


class _RawClient:
    """A client engine behind a socket of the test's own: datagrams go out as the test
    says, and what the server sends back within 50 ms (its first flight, well before any
    retransmission) is collected."""

    def __init__(self, sock: trio.socket.SocketType, server: QuicServer, ca: bytes) -> None:
        self.sock, self.server = sock, server
        self.engine = _engine.create_connection(
            _engine.build_configuration(
                QuicConfig(ca_certs=ca), is_client=True, server_name="localhost"
            )
        )
        self.engine.connect(server.address, now=trio.current_time())

    def pending(self) -> list[bytes]:
        return [data for data, _ in self.engine.datagrams_to_send(now=trio.current_time())]

    async def exchange(self, datagrams: list[bytes]) -> tuple[int, list[bytes]]:
        """Send ``datagrams``; return their size and the server's answers."""
        for data in datagrams:
            await self.sock.sendto(data, self.server.address)
        answers = []
        with trio.move_on_after(0.05):
            while True:
                answers.append(await self.sock.recv(65536))
        return sum(map(len, datagrams)), answers

    async def token_initial(self) -> list[bytes]:
        """The Initial that answers the server's Retry (the one carrying the token)."""
        _, (retry,) = await self.exchange(self.pending())
        self.engine.receive_datagram(retry, self.server.address, now=trio.current_time())
        return self.pending()


async def test_a_replayed_token_gets_no_more_than_three_times_what_it_sent(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A token-bearing Initial replayed (from the right address, within the token's
    lifetime) after its connection has ended makes a connection again, but only the
    first use of the token lifts the anti-amplification limit."""
    server = await _serve_large_certificate(nursery, address_validation="always")
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        client = _RawClient(sock, server, _large_certificate()[0])
        with_token = await client.token_initial()
        sent, flight = await client.exchange(with_token)
        whole = sum(map(len, flight))
        assert whole > 3 * sent  # validated: the whole flight at once
        (first,) = server.connections
        first.close_nowait()
        await first.terminated.wait()
        sent, flight = await client.exchange(with_token)  # the replay
        assert len(server.connections) == 1  # a connection again ...
        # ... held to the limit (aioquic lets its last packet overshoot by a few bytes)
        assert 0 < sum(map(len, flight)) <= 3 * sent + 256 < whole


async def test_an_expired_token_gets_in_but_proves_nothing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Under load a client is sent a Retry; its token expires before it comes back, when
    the load has gone: it gets a connection, held to 3x what it sent."""
    # The handshake timeout is also the tokens' lifetime.
    server = await _serve_large_certificate(nursery, max_handshakes=2, handshake_timeout=1.0)
    await send_silent_initial(server)  # one of two places: the load that asks for a Retry
    (silent,) = server.connections
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        client = _RawClient(sock, server, _large_certificate()[0])
        with_token = await client.token_initial()
        assert server.retries_sent == 1
        await silent.terminated.wait()  # no load any more
        await trio.sleep(0.5)  # and the token has expired
        sent, flight = await client.exchange(with_token)
        assert len(server.connections) == 1
        assert 0 < sum(map(len, flight)) <= 3 * sent + 256


async def test_a_damaged_copy_does_not_use_up_the_token(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A copy of the token-bearing Initial whose payload does not decrypt proves nothing:
    the client's own Initial, arriving after it, still lifts the limit."""
    server = await _serve_large_certificate(nursery, address_validation="always")
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        client = _RawClient(sock, server, _large_certificate()[0])
        with_token = await client.token_initial()
        damaged = bytearray(with_token[0])
        damaged[200] ^= 0xFF  # inside the protected payload (the padding follows the packet)
        _, answers = await client.exchange([bytes(damaged)])
        assert answers == []
        await trio.testing.wait_all_tasks_blocked()
        assert not server.connections  # dropped: nothing decrypted
        sent, flight = await client.exchange(with_token)
        assert sum(map(len, flight)) > 3 * sent
