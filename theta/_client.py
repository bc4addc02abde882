"""``theta.connect``: open a session to a server."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

from theta._config import ClientConfig
from theta._errors import ServerUnreachable
from theta._framed import FramedStream
from theta._groups import single_error
from theta._quic import (
    ConnectionClosedByPeer,
    NameResolutionTimeout,
    QuicConnection,
    StreamResetError,
    StreamStoppedError,
    check_port,
    open_quic_connection,
)
from theta._quic import ConnectionRefused as QuicConnectionRefused
from theta._quic import HandshakeTimeout as QuicHandshakeTimeout
from theta._session import Session
from theta._transport import client_quic_config
from theta.core import (
    Channel,
    ChannelOpen,
    ClientHandshake,
    ErrorCode,
    FrameDecoder,
    HandshakeFailed,
    HandshakeRejected,
    HandshakeTimeout,
    ProtocolError,
    SessionClose,
)

__all__ = ["connect"]


@contextlib.asynccontextmanager
async def connect(
    host: str, port: int, config: ClientConfig | None = None
) -> AsyncIterator[Session]:
    """Open a Theta session to ``host:port``; yield it once established.

    Establishing means resolving ``host``, QUIC + TLS, the signed handshake and the
    replication and assets channels, all within ``config.handshake_timeout``; each address
    ``host`` resolves to is tried in turn while the host answers that nothing listens
    there. Raises :class:`HandshakeRejected` (the server's code, reason, version and schema
    hash), :class:`HandshakeFailed` (e.g. a bad signature), :class:`HandshakeTimeout`
    (:class:`ServerUnreachable` when nothing answered at that address, or the host said
    nothing listens there), or the transport's error (e.g. the certificate was refused);
    ``socket.gaierror`` if ``host`` does not resolve, ``OSError`` if ``ca_certs`` or
    ``key_log_file`` cannot be read or written, ``ValueError`` if the ``ca_certs`` file
    holds no usable certificate. Leaving the block closes the session gracefully
    (``NO_ERROR``; ``INTERNAL_ERROR`` if the block raised an exception, which then comes out
    unchanged; ``GOING_AWAY`` if it was cancelled) and stops all its tasks. ``port`` must be
    an ``int`` in 1..65535.
    """
    check_port(port, allow_zero=False)
    config = config or ClientConfig()
    deadline = trio.current_time() + config.handshake_timeout
    failure: Exception | None = None  # the block's own, re-raised untouched below
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with single_error():
        try:
            quic = open_quic_connection(host, port, client_quic_config(config), deadline=deadline)
            async with quic as connection:
                session = await _establish(connection, config, deadline)
                async with trio.open_nursery() as nursery:
                    await nursery.start(session.run)
                    try:
                        yield session
                    except Exception as error:
                        # Kept out of the nurseries, which would wrap it in a group (and
                        # unwrapping that would change it): re-raised as it came, below.
                        await session.close(ErrorCode.INTERNAL_ERROR, "client error")
                        failure = error
                    except BaseException:  # cancelled, interrupted
                        await session.close(ErrorCode.GOING_AWAY, "client stopped")
                        raise
                    else:
                        await session.close()
        except NameResolutionTimeout:
            raise ServerUnreachable(
                f"resolving {host!r} did not complete within {config.handshake_timeout:g} s"
            ) from None
        except QuicHandshakeTimeout as error:
            within = f"within {config.handshake_timeout:g} s"
            if error.peer_answered:
                raise HandshakeTimeout(
                    f"the QUIC handshake with {where} did not complete {within}"
                ) from None
            raise ServerUnreachable(f"no answer from {where} {within}") from None
        except QuicConnectionRefused:
            raise ServerUnreachable(
                f"nothing listens at {where} (the network answered: unreachable)"
            ) from None
    if failure is not None:
        raise failure


async def _establish(connection: QuicConnection, config: ClientConfig, deadline: float) -> Session:
    machine = ClientHandshake(
        schema_hash=config.schema_hash,
        capabilities=config.capabilities,
        auth_token=config.auth_token,
        signing_key=config.signing_key,
        timeout=config.handshake_timeout,
    )
    limits = config.frame_limits
    with trio.move_on_at(deadline):
        try:
            control = FramedStream(
                await connection.open_stream(), FrameDecoder(Channel.CONTROL, limits=limits)
            )
            await control.send(machine.start(trio.current_time()))
            control.stream.request_flush()  # the hello joins the TLS Finished now
            reply = await control.receive()
            if reply is None:
                raise HandshakeFailed("the server ended the control stream during the handshake")
            if isinstance(reply, SessionClose):
                # Spec 4.6 lets a peer say SessionClose before its QUIC close, which carries
                # the same code: the server ended the session, it did not break the protocol.
                connection.close_nowait(reply.code, reply.reason)
                raise _closed_during_handshake(reply.code, reply.reason)
            await control.send(machine.receive(reply, trio.current_time()))
            channels = []
            for channel in (Channel.REPLICATION, Channel.ASSETS):
                stream = FramedStream(
                    await connection.open_stream(), FrameDecoder(channel, limits=limits)
                )
                await stream.send(ChannelOpen(channel))
                channels.append(stream)
            for framed in (control, *channels):  # the confirm and both channels are written
                framed.stream.request_flush()
        except HandshakeRejected as error:
            connection.close_nowait(error.code, error.reason)
            raise
        except ProtocolError as error:
            connection.close_nowait(error.code, error.reason)
            if isinstance(error, HandshakeFailed | HandshakeTimeout):
                raise
            raise HandshakeFailed(error.reason, error.code) from None
        except ConnectionClosedByPeer as error:
            raise _closed_during_handshake(error.code, error.reason) from None
        except (StreamResetError, StreamStoppedError) as error:
            connection.close_nowait(ErrorCode.PROTOCOL_VIOLATION, "stream aborted in handshake")
            raise HandshakeFailed(
                f"the server aborted a stream during the handshake ({error!r})",
                ErrorCode.PROTOCOL_VIOLATION,
            ) from None
        replication, assets = channels
        return Session(
            connection=connection,
            control=control,
            replication=replication,
            assets=assets,
            handshake=machine,
            config=config,
            established_at=trio.current_time(),
        )
    connection.close_nowait(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timed out")
    raise HandshakeTimeout(f"the session was not established within {config.handshake_timeout} s")


def _closed_during_handshake(code_number: int, reason: str) -> ProtocolError:
    """The server closed the session (QUIC close or SessionClose) instead of answering."""
    try:
        code = ErrorCode(code_number)
    except ValueError:
        code = ErrorCode.PROTOCOL_VIOLATION
    if code is ErrorCode.NO_ERROR:
        return HandshakeFailed("the server closed the connection during the handshake")
    return HandshakeRejected(
        reason or code.name, code, server_protocol_version=None, server_schema_hash=None
    )
