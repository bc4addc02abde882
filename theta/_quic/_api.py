"""Entry points: ``open_quic_connection`` (client) and ``serve_quic`` (server).

Each owns a nursery and a socket; leaving the ``async with`` (or cancelling
``serve_quic``) sends a best-effort CONNECTION_CLOSE, cancels every task it started and
closes the socket. No ``ExceptionGroup`` escapes when a single exception explains the
failure.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from . import _engine
from ._config import QuicConfig, check_port
from ._connection import QuicConnection
from ._endpoint import Address, UdpEndpoint, open_udp_socket
from ._errors import QUIC_INTERNAL_ERROR, ConnectionRefused, NameResolutionTimeout
from ._groups import single_error
from ._retry import RetryTokens

logger = logging.getLogger("theta.quic")

ConnectionHandler = Callable[[QuicConnection], Awaitable[None]]
"""A server's per-connection coroutine function."""

_HANDLER_FAILED = 0x1


async def _resolve(host: str, port: int, deadline: float) -> list[tuple[int, Address]]:
    """Every UDP address of ``host:port``, in the resolver's order, duplicates dropped;
    resolving counts against the handshake ``deadline``."""
    with trio.move_on_at(deadline):
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        addresses: list[tuple[int, Address]] = []
        for family, _, _, _, sockaddr in infos:
            if (int(family), tuple(sockaddr)) not in addresses:
                addresses.append((int(family), tuple(sockaddr)))
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"no address for {host!r}")
        return addresses
    raise NameResolutionTimeout(QUIC_INTERNAL_ERROR, f"resolving {host!r} did not complete in time")


@contextlib.asynccontextmanager
async def open_quic_connection(
    host: str, port: int, config: QuicConfig, *, deadline: float | None = None
) -> AsyncIterator[QuicConnection]:
    """Connect to ``host:port`` and yield the connection once the handshake is complete.

    Resolving the name and the handshake must end by ``deadline`` (default: now +
    ``config.handshake_timeout``). The addresses the name resolves to are tried in turn
    while each answers that nothing listens there (ICMP port unreachable), e.g. ``::1``
    then ``127.0.0.1`` for ``localhost``; one that stays silent takes the rest of the
    deadline. Raises :class:`HandshakeTimeout` (:class:`NameResolutionTimeout` while
    resolving), :class:`ConnectionRefused` (every address refused) or
    :class:`TransportError` (e.g. certificate rejected) if the handshake fails. On a
    normal exit it first waits (at most ``idle_timeout``) until the peer has acknowledged
    everything sent; on any exit it closes with code 0 without waiting out the closing
    period, then closes the socket. ``port`` must be an ``int`` in 1..65535.
    """
    check_port(port, allow_zero=False)
    if deadline is None:
        deadline = trio.current_time() + config.handshake_timeout
    addresses = await _resolve(host, port, deadline)
    async with contextlib.AsyncExitStack() as stack:
        for index, (family, addr) in enumerate(addresses):
            attempt = _open_connection(host, family, addr, config, deadline)
            try:
                connection = await stack.enter_async_context(attempt)
            except ConnectionRefused:
                if index == len(addresses) - 1:
                    raise
                logger.debug("nothing listens at %s, trying the next address", addr)
                continue
            yield connection
            return


@contextlib.asynccontextmanager
async def _open_connection(
    host: str, family: int, addr: Address, config: QuicConfig, deadline: float
) -> AsyncIterator[QuicConnection]:
    bind_host = "::" if family == socket.AF_INET6 else "0.0.0.0"
    configuration = _engine.build_configuration(config, is_client=True, server_name=host)
    try:
        sock = open_udp_socket(family, bind_host, 0, config.socket_buffer_size)
    except BaseException:
        _engine.release_configuration(configuration)
        raise
    endpoint = UdpEndpoint(sock)
    try:
        # A connected socket hears ICMP port unreachable: a refused connect fails at once.
        sock.connect(addr)
        with single_error():
            async with trio.open_nursery() as nursery:
                engine = _engine.create_connection(
                    configuration, max_peer_streams=config.max_concurrent_peer_streams
                )
                connection = QuicConnection(
                    endpoint, engine, config, addr, is_client=True, handshake_deadline=deadline
                )
                endpoint.add_client_connection(connection)
                connection.connect()
                # The transport is shielded from a cancellation of the caller's scope until
                # the block has been left: what the block sends on its way out (a session's
                # GOING_AWAY) still goes out, then the close below.
                transport = trio.CancelScope(shield=True)
                nursery.start_soon(_run_transport, transport, endpoint, connection)
                try:
                    await connection.handshake_complete.wait()
                    if connection.error is not None:
                        raise connection.error
                    yield connection
                    with trio.move_on_after(config.idle_timeout):
                        await connection.wait_acknowledged()
                finally:
                    connection.close_nowait()
                    transport.cancel()
    finally:
        endpoint.close()
        _engine.release_configuration(configuration)


async def _run_transport(
    scope: trio.CancelScope, endpoint: UdpEndpoint, connection: QuicConnection
) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(endpoint.run)
            await connection.run()


class QuicServer:
    """A running server (what ``serve_quic`` hands to ``task_status.started``)."""

    def __init__(self, endpoint: UdpEndpoint, config: QuicConfig) -> None:
        self._endpoint = endpoint
        self.config = config

    @property
    def address(self) -> Address:
        """The bound local address (``(host, port, ...)``)."""
        return self._endpoint.local_address

    @property
    def port(self) -> int:
        """The bound UDP port."""
        return int(self._endpoint.local_address[1])

    @property
    def connections(self) -> frozenset[QuicConnection]:
        """Connections currently alive (handshaking or established)."""
        return frozenset(self._endpoint.connections)

    @property
    def refused_initials(self) -> int:
        """Initials silently dropped because a cap was reached."""
        return self._endpoint.refused_initials

    @property
    def retries_sent(self) -> int:
        """Initials answered with a Retry (see ``QuicConfig.address_validation``)."""
        return self._endpoint.retries_sent


def _wants_retry(config: QuicConfig, handshaking: int) -> bool:
    if config.address_validation == "under_load":
        return handshaking >= max(1, config.max_handshakes // 2)
    return config.address_validation == "always"


async def serve_quic(
    handler: ConnectionHandler,
    host: str,
    port: int,
    config: QuicConfig,
    *,
    task_status: trio.TaskStatus[QuicServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve QUIC on ``host:port`` until cancelled, running ``handler(connection)`` in a
    new task for each connection once its handshake is complete.

    When the handler returns, the server waits (at most ``idle_timeout``) until the peer
    has acknowledged everything sent, then closes with code 0 without waiting out the
    closing period; if the handler raises, the exception is logged and the connection
    closed with code 1 at once. Caps and what
    happens beyond them are described in ``theta._quic._endpoint``. ``port`` must be an
    ``int`` in 0..65535 (0: any free port).
    """
    check_port(port, allow_zero=True)
    configuration = _engine.build_configuration(config, is_client=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = open_udp_socket(family, host, port, config.socket_buffer_size)
    except BaseException:
        _engine.release_configuration(configuration)
        raise
    endpoint = UdpEndpoint(sock)
    tokens = RetryTokens(lifetime=config.handshake_timeout)

    async def run_handler(connection: QuicConnection) -> None:
        code, reason = 0, ""
        try:
            await handler(connection)
            with trio.move_on_after(config.idle_timeout):
                await connection.wait_acknowledged()
        except Exception:
            logger.exception("QUIC connection handler failed")
            code, reason = _HANDLER_FAILED, "handler failed"
        finally:
            with trio.CancelScope(shield=True):
                await connection.close(code, reason, wait=False)

    try:
        with single_error():
            async with trio.open_nursery() as nursery:

                def established(connection: QuicConnection) -> None:
                    nursery.start_soon(run_handler, connection)

                def new_connection(
                    header: _engine.PacketHeader, addr: Address
                ) -> QuicConnection | None:
                    if (
                        len(endpoint.connections) >= config.max_connections
                        or endpoint.handshaking >= config.max_handshakes
                    ):
                        endpoint.refused_initials += 1
                        return None
                    now = trio.current_time()
                    cids = [header.destination_cid]
                    original_cid, retry_cid, validated = header.destination_cid, None, None
                    ours = (
                        tokens.validate(addr, header.token, header.destination_cid, now)
                        if header.token
                        else None
                    )
                    wants_retry = _wants_retry(config, endpoint.handshaking)
                    if ours:  # the client came back after our Retry
                        original_cid, fresh = ours
                        if not fresh and wants_retry:
                            # It would ignore a second Retry; it gets in once the load
                            # has gone (its handshake timeout permitting).
                            return None
                        retry_cid = header.destination_cid
                        if fresh and tokens.first_use(retry_cid, now):  # not a replay
                            validated = addr
                        if not endpoint.routes(original_cid):  # late copies of its first Initial
                            cids.append(original_cid)
                    elif wants_retry:
                        retry_cid = secrets.token_bytes(_engine.CID_LENGTH)
                        token = tokens.issue(addr, header.destination_cid, retry_cid, now)
                        retry = _engine.retry_packet(header, retry_cid, token)
                        endpoint.send_datagrams_nowait([(retry, addr)])
                        endpoint.retries_sent += 1
                        return None
                    # Otherwise no token, or one this endpoint did not issue for this
                    # address (another server's NEW_TOKEN, say): as if there were none
                    # (RFC 9000, section 8.1.3). A Retry token presented from a new address
                    # cannot work: that client rejects a connection without the Retry's ids.
                    engine = _engine.create_connection(
                        configuration,
                        max_peer_streams=config.max_concurrent_peer_streams,
                        original_destination_cid=original_cid,
                        retry_source_cid=retry_cid,
                        validated_address=validated,
                    )
                    connection = QuicConnection(endpoint, engine, config, addr, is_client=False)
                    connection.on_established = established
                    if validated is not None:
                        connection.on_undecryptable = functools.partial(
                            tokens.forget, header.destination_cid
                        )
                    endpoint.add_connection(connection, [*cids, engine.host_cid])
                    nursery.start_soon(connection.run)
                    return connection

                endpoint.new_connection = new_connection
                nursery.start_soon(endpoint.run)
                task_status.started(QuicServer(endpoint, config))
    finally:
        for connection in list(endpoint.connections):
            connection.close_nowait()
        endpoint.close()
        _engine.release_configuration(configuration)
