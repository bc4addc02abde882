"""Address validation: Retry tokens, and the server's policy of when to ask for one."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from theta._quic import QuicConfig, QuicServer, open_quic_connection
from theta._quic._retry import RetryTokens

from .quic_helpers import client_config, echo_handler, send_silent_initial, start_server

ADDRESS = ("127.0.0.1", 4433)
ORIGINAL, RETRY = b"\x01" * 8, b"\x02" * 8


def test_a_token_gives_back_the_original_connection_id() -> None:
    tokens = RetryTokens(lifetime=10.0)
    token = tokens.issue(ADDRESS, ORIGINAL, RETRY, now=100.0)
    assert tokens.validate(ADDRESS, token, RETRY, now=100.0) == ORIGINAL
    assert tokens.validate(ADDRESS, token, RETRY, now=110.0) == ORIGINAL
    long_original = bytes(range(20))
    token = tokens.issue(("::1", 1, 0, 0), long_original, RETRY, now=0.0)
    assert tokens.validate(("::1", 1, 0, 0), token, RETRY, now=0.0) == long_original


@pytest.mark.parametrize(
    "case",
    [
        "other port",
        "other host",
        "other connection id",
        "expired",
        "from the future",
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
    elif case == "expired":
        now = 110.001
    elif case == "from the future":
        now = 99.999
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


async def test_never_no_client_is_asked(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo_handler, address_validation="never", max_handshakes=1)
    with trio.fail_after(10):
        await send_silent_initial(server)
        assert len(server.connections) == 1  # one handshake in progress: full
        assert server.refused_initials == 0
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


async def test_an_initial_with_a_token_this_server_did_not_issue_is_dropped(
    nursery: trio.Nursery,
) -> None:
    server = await start_server(nursery, echo_handler, address_validation="always")
    endpoint = server._endpoint
    with trio.fail_after(10):
        dropped = endpoint.dropped_datagrams
        await send_silent_initial(server, token=b"\x01" + bytes(40))
        assert endpoint.dropped_datagrams == dropped + 1
        assert not server.connections
        assert server.retries_sent == 0
        await _echo(server)  # the server still serves
