"""``theta.serve``: accept sessions and run a handler for each."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import cast

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from theta._config import ServerConfig
from theta._framed import FramedStream
from theta._groups import single_error
from theta._quic import (
    QuicConnection,
    QuicConnectionError,
    QuicServer,
    QuicStream,
    StreamResetError,
    StreamStoppedError,
    check_port,
    serve_quic,
)
from theta._session import Session
from theta._transport import server_quic_config
from theta.core import (
    Channel,
    ErrorCode,
    FrameDecoder,
    Message,
    ProtocolError,
    ProtocolViolation,
    ServerHandshake,
    SessionReject,
)

__all__ = ["Server", "SessionHandler", "serve"]

logger = logging.getLogger("theta")

SessionHandler = Callable[[Session], Awaitable[object]]
"""``await handler(session)`` runs once per established session."""

_SHUTDOWN_GRACE = 2.0  # longest wait for sessions to close on shutdown
_REJECT_GRACE = 1.0  # longest wait for a SessionReject to be acknowledged


class Server:
    """A running server, handed to ``task_status.started()`` by :func:`serve`."""

    def __init__(self, transport: QuicServer, sessions: set[Session]) -> None:
        self._transport = transport
        self._sessions = sessions

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when 0 was asked for."""
        address = self._transport.address
        return str(address[0]), int(address[1])

    @property
    def port(self) -> int:
        """The bound UDP port."""
        return self.address[1]

    @property
    def sessions(self) -> frozenset[Session]:
        """The established sessions right now."""
        return frozenset(self._sessions)


async def serve(
    handler: SessionHandler,
    host: str,
    port: int,
    config: ServerConfig,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve Theta sessions on ``host:port`` (UDP) until cancelled.

    Calls ``task_status.started(server)`` once bound. Each connection runs the handshake
    (refusals answer ``SessionReject`` and close with its code; a silent client is closed
    with ``HANDSHAKE_TIMEOUT``), then ``await handler(session)`` inside the session's
    nursery. A handler returning closes its session with ``NO_ERROR``; raising closes only
    that session with ``INTERNAL_ERROR`` (and is logged). Cancellation closes every
    session with ``GOING_AWAY`` before the socket closes. ``port`` must be an ``int`` in
    0..65535 (0: any free port).

    The handler lives no longer than its session: when the session ends by an error
    (protocol violation, heartbeat timeout, lost connection) it is cancelled at once;
    when the peer closes, a second after it has taken what the peer sent from the channels
    (waited for while the handler keeps taking). Cleanup that must finish belongs under a
    shielded cancel scope with a timeout.
    """
    check_port(port, allow_zero=True)
    sessions: set[Session] = set()
    handshaking: set[QuicConnection] = set()
    signing_key = config.signing_key or Ed25519PrivateKey.generate()

    async def on_connection(connection: QuicConnection) -> None:
        handshaking.add(connection)
        try:
            session = await _accept(connection, config, signing_key)
        finally:
            handshaking.discard(connection)
        if session is None:
            return
        sessions.add(session)
        try:
            await session.run(handler)
        finally:
            sessions.discard(session)

    with single_error():
        async with trio.open_nursery() as nursery:
            # The transport runs shielded so that sessions can say GOING_AWAY on shutdown.
            transport_scope = trio.CancelScope(shield=True)

            async def run_transport(*, task_status: trio.TaskStatus[QuicServer]) -> None:
                with transport_scope:
                    await serve_quic(
                        on_connection,
                        host,
                        port,
                        server_quic_config(config),
                        task_status=task_status,
                    )

            transport = cast(QuicServer, await nursery.start(run_transport))
            task_status.started(Server(transport, sessions))
            try:
                await trio.sleep_forever()
            finally:
                for connection in list(handshaking):
                    connection.close_nowait(ErrorCode.GOING_AWAY, "server shutting down")
                with trio.CancelScope(shield=True), trio.move_on_after(_SHUTDOWN_GRACE):
                    async with trio.open_nursery() as closers:
                        for session in list(sessions):
                            closers.start_soon(
                                session.close, ErrorCode.GOING_AWAY, "server shutting down"
                            )
                transport_scope.cancel()


async def _accept(
    connection: QuicConnection, config: ServerConfig, signing_key: Ed25519PrivateKey
) -> Session | None:
    """Run the server side of the handshake; the session, or ``None`` once refused.

    The handshake deadline runs from the moment the QUIC connection was accepted (spec
    section 4.1), so it covers the QUIC handshake too.
    """
    now = connection.created_at
    try:
        machine = ServerHandshake(
            schema_hash=config.schema_hash,
            capabilities=config.capabilities,
            signing_key=signing_key,
            authenticator=config.authenticator,
            default_role=config.default_role,
            peer_address=(str(connection.remote_address[0]), int(connection.remote_address[1])),
            now=now,
            timeout=config.handshake_timeout,
        )
        with trio.move_on_at(now + config.handshake_timeout), single_error():
            return await _handshake(connection, config, machine)
        connection.close_nowait(ErrorCode.HANDSHAKE_TIMEOUT, "handshake timed out")
    except Exception as error:
        code, reason = _close_code_for(error)
        if code is ErrorCode.INTERNAL_ERROR:
            logger.exception("handshake with %s failed", connection.remote_address)
        elif code is not None:
            logger.info(
                "handshake with %s failed: %s: %s", connection.remote_address, code.name, reason
            )
        if code is not None:
            connection.close_nowait(code, reason)
    return None


def _close_code_for(error: BaseException) -> tuple[ErrorCode | None, str]:
    """The code to close a failed handshake with (``None``: the connection is gone)."""
    if isinstance(error, BaseExceptionGroup):  # both tasks failed at once: the first wins
        for inner in error.exceptions:
            code, reason = _close_code_for(inner)
            if code is not ErrorCode.INTERNAL_ERROR:
                return code, reason
        return ErrorCode.INTERNAL_ERROR, "internal error"
    if isinstance(error, ProtocolError):
        return error.code, error.reason
    if isinstance(error, StreamResetError | StreamStoppedError):
        return ErrorCode.PROTOCOL_VIOLATION, f"the client aborted a stream ({error!r})"
    if isinstance(error, QuicConnectionError | trio.BrokenResourceError | trio.ClosedResourceError):
        return None, ""
    return ErrorCode.INTERNAL_ERROR, "internal error"


async def _handshake(
    connection: QuicConnection, config: ServerConfig, machine: ServerHandshake
) -> Session | None:
    """Answer the hello on the first stream and verify the confirm in this task, while a
    second task identifies every other stream by its first frame as it arrives (so a
    misplaced hello or a broken stream fails the handshake at once, with its code) and
    holds the two channels unread until the confirm is verified.

    Frames that arrived before the connection ended still count: a client may send its
    confirm, the channels and its close in one flight, and its session then runs (and
    ends at once) like any other.
    """
    limits = config.frame_limits
    channels: dict[Channel, FramedStream] = {}
    identified = trio.Event()

    async def accept() -> QuicStream:
        try:
            return await connection.accept_stream()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if connection.error is not None:
                raise connection.error from None
            raise

    async def first_frame(framed: FramedStream) -> Message:
        message = await framed.receive()
        if message is None:
            raise ProtocolViolation("a stream ended before its first frame")
        return message

    async def identify_channels() -> None:
        while len(channels) < 2:
            framed = FramedStream(await accept(), FrameDecoder(None, limits=limits))
            await first_frame(framed)
            channel = framed.decoder.channel
            assert channel is not None
            if channel is Channel.CONTROL:
                raise ProtocolViolation("SessionHello must be the first frame of the first stream")
            if channel in channels:
                raise ProtocolViolation(f"a second stream for the {channel.name.lower()} channel")
            channels[channel] = framed
        identified.set()

    control = FramedStream(await accept(), FrameDecoder(None, limits=limits))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(identify_channels)
        hello = await first_frame(control)
        if control.decoder.channel is not Channel.CONTROL:
            raise ProtocolViolation("SessionHello must be the first frame of the first stream")
        reply = machine.receive(hello, trio.current_time())
        if isinstance(reply, SessionReject):
            nursery.cancel_scope.cancel()
        else:
            assert reply is not None
            await control.send(reply)
            control.stream.request_flush()  # the answer to the hello is complete
            confirm = await control.receive()
            if confirm is None:
                raise ProtocolViolation("the control stream ended during the handshake")
            machine.receive(confirm, trio.current_time())
            assert machine.is_established
            await identified.wait()
    if isinstance(reply, SessionReject):
        await _reject(connection, control, reply)
        return None
    if connection.pending_streams:
        raise ProtocolViolation("a stream beyond the three channels was opened")
    return Session(
        connection=connection,
        control=control,
        replication=channels[Channel.REPLICATION],
        assets=channels[Channel.ASSETS],
        handshake=machine,
        config=config,
        established_at=trio.current_time(),
    )


async def _reject(connection: QuicConnection, control: FramedStream, reply: SessionReject) -> None:
    """Send the SessionReject, give it a moment to arrive, then close with its code."""
    logger.info("refused session from %s: %s", connection.remote_address, reply.reason)
    try:
        with trio.move_on_after(_REJECT_GRACE):
            await control.send(reply)
            await control.send_eof()
            await connection.wait_acknowledged()
    finally:  # the reject's code, even when the handshake deadline cut the grace short
        connection.close_nowait(reply.code, reply.reason)
