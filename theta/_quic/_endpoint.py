"""One UDP socket shared by the connections of a client or a server.

The receive loop reads the non-blocking socket until it would block (at most
``_BATCH`` datagrams per turn), routes each datagram to a connection's inbox, then wakes
every affected connection once; it never awaits application code.

Server demultiplexing: by every connection id a connection has issued (plus the client's
original destination id), kept per connection so removal is O(ids of that connection).
A new connection is created only for an INITIAL packet in a datagram of ≥ 1200 bytes with
a supported version. Unknown versions in datagrams of ≥ 1200 bytes get a Version
Negotiation reply; a VN packet is never answered.

Beyond the caps (``QuicConfig.max_connections`` alive, ``max_handshakes`` handshaking) the
server **silently drops** the Initial: no state, no crypto, no reply, so an overloaded
server spends nothing on connections it will not serve. The client keeps retransmitting
and either gets in when a slot frees up or fails with ``HandshakeTimeout``. Refusals are
counted in :attr:`UdpEndpoint.refused_initials`. Below the caps, the server's
``new_connection`` hook may answer with a Retry instead (``QuicConfig.address_validation``).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from . import _engine
from ._timers import TimerQueue

if TYPE_CHECKING:
    from ._connection import QuicConnection

logger = logging.getLogger("theta.quic")

Address = tuple[Any, ...]
"""A numeric socket address tuple: ``(host, port)`` or ``(host, port, flow, scope)``."""

NewConnection = Callable[[_engine.PacketHeader, Address], "QuicConnection | None"]
"""Server hook: create (and start) a connection for an acceptable Initial, or refuse."""

_BATCH = 512
_MAX_DATAGRAM = 65535


def _set_buffer(sock: socket.socket, option: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, size)
    except OSError:
        logger.debug("could not set socket buffer option %d to %d", option, size)


def open_udp_socket(family: int, host: str, port: int, buffer_size: int) -> socket.socket:
    """A bound, non-blocking UDP socket with enlarged buffers (best effort)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        _set_buffer(sock, socket.SO_RCVBUF, buffer_size)
        _set_buffer(sock, socket.SO_SNDBUF, buffer_size)
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class UdpEndpoint:
    """A UDP socket plus the table routing datagrams to connections.

    ``new_connection`` (set by servers only) is called with the packet header and source
    address of an acceptable Initial and returns the connection to create, or ``None``.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.local_address: Address = sock.getsockname()
        self.new_connection: NewConnection | None = None
        self._by_cid: dict[bytes, QuicConnection] = {}
        self.connections: set[QuicConnection] = set()
        self._client: QuicConnection | None = None
        self._send_lock = trio.Lock()
        self.timers = TimerQueue()
        """The deadlines of this endpoint's connection drivers."""
        self.handshaking = 0
        """Connections whose handshake is under way (kept by the connections)."""
        self.refused_initials = 0
        """Initials dropped because a cap was reached."""
        self.retries_sent = 0
        """Initials answered with a Retry (address validation)."""
        self.dropped_datagrams = 0
        """Datagrams not delivered to a connection: malformed, unroutable, a full
        connection inbox, and Initials refused at a cap, with an invalid token, or
        answered with a Retry."""
        self.receive_errors = 0
        """OSErrors from the socket's receive (e.g. ICMP-induced ECONNREFUSED)."""

    # -- routing table ----------------------------------------------------------------

    def add_client_connection(self, connection: QuicConnection) -> None:
        """Route every datagram to ``connection`` (client endpoints)."""
        self._client = connection
        self.connections.add(connection)

    def add_connection(self, connection: QuicConnection, cids: list[bytes]) -> None:
        """Register a server connection under ``cids``."""
        self.connections.add(connection)
        for cid in cids:
            self.add_cid(connection, cid)

    def routes(self, cid: bytes) -> bool:
        """Whether datagrams for ``cid`` go to a connection already."""
        return cid in self._by_cid

    def add_cid(self, connection: QuicConnection, cid: bytes) -> None:
        """Route ``cid`` to ``connection`` (from ConnectionIdIssued)."""
        if self._client is None and connection in self.connections:
            self._by_cid[cid] = connection
            connection.cids.add(cid)

    def remove_cid(self, connection: QuicConnection, cid: bytes) -> None:
        """Stop routing ``cid`` (from ConnectionIdRetired)."""
        if self._by_cid.get(cid) is connection:
            del self._by_cid[cid]
        connection.cids.discard(cid)

    def remove_connection(self, connection: QuicConnection) -> None:
        """Forget ``connection`` and all its ids."""
        self.connections.discard(connection)
        for cid in connection.cids:
            if self._by_cid.get(cid) is connection:
                del self._by_cid[cid]
        connection.cids.clear()

    # -- sending ----------------------------------------------------------------------

    async def send_datagrams(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """Send each datagram, waiting for the socket only when its buffer is full."""
        sock = self.socket
        for data, addr in datagrams:
            while True:
                try:
                    sock.sendto(data, addr)
                except BlockingIOError:
                    async with self._send_lock:
                        await trio.lowlevel.wait_writable(sock)
                    continue
                except OSError as exc:
                    logger.debug("UDP send to %r failed: %r", addr, exc)
                    self._socket_error(exc)
                break

    def send_datagrams_nowait(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """Best-effort send that never blocks (used on close paths)."""
        for data, addr in datagrams:
            try:
                self.socket.sendto(data, addr)
            except OSError as exc:
                self._socket_error(exc)
                return

    def _socket_error(self, exc: OSError) -> None:
        """An ICMP error (port or host unreachable) is reported by whichever socket call
        comes next, a send as well as a receive: tell a client's connection."""
        if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH) and self._client is not None:
            self._client.peer_unreachable()

    # -- receiving --------------------------------------------------------------------

    async def run(self) -> None:
        """The endpoint's tasks, until cancelled: the receive loop and the timer queue."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.timers.run)
            await self.receive_loop()

    async def receive_loop(self) -> None:
        """Read, route and wake, forever (until cancelled)."""
        sock = self.socket
        while True:
            woken: set[QuicConnection] = set()
            for _ in range(_BATCH):
                try:
                    data, addr = sock.recvfrom(_MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError as exc:
                    # ICMP errors (ECONNREFUSED...) surface here; they are not fatal.
                    self.receive_errors += 1
                    if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
                        logger.debug("UDP receive error: %r", exc)
                    self._socket_error(exc)  # only a connected client socket sees ICMP
                    continue
                connection = self._route(data, addr)
                if connection is None or not connection.deliver(data, addr):
                    self.dropped_datagrams += 1
                else:
                    woken.add(connection)
            else:
                for connection in woken:
                    connection.wake()
                await trio.lowlevel.checkpoint()
                continue
            for connection in woken:
                connection.wake()
            await trio.lowlevel.wait_readable(sock)

    def _route(self, data: bytes, addr: Address) -> QuicConnection | None:
        if self._client is not None:
            return self._client
        cid = _engine.short_header_destination(data, _engine.CID_LENGTH)
        if cid is not None:  # established traffic: no header object needed
            return self._by_cid.get(cid)
        header = _engine.parse_header_untrusted(data, _engine.CID_LENGTH)
        if header is None:
            return None
        if header.version is not None and header.version not in _engine.SUPPORTED_VERSIONS:
            if not header.is_version_negotiation and len(data) >= 1200:
                self.send_datagrams_nowait([(_engine.version_negotiation_reply(header), addr)])
            return None
        connection = self._by_cid.get(header.destination_cid)
        if connection is not None:
            return connection
        if self.new_connection is None or not header.is_initial or len(data) < 1200:
            return None
        return self.new_connection(header, addr)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
