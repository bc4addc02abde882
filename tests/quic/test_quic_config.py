"""TLS configuration, verification failures, misuse and exception shapes."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import trio

from theta._quic import (
    ConnectionClosedByPeer,
    QuicConfig,
    QuicConnection,
    QuicServer,
    TransportError,
    _engine,
    open_quic_connection,
    serve_quic,
)

from .quic_helpers import client_config, echo_handler, server_config, start_server


async def _roundtrip(connection: QuicConnection) -> None:
    stream = await connection.open_stream()
    await stream.send_all(b"ping")
    assert await stream.receive_some() == b"ping"


async def test_key_log_file_is_written(echo_server: QuicServer, tmp_path: Path) -> None:
    key_log = tmp_path / "keys.log"
    config = dataclasses.replace(client_config(), key_log_file=key_log)
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", echo_server.port, config) as conn:
            await _roundtrip(conn)
    text = key_log.read_text()
    assert "CLIENT_HANDSHAKE_TRAFFIC_SECRET" in text
    assert "SERVER_TRAFFIC_SECRET_0" in text


def test_a_configuration_that_fails_leaves_no_key_log_file_open(tmp_path: Path) -> None:
    config = QuicConfig(certificate=b"not a certificate", private_key=b"not a key")
    config = dataclasses.replace(config, key_log_file=tmp_path / "keys.log")
    with pytest.raises(ValueError, match="no usable PEM certificates"):
        _engine.build_configuration(config, is_client=False)
    assert not (tmp_path / "keys.log").exists()  # opened only once nothing else can fail


async def test_insecure_option_connects_and_warns(
    echo_server: QuicServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = QuicConfig(insecure_skip_verify_for_tests=True)
    with caplog.at_level(logging.WARNING, logger="theta.quic"), trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", echo_server.port, config) as conn:
            await _roundtrip(conn)
    assert "verification is OFF" in caplog.text


async def test_wrong_server_name_is_rejected(echo_server: QuicServer) -> None:
    config = dataclasses.replace(client_config(), server_name="not-the-cert-name.example")
    with trio.fail_after(10), pytest.raises(TransportError) as caught:
        async with open_quic_connection("127.0.0.1", echo_server.port, config):
            pytest.fail("must not connect")  # pragma: no cover
    assert caught.value.code >= 0x100  # a TLS alert (CRYPTO_ERROR range)


async def test_body_exception_escapes_unwrapped(echo_server: QuicServer) -> None:
    with trio.fail_after(10), pytest.raises(ValueError, match="from the body"):
        async with open_quic_connection("127.0.0.1", echo_server.port, client_config()):
            raise ValueError("from the body")


def test_server_needs_certificate_and_key() -> None:
    with pytest.raises(ValueError, match="certificate"):
        _engine.build_configuration(QuicConfig(), is_client=False)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_datagram_size"):
        QuicConfig(max_datagram_size=1000)
    with pytest.raises(ValueError, match=r"max_datagram_size must be in 1200\.\.65527"):
        QuicConfig(max_datagram_size=65528)
    assert QuicConfig(max_datagram_size=65527).max_datagram_size == 65527
    with pytest.raises(ValueError, match="idle_timeout must be positive"):
        QuicConfig(idle_timeout=0)
    with pytest.raises(ValueError, match="handshake_timeout must be positive"):
        QuicConfig(handshake_timeout=float("nan"))
    with pytest.raises(ValueError, match="handshake_timeout must be finite"):
        QuicConfig(handshake_timeout=float("inf"))


@pytest.mark.parametrize(
    ("port", "error"), [(0, ValueError), (65536, ValueError), (-1, ValueError), ("1", TypeError)]
)
async def test_client_port_must_be_a_udp_port(port: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="port must be"):
        async with open_quic_connection("127.0.0.1", port, client_config()):  # type: ignore[arg-type]
            pytest.fail("must not connect")  # pragma: no cover


@pytest.mark.parametrize(
    ("port", "error"), [(65536, ValueError), (-1, ValueError), (True, TypeError), (1.0, TypeError)]
)
async def test_server_port_must_be_a_udp_port(port: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="port must be"):
        await serve_quic(echo_handler, "127.0.0.1", port, server_config())  # type: ignore[arg-type]


async def test_peer_unidirectional_stream_is_refused(nursery: trio.Nursery) -> None:
    accepted: list[QuicConnection] = []

    async def handler(connection: QuicConnection) -> None:
        accepted.append(connection)
        await echo_handler(connection)

    server = await start_server(nursery, handler)
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", server.port, client_config()) as conn:
            engine = conn._quic
            uni = engine.get_next_available_stream_id(is_unidirectional=True)
            engine.send_stream_data(uni, b"not allowed in theta/1")
            conn.wake()
            await _roundtrip(conn)  # bidirectional streams still work
            while accepted[0].unidirectional_streams_refused == 0:
                await _roundtrip(conn)
            assert accepted[0].unidirectional_streams_refused == 1


@pytest.mark.parametrize("close", [False, True], ids=["alone", "with the peer's close"])
async def test_a_refused_unidirectional_stream_is_reported_unless_the_peer_closed(
    nursery: trio.Nursery, close: bool
) -> None:
    """The hook hears of a peer's unidirectional stream after the round that refused it;
    when the peer's CONNECTION_CLOSE came in the same round, the close explains the end
    and the hook is not called."""
    outcome: trio.MemorySendChannel[tuple[bool, BaseException | None]]
    outcome, outcomes = trio.open_memory_channel[tuple[bool, BaseException | None]](1)

    hooked = trio.Event()

    async def handler(connection: QuicConnection) -> None:
        heard = trio.Event()
        connection.on_unidirectional_stream = heard.set
        hooked.set()

        async def until(event: trio.Event, race: trio.Nursery) -> None:
            await event.wait()
            race.cancel_scope.cancel()

        async with trio.open_nursery() as race:
            race.start_soon(until, heard, race)
            race.start_soon(until, connection.terminated, race)
        await outcome.send((heard.is_set(), connection.error))

    server = await start_server(nursery, handler)
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", server.port, client_config()) as conn:
            await hooked.wait()
            engine = conn._quic
            uni = engine.get_next_available_stream_id(is_unidirectional=True)
            engine.send_stream_data(uni, b"not allowed in theta/1")
            if close:  # the data, then the close: two datagrams, read in one batch
                conn.close_nowait(5, "bye")
            else:
                conn.wake()
            heard, error = await outcomes.receive()
    if close:
        assert not heard
        assert isinstance(error, ConnectionClosedByPeer)
        assert error.code == 5
    else:
        assert heard
        assert error is None


async def test_engine_exception_fails_only_that_connection(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo_handler)
    with trio.fail_after(20):
        async with (
            open_quic_connection("127.0.0.1", server.port, client_config()) as victim,
            open_quic_connection("127.0.0.1", server.port, client_config()) as bystander,
        ):
            await _roundtrip(victim)
            assert len(server.connections) == 2
            victim_port = victim.local_address[1]
            (broken,) = (c for c in server.connections if c.remote_address[1] == victim_port)

            def explode(data: bytes, addr: object, now: float) -> None:
                raise IndexError("engine bug on attacker input")

            broken._quic.receive_datagram = explode  # type: ignore[method-assign]
            stream = await victim.open_stream()
            await stream.send_all(b"trigger")
            await broken.terminated.wait()
            assert isinstance(broken.error, TransportError)
            assert "engine error" in broken.error.reason
            assert broken not in server.connections
            await _roundtrip(bystander)
            await victim.close(wait=False)
