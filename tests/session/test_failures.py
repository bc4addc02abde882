"""Sessions under failure: timeouts, refusals, permissions, crashes, shutdown, load."""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Literal

import pytest
import trio
import trio.lowlevel
import trio.testing

import theta
import theta._server
from theta import ErrorCode, HandshakeRejected, HandshakeTimeout, Role, Session, SessionClosed
from theta._quic import ConnectionClosedByPeer, QuicConfig, QuicConnection, open_quic_connection
from theta.core import (
    AssetChunk,
    FrameDecoder,
    ReplicationMessage,
    SessionClose,
    encode_frame,
)
from theta.testing import LinkConditioner, LinkConditionerConfig

from .helpers import (
    SessionEnds,
    cancellable_server,
    certificate,
    client_config,
    echo,
    start_server,
    tasks_left_after,
)


async def session_end(
    server: theta.Server,
    provoke: Callable[[Session], Awaitable[object]] | None = None,
    config: theta.ClientConfig | None = None,
) -> SessionClosed:
    """Connect to ``server`` (``config`` or the test client configuration), run ``provoke``
    on the session, then wait for it to close; return how it closed (all within 5 s)."""
    with trio.fail_after(5):
        async with theta.connect("127.0.0.1", server.port, config or client_config()) as session:
            if provoke is not None:
                await provoke(session)
            return await session.wait_closed()


async def close_seen_by_server(
    nursery: trio.Nursery, close: Callable[[Session], Awaitable[object]]
) -> SessionClosed:
    """Start a server that records how its session ends, connect, run ``close`` on the
    session and leave it; return what the server's session saw (all within 5 s)."""
    ends = SessionEnds()
    server = await start_server(nursery, ends.handler)
    with trio.fail_after(5):
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await close(session)
        seen = await ends.wait()
    return seen[0]


async def test_handshake_timeout_for_a_silent_client(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo, handshake_timeout=0.3)
    config = QuicConfig(ca_certs=certificate().certificate_pem, server_name="localhost")
    with trio.fail_after(5):
        async with open_quic_connection("127.0.0.1", server.port, config) as connection:
            stream = await connection.open_stream()  # never sends SessionHello
            with pytest.raises(ConnectionClosedByPeer) as info:
                await stream.receive_some()
    assert info.value.code == ErrorCode.HANDSHAKE_TIMEOUT


async def test_client_handshake_timeout_when_the_server_never_answers(
    nursery: trio.Nursery,
) -> None:
    silent_config = QuicConfig(
        certificate=certificate().certificate_pem, private_key=certificate().private_key_pem
    )

    async def silent(connection: object) -> None:
        await trio.sleep_forever()

    server = await nursery.start(theta._quic.serve_quic, silent, "127.0.0.1", 0, silent_config)
    with trio.fail_after(5), pytest.raises(HandshakeTimeout) as info:
        async with theta.connect("127.0.0.1", server.port, client_config(handshake_timeout=0.3)):
            pytest.fail("the session must not be established")
    assert info.value.code is ErrorCode.HANDSHAKE_TIMEOUT


async def test_session_close_instead_of_an_answer_is_the_servers_refusal(
    nursery: trio.Nursery,
) -> None:
    server_config = QuicConfig(
        certificate=certificate().certificate_pem, private_key=certificate().private_key_pem
    )
    seen_send, seen = trio.open_memory_channel[int](1)

    async def busy(connection: QuicConnection) -> None:
        stream = await connection.accept_stream()
        decoder = FrameDecoder(None)  # a stream's first frame
        while not decoder.feed(await stream.receive_some()):
            pass  # until the hello is whole
        await stream.send_all(encode_frame(SessionClose(ErrorCode.SERVER_BUSY, "full")))
        with pytest.raises(ConnectionClosedByPeer) as info:  # the QUIC close is the client's
            await connection.accept_stream()
        seen_send.send_nowait(info.value.code)

    server = await nursery.start(theta._quic.serve_quic, busy, "127.0.0.1", 0, server_config)
    with trio.fail_after(5), pytest.raises(HandshakeRejected) as info:
        async with theta.connect("127.0.0.1", server.port, client_config()):
            pytest.fail("the session must not be established")
    assert (info.value.code, info.value.reason) == (ErrorCode.SERVER_BUSY, "full")
    with trio.fail_after(5):
        assert await seen.receive() == ErrorCode.SERVER_BUSY


async def test_untrusted_certificate_is_a_transport_error(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    other_ca = theta.generate_self_signed_certificate().certificate_pem
    config = theta.ClientConfig(ca_certs=other_ca, server_name="localhost")
    with trio.fail_after(5), pytest.raises(theta.TransportError):
        async with theta.connect("127.0.0.1", server.port, config):
            pytest.fail("the session must not be established")


async def test_authenticator_refusal_is_auth_failed(nursery: trio.Nursery) -> None:
    tokens: list[bytes] = []

    def authenticate(token: bytes, key: bytes, address: tuple[str, int] | None) -> int | None:
        tokens.append(token)
        return int(Role.REPLICATE) if token == b"letmein" else None

    server = await start_server(nursery, echo, authenticator=authenticate)
    with trio.fail_after(5), pytest.raises(HandshakeRejected) as info:
        async with theta.connect("127.0.0.1", server.port, client_config(auth_token=b"wrong")):
            pytest.fail("the session must not be established")
    assert info.value.code is ErrorCode.AUTH_FAILED
    with trio.fail_after(5):
        async with theta.connect(
            "127.0.0.1", server.port, client_config(auth_token=b"letmein")
        ) as session:
            assert session.role == Role.REPLICATE
    assert tokens == [b"wrong", b"letmein"]


async def test_heartbeat_timeout_closes_the_session(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo, heartbeat_interval=0.1, heartbeat_timeout=0.3)
    quiet = client_config(heartbeat_interval=60.0, heartbeat_timeout=120.0)  # one heartbeat
    closed = await session_end(server, config=quiet)
    assert closed.by_peer
    assert closed.code == ErrorCode.HEARTBEAT_TIMEOUT


async def test_quic_idle_timeout_is_a_heartbeat_timeout_detected_here(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer may advertise an idle timeout shorter than the heartbeat timeout: when the
    link then dies, QUIC's idle timeout ends the session first. That is this side's finding
    (the peer said nothing), reported as the heartbeat timeout it stands in for."""
    server = await start_server(nursery, echo, idle_timeout=1.0)
    link = LinkConditioner(server.address)
    await nursery.start(link.run)
    async with theta.connect("127.0.0.1", link.address[1], client_config()) as session:
        cut = LinkConditionerConfig(drop=lambda _: True)
        link.configure(to_server=cut, to_client=cut)
        with trio.fail_after(30):
            closed = await session.wait_closed()
    assert (closed.code, closed.by_peer) == (ErrorCode.HEARTBEAT_TIMEOUT, False)
    assert "idle timeout" in closed.reason
    assert trio.current_time() < 5.0  # before the 5 s heartbeat timeout


async def test_permission_denied_for_replication_without_the_role(nursery: trio.Nursery) -> None:
    async def send_replication(session: Session) -> None:
        assert session.role == Role.UPLOAD_ASSETS
        with pytest.raises(PermissionError):
            await session.replication.send(b"x", tick=1)  # refused locally
        await session.replication._framed.send(ReplicationMessage(1, 0, b"x"))  # bypass

    server = await start_server(nursery, echo, default_role=Role.UPLOAD_ASSETS)
    closed = await session_end(server, send_replication)
    assert closed.by_peer
    assert closed.code == ErrorCode.PERMISSION_DENIED


async def test_permission_denied_for_assets_without_the_role(nursery: trio.Nursery) -> None:
    async def send_an_asset(session: Session) -> None:
        with pytest.raises(PermissionError):
            await session.assets.send("a", b"data")
        await session.assets._framed.send(AssetChunk(1, 0, 1, "a", b"d"))

    server = await start_server(nursery, echo, default_role=Role.REPLICATE)
    closed = await session_end(server, send_an_asset)
    assert closed.code == ErrorCode.PERMISSION_DENIED


async def test_handler_exception_closes_only_its_session(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(session: Session) -> None:
        message = await session.replication.receive()
        if message.payload == b"crash":
            raise RuntimeError("handler bug")
        await session.replication.send(message.payload, tick=message.tick)
        await session.wait_closed()

    server = await start_server(nursery, handler)
    with trio.fail_after(5):
        async with theta.connect("127.0.0.1", server.port, client_config()) as healthy:
            async with theta.connect("127.0.0.1", server.port, client_config()) as doomed:
                await doomed.replication.send(b"crash", tick=1)
                closed = await doomed.wait_closed()
                assert closed.code == ErrorCode.INTERNAL_ERROR
                assert closed.by_peer
            await healthy.replication.send(b"still fine", tick=2)
            assert (await healthy.replication.receive()).payload == b"still fine"
    assert any("handler failed" in record.message for record in caplog.records)
    assert any(record.levelno == logging.ERROR for record in caplog.records)


async def test_graceful_server_shutdown_says_going_away() -> None:
    with trio.fail_after(10):
        async with (
            cancellable_server(echo) as (server, server_scope),
            theta.connect("127.0.0.1", server.port, client_config()) as session,
        ):
            await session.replication.send(b"ping", tick=1)
            await session.replication.receive()  # the server's session is running
            assert len(server.sessions) == 1
            server_scope.cancel()
            closed = await session.wait_closed()
            with pytest.raises(SessionClosed):
                await session.replication.receive()
    assert closed.by_peer
    assert closed.code == ErrorCode.GOING_AWAY


@pytest.mark.parametrize(
    ("raised", "logged"),
    [
        (SessionClosed(ErrorCode.NO_ERROR, "peer left", by_peer=True), False),
        (RuntimeError("handler bug during shutdown"), True),
    ],
)
async def test_handler_errors_beside_the_shutdown_do_not_escape_serve(
    raised: Exception, logged: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler task that fails while the server is being cancelled (its nursery then
    raises that error and Cancelled together) ends its session; serve() just stops."""
    handler_started = trio.Event()

    async def handler(session: Session) -> None:
        async def fails_once_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                raise raised

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fails_once_cancelled)
            handler_started.set()
            await trio.sleep_forever()

    with trio.fail_after(10):
        async with (
            cancellable_server(handler) as (server, server_scope),
            theta.connect("127.0.0.1", server.port, client_config()) as session,
        ):
            await handler_started.wait()
            server_scope.cancel()
            closed = await session.wait_closed()
    assert closed.code == ErrorCode.GOING_AWAY
    assert any("handler failed" in record.message for record in caplog.records) == logged


async def test_the_blocks_own_exception_comes_out_of_connect_unchanged(
    nursery: trio.Nursery,
) -> None:
    ends = SessionEnds()
    server = await start_server(nursery, ends.handler)
    cause = KeyError("root cause")

    async def fail_with_a_cause() -> None:
        async with theta.connect("127.0.0.1", server.port, client_config()):
            try:
                raise cause
            except KeyError as error:
                raise ValueError("wrapped") from error

    with trio.fail_after(5), pytest.raises(ValueError, match="wrapped") as raised:
        await fail_with_a_cause()
    assert raised.value.__cause__ is cause
    mine = ExceptionGroup("mine", [ValueError("one")])
    with trio.fail_after(5), pytest.raises(ExceptionGroup) as grouped:
        async with theta.connect("127.0.0.1", server.port, client_config()):
            raise mine
    assert grouped.value is mine
    with trio.fail_after(5):
        closed = await ends.wait(2)
    assert [(c.code, c.reason) for c in closed] == [(ErrorCode.INTERNAL_ERROR, "client error")] * 2


async def test_cancelling_the_client_says_going_away(nursery: trio.Nursery) -> None:
    ends = SessionEnds()
    server = await start_server(nursery, ends.handler)
    with trio.CancelScope() as owner:
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.replication.send(b"x", tick=1)
            owner.cancel()
            await trio.sleep_forever()
    with trio.fail_after(1):  # not the heartbeat timeout (5 s)
        (seen,) = await ends.wait()
    assert (seen.code, seen.by_peer) == (ErrorCode.GOING_AWAY, True)


async def test_client_close_with_code_reaches_the_server(nursery: trio.Nursery) -> None:
    async def close_twice(session: Session) -> None:
        await session.close(ErrorCode.GOING_AWAY, "level change")
        await session.close()  # idempotent
        with pytest.raises(SessionClosed):
            await session.replication.send(b"late", tick=9)

    seen = await close_seen_by_server(nursery, close_twice)
    assert seen.by_peer
    assert seen.code == ErrorCode.GOING_AWAY
    assert seen.reason == "level change"


async def test_session_over_ipv6_loopback(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo, host="::1")
    with trio.fail_after(5):
        async with theta.connect("::1", server.port, client_config()) as session:
            await session.replication.send(b"v6", tick=6)
            assert (await session.replication.receive()).payload == b"v6"


async def test_fifty_concurrent_sessions(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    results: list[bytes] = []

    async def one(index: int) -> None:
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            await session.replication.send(b"client %d" % index, tick=index)
            results.append((await session.replication.receive()).payload)

    async def all_clients() -> None:
        async with trio.open_nursery() as clients:
            for index in range(50):
                clients.start_soon(one, index)

    with trio.fail_after(60):
        assert await tasks_left_after(all_clients) == 0
    assert sorted(results) == sorted(b"client %d" % i for i in range(50))


async def test_handler_failing_with_another_sessions_error_closes_its_own(
    nursery: trio.Nursery,
) -> None:
    async def relay(session: Session) -> None:
        await session.replication.receive()
        raise SessionClosed(ErrorCode.GOING_AWAY, "the other side left", by_peer=True)

    async def say_hi(session: Session) -> None:
        await session.replication.send(b"hi", tick=1)

    server = await start_server(nursery, relay)
    closed = await session_end(server, say_hi)
    assert closed.by_peer
    assert closed.code == ErrorCode.NO_ERROR


@pytest.mark.parametrize(("family", "host", "shown"), [
    (socket.AF_INET, "127.0.0.1", "127.0.0.1"), (socket.AF_INET6, "::1", "[::1]"),
])  # fmt: skip
async def test_connection_refused_fails_fast(family: int, host: str, shown: str) -> None:
    with trio.socket.socket(family, trio.socket.SOCK_DGRAM) as probe:
        await probe.bind((host, 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    config = client_config(handshake_timeout=30.0)
    with trio.fail_after(5), pytest.raises(theta.ServerUnreachable) as refused:
        async with theta.connect(host, port, config):
            pytest.fail("nothing listens")
    assert refused.value.reason.startswith(f"nothing listens at {shown}:{port} ")


_AddressInfo = (  # trio.abc.HostnameResolver's entries
    tuple[Literal[socket.AddressFamily.AF_INET], socket.SocketKind, int, str, tuple[str, int]]
    | tuple[
        Literal[socket.AddressFamily.AF_INET6],
        socket.SocketKind,
        int,
        str,
        tuple[str, int, int, int] | tuple[int, bytes],
    ]
)


class _Resolver(trio.abc.HostnameResolver):
    """Resolves every name to ``addresses`` (IP, port) after ``delay`` seconds."""

    def __init__(self, addresses: list[tuple[str, int]], delay: float = 0.0) -> None:
        self.addresses = addresses
        self.delay = delay

    async def getaddrinfo(  # noqa: PLR0917 (trio's signature)
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[_AddressInfo]:
        await trio.sleep(self.delay)
        found: list[_AddressInfo] = []
        for ip, number in self.addresses:
            if ":" in ip:
                found.append((socket.AF_INET6, socket.SOCK_DGRAM, 0, "", (ip, number, 0, 0)))
            else:
                found.append((socket.AF_INET, socket.SOCK_DGRAM, 0, "", (ip, number)))
        return found

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise NotImplementedError


async def test_resolving_counts_against_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trio.socket.set_custom_hostname_resolver(_Resolver([], delay=math.inf))
    config = client_config(handshake_timeout=0.5)
    with trio.fail_after(60), pytest.raises(theta.ServerUnreachable, match="resolving 'game"):
        async with theta.connect("game.test", 4433, config):
            pytest.fail("resolved")
    assert trio.current_time() == pytest.approx(0.5)


async def test_a_slow_resolver_leaves_the_handshake_the_rest_of_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as silent:
        await silent.bind(("127.0.0.1", 0))  # bound, never answers: no ICMP either
        address = silent.getsockname()
        trio.socket.set_custom_hostname_resolver(_Resolver([address], delay=0.4))
        config = client_config(handshake_timeout=0.5)
        with pytest.raises(theta.ServerUnreachable, match="no answer"):
            async with theta.connect("game.test", address[1], config):
                pytest.fail("answered")
    assert trio.current_time() == pytest.approx(0.5, abs=0.01)


async def test_every_address_of_the_name_is_tried_while_refused(nursery: trio.Nursery) -> None:
    """``localhost`` may resolve to ``::1`` first while the server listens on 127.0.0.1."""
    server = await start_server(nursery, echo)
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as probe:
        await probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]  # free once closed: nothing listens there
    refusing = [("::1", server.port), ("127.0.0.1", free)]
    trio.socket.set_custom_hostname_resolver(_Resolver([*refusing, ("127.0.0.1", server.port)]))
    with trio.fail_after(5):
        async with theta.connect("game.test", server.port, client_config()) as session:
            await session.replication.send(b"hello", tick=1)
            assert (await session.replication.receive()).payload == b"hello"
        trio.socket.set_custom_hostname_resolver(_Resolver(refusing))
        with pytest.raises(theta.ServerUnreachable, match="nothing listens"):
            async with theta.connect("game.test", server.port, client_config()):
                pytest.fail("nothing listens")


async def test_close_validates_its_code_and_bounds_its_reason(nursery: trio.Nursery) -> None:
    async def close_with_a_long_reason(session: Session) -> None:
        with pytest.raises(ValueError, match="16-bit"):
            await session.close(70000)
        with pytest.raises(TypeError, match="close code must be an int"):
            await session.close(1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="close reason must be a str"):
            await session.close(0, None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="close reason must be a str"):
            await session.close(0, b"bytes")  # type: ignore[arg-type]
        assert session.closed is None
        await session.close(13, "ж" * 20000)

    seen = await close_seen_by_server(nursery, close_with_a_long_reason)
    assert seen.code == 13
    assert 0 < len(seen.reason.encode()) <= 1024


async def test_handshake_setup_failure_closes_with_internal_error(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_machine(**kwargs: object) -> theta.core.ServerHandshake:
        raise RuntimeError("no handshake machine")

    monkeypatch.setattr(theta._server, "ServerHandshake", broken_machine)
    server = await start_server(nursery, echo)
    with trio.fail_after(5), pytest.raises(HandshakeRejected) as info:
        async with theta.connect("127.0.0.1", server.port, client_config()):
            pytest.fail("the session must not be established")
    assert info.value.code is ErrorCode.INTERNAL_ERROR  # not the QUIC layer's code 0x1
    assert any("handshake with" in record.message for record in caplog.records)


async def test_an_error_unwrapped_from_a_nursery_keeps_its_cause_and_context() -> None:
    from theta._groups import single_error

    cause, context = KeyError("cause"), LookupError("context")

    async def fail() -> None:
        try:
            raise context
        except LookupError:
            raise ValueError("inner") from cause

    with pytest.raises(ValueError, match="inner") as raised, single_error():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
    assert raised.value.__cause__ is cause
    assert raised.value.__context__ is context


async def test_a_send_that_saw_the_peers_close_first_agrees_with_session_closed(
    nursery: trio.Nursery,
) -> None:
    """The peer's QUIC close can reach a send before the session's own tasks: the send
    reports the peer's close, and so does ``session.closed`` once the block has raised
    that report (closing the session must not claim the end as this side's)."""
    server = await start_server(nursery, echo)
    sessions: list[Session] = []

    async def send_after_the_peers_close() -> None:
        async with theta.connect("127.0.0.1", server.port, client_config()) as session:
            sessions.append(session)
            # The peer's close arrives; no task of the session has run since.
            session._connection._terminate(ConnectionClosedByPeer(13, "going away"))
            await session.replication.send(b"late", tick=1)

    with trio.fail_after(5), pytest.raises(SessionClosed) as raised:
        await send_after_the_peers_close()
    assert (raised.value.code, raised.value.by_peer) == (13, True)
    (session,) = sessions
    assert session.closed is not None
    assert (session.closed.code, session.closed.reason, session.closed.by_peer) == (
        13,
        "going away",
        True,
    )
