"""The per-connection driver: one long-lived trio task around one engine connection.

Theory of operation. The endpoint's receive loop appends datagrams to the connection's
inbox and wakes it; stream writers call the engine and wake it. Waking is a flag plus
rescheduling the parked driver task (a wake-up that arrives while the driver is busy is
never lost). Each round the driver task:

1. feeds every inboxed datagram to the engine,
2. fires the engine timer if due, with ``now = max(timer_at, trio.current_time())``,
3. drains and routes every engine event (and, when data was handed to the application,
   gives it a few scheduler passes to answer, so the answer joins this round's ACK),
4. transmits everything the engine has to send (once per round),
5. re-reads the single timer (``min(engine timer, handshake deadline)``) and parks until
   that deadline (kept by the endpoint's timer queue, ``_timers``) or a wake-up.

Every engine call happens in this task or in a stream method while the driver is parked
after step 3, so streams always see the effect of events already routed. Any exception
from the engine (attacker-controlled input) fails only this connection.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio

from . import _engine
from ._config import QuicConfig
from ._errors import (
    QUIC_INTERNAL_ERROR,
    ConnectionClosedByPeer,
    ConnectionRefused,
    HandshakeTimeout,
    IdleTimeout,
    QuicConnectionError,
    TransportError,
)
from ._stats import ConnectionStats
from ._stream import QuicStream

if TYPE_CHECKING:
    from ._endpoint import Address, UdpEndpoint

logger = logging.getLogger("theta.quic")

_INBOX_LIMIT = 4096  # datagrams queued per connection before the endpoint drops
_MAX_REASON_BYTES = 200  # of a CONNECTION_CLOSE reason phrase
_TIMER_STEP = 1e-6  # seconds
_COALESCE_PASSES = 32  # scheduler passes a transmit may wait for writers still writing
_COALESCE_BYTES = 32 * 1024  # ... unless this much is already waiting
_COALESCE_IDLE_PASSES = 3  # ... and stops after this many passes without a new write
_ANSWER_PASSES = 10  # scheduler passes the application gets to answer what it received


def truncate_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, never inside a character."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore")


class QuicConnection:
    """A QUIC connection: open/accept bidirectional streams, close with a code, counters.

    Unidirectional streams opened by the peer are refused with STOP_SENDING (code 0) and
    their data discarded: Theta v1 has none (the session layer treats them as a violation
    through :attr:`unidirectional_streams_refused`).
    """

    def __init__(
        self,
        endpoint: UdpEndpoint,
        engine: _engine.EngineConnection,
        config: QuicConfig,
        peer: Address,
        *,
        is_client: bool,
        handshake_deadline: float | None = None,
    ) -> None:
        self.config = config
        self.is_client = is_client
        self.remote_address: Address = peer
        """Address of the peer: where the connection sends to, which follows a peer whose
        address changed (e.g. a NAT rebinding) once a datagram came from the new one."""
        self._endpoint = endpoint
        self._quic = engine
        self._streams: dict[int, QuicStream] = {}
        self._next_peer_bidi = 0  # index of the next peer-initiated bidi stream
        self._next_peer_uni = 0
        self._accept_send, self._accept_receive = trio.open_memory_channel[QuicStream](
            math.inf  # bounded by the engine's MAX_STREAMS limit
        )
        self._blocked_writers: set[QuicStream] = set()
        self._stream_credit = trio.lowlevel.ParkingLot()  # open_stream() beyond MAX_STREAMS
        self._inbox: list[tuple[bytes, Address]] = []
        self._wake_pending = False
        self._parked: trio.lowlevel.Task | None = None  # the driver task, while parked
        self.timer_deadline = math.inf  # see _timers.Sleeper
        self.timer_queued = math.inf
        self._written_since_transmit = 0
        # Streams that got data, and streams written to, since the last transmit; and
        # the streams whose users said they are done (QuicStream.request_flush).
        self._round_streams: set[QuicStream] = set()
        self._round_written: set[QuicStream] = set()
        self._flushed: set[QuicStream] = set()
        self._acknowledged = trio.Event()
        self._acknowledged_waiters = 0
        self.created_at = trio.current_time()
        """When the connection was created (accepted, for a server), on trio's clock."""
        self._handshake_deadline = (
            self.created_at + config.handshake_timeout
            if handshake_deadline is None
            else handshake_deadline
        )
        self.handshake_complete = trio.Event()
        """Set once the TLS handshake has completed (or the connection is over)."""
        endpoint.handshaking += 1
        self.terminated = trio.Event()
        """Set once the connection is over (its error is in :attr:`error`)."""
        self.error: QuicConnectionError | trio.ClosedResourceError | None = None
        """Why the connection ended: ``ClosedResourceError`` if this side closed it."""
        self._closed_locally = False
        self.cids: set[bytes] = set()
        """Connection ids routed to this connection (maintained by the endpoint)."""
        self.on_established: Callable[[QuicConnection], None] | None = None
        self.unidirectional_streams_refused = 0
        self.peer_opened_unidirectional_stream = False
        """Whether the peer opened a unidirectional stream (refused, see
        :attr:`unidirectional_streams_refused`) in a round that did not also bring the
        peer's close, which would explain the end by itself."""
        self.on_unidirectional_stream: Callable[[], None] | None = None
        """Called by the driver after each round that sets
        :attr:`peer_opened_unidirectional_stream`."""
        self._refused_new_uni = False
        self.on_undecryptable: Callable[[], None] | None = None
        """Server: called when the connection is dropped because nothing in its first
        datagrams decrypted."""
        self._datagrams_sent = self._bytes_sent = 0
        self._datagrams_received = self._bytes_received = 0

    # -- public API ---------------------------------------------------------------------

    @property
    def local_address(self) -> Address:
        """The local UDP address."""
        return self._endpoint.local_address

    async def open_stream(self) -> QuicStream:
        """Open a new bidirectional stream (the peer sees it when data or FIN is sent);
        waits while the peer's MAX_STREAMS limit allows no more."""
        await trio.lowlevel.checkpoint()
        self._raise_if_over()
        while not self._quic.can_open_stream():
            await self._stream_credit.park()  # woken each round and at termination
            self._raise_if_over()
        stream_id = self._quic.get_next_available_stream_id(is_unidirectional=False)
        # An empty write creates the stream in the engine now (and advances its next id)
        # without sending anything: the peer learns of it with the first data or FIN.
        self._quic.send_stream_data(stream_id, b"", end_stream=False)
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    async def accept_stream(self) -> QuicStream:
        """Wait for the peer to open a bidirectional stream; raises once the connection ends."""
        try:
            return await self._accept_receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._raise_if_over()
            raise  # pragma: no cover - channel closed only on termination

    @property
    def pending_streams(self) -> int:
        """Streams the peer opened that :meth:`accept_stream` has not returned yet."""
        return self._accept_receive.statistics().current_buffer_used

    async def close(self, code: int = 0, reason: str = "", *, wait: bool = True) -> None:
        """Close with application error ``code``; ``wait`` for the closing period to end
        (≈3 PTO) or return once the CONNECTION_CLOSE has been handed to the socket."""
        self.close_nowait(code, reason)
        if wait:
            await self.terminated.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def wait_acknowledged(self, streams: Iterable[QuicStream] | None = None) -> None:
        """Wait until the peer has acknowledged every byte and FIN sent on ``streams``
        (default: every stream); returns early once the connection is closing or over.
        Reset streams don't count. Use before a graceful ``close``; the context managers
        do, bounded by the idle timeout."""
        stream_ids = None if streams is None else [stream.stream_id for stream in streams]
        while (
            not self._closed_locally
            and not self.terminated.is_set()
            and self._quic.has_unacknowledged_data(stream_ids)
        ):
            self._acknowledged_waiters += 1
            try:
                await self._acknowledged.wait()
            finally:
                self._acknowledged_waiters -= 1
        await trio.lowlevel.checkpoint()

    def close_nowait(self, code: int = 0, reason: str = "") -> None:
        """Start closing and hand the CONNECTION_CLOSE to the socket now (never blocks).
        Stream data already written goes out first (as far as congestion control allows),
        unacknowledged: the peer may or may not receive it. ``reason`` is cut to
        200 bytes of UTF-8 (the whole close must fit one datagram)."""
        if self.terminated.is_set() or self._closed_locally:
            return
        self._closed_locally = True
        # Once closing, the engine sends nothing else: what is written goes now, and so do
        # the ACKs it owes (the peer may be waiting to see its last data acknowledged, and
        # a close overtaking them would look like loss).
        self._flush_nowait(unpaced=True)
        try:
            self._quic.close(
                error_code=code, reason_phrase=truncate_utf8(reason, _MAX_REASON_BYTES)
            )
        except _engine.ENGINE_ERRORS as exc:
            self._fail_engine(exc)
            return
        self._flush_nowait()
        self._wake()

    def stats(self) -> ConnectionStats:
        """A snapshot of the counters and engine figures."""
        return ConnectionStats(
            datagrams_sent=self._datagrams_sent,
            bytes_sent=self._bytes_sent,
            datagrams_received=self._datagrams_received,
            bytes_received=self._bytes_received,
            engine=self._quic.read_stats(),
        )

    # -- endpoint side ------------------------------------------------------------------

    def deliver(self, data: bytes, addr: Address) -> bool:
        """Queue a datagram from the endpoint's receive loop; False if dropped."""
        if len(self._inbox) >= _INBOX_LIMIT or self.terminated.is_set():
            return False
        self._inbox.append((data, addr))
        return True

    def _wake(self) -> None:
        self._wake_pending = True
        self._unpark()

    def _unpark(self) -> None:
        task = self._parked
        if task is not None:
            self._parked = None
            trio.lowlevel.reschedule(task)

    def timer_expired(self) -> None:
        """The endpoint's timer queue: the driver's deadline has come."""
        self._unpark()

    async def _park(self, deadline: float) -> None:
        """Sleep until woken or ``deadline`` (no cancel scope: see ``_timers``)."""
        self._endpoint.timers.schedule(self, deadline)
        self._parked = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort_park)

    def _abort_park(self, _: object) -> trio.lowlevel.Abort:
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    def wake(self) -> None:
        """Ask the driver task to run a round (the endpoint calls it after a batch)."""
        self._wake()

    def connect(self) -> None:
        """Client: start the handshake (queues the first Initial)."""
        self._quic.connect(self.remote_address, now=trio.current_time())

    async def run(self) -> None:
        """The driver task. Returns when the connection has terminated; cancelled, it
        closes the connection (code 0) on its way out, so the peer learns at once."""
        try:
            await self._drive()
        finally:
            if not self.terminated.is_set():
                self._tell_peer_nowait(0, "")
                self._terminate(trio.ClosedResourceError("connection driver stopped"))

    # -- the driver loop ----------------------------------------------------------------

    async def _drive(self) -> None:
        quic = self._quic
        timer_at: float | None = None
        while not self.terminated.is_set():
            try:
                if self._inbox:
                    inbox, self._inbox = self._inbox, []
                    for data, addr in inbox:
                        self._datagrams_received += 1
                        self._bytes_received += len(data)
                        quic.receive_datagram(data, addr, now=trio.current_time())
                    if not self.is_client and quic.is_first_flight:
                        self._drop_undecryptable()
                        return
                    self.remote_address = quic.peer_address
                now = trio.current_time()
                fired_at = None
                if timer_at is not None and now >= timer_at:
                    fired_at = timer_at
                    quic.handle_timer(now=max(timer_at, now))
                delivered = self._route_events()
                if self.terminated.is_set():
                    return
                # A peer's close that came in the same round explains the end.
                if self._refused_new_uni and quic.peer_close() is None:
                    self.peer_opened_unidirectional_stream = True
                    if self.on_unidirectional_stream is not None:
                        self.on_unidirectional_stream()
                self._refused_new_uni = False
                if self._stream_credit:  # they check the peer's limit themselves
                    self._stream_credit.unpark_all()
                if delivered:
                    await self._let_writers_write(_ANSWER_PASSES)
                    if self.terminated.is_set():
                        return
                if (peer_close := quic.peer_close()) is not None:
                    self._terminate(self._termination_error(peer_close, by_peer=True))
                    return
                if not self.handshake_complete.is_set() and now >= self._handshake_deadline:
                    self._give_up_handshake()
                    return
                now = trio.current_time()
                if self._written_since_transmit or self._flushed:
                    quic.ack_now(now)
                if not self._inbox:  # what is sent now answers every wake-up so far
                    self._wake_pending = False
                datagrams = quic.datagrams_to_send(now=now)
                timer_at = quic.get_timer()
                engine_close = None if self._closed_locally else quic.own_close()
            except _engine.ENGINE_ERRORS as exc:
                self._fail_engine(exc)
                return
            if engine_close is not None:
                # The engine closed the connection itself: its CONNECTION_CLOSE is among
                # these datagrams. The application learns now, not after the closing
                # period (as when this side gives up: the close is sent once).
                await self._send(datagrams)
                self._terminate(self._termination_error(engine_close, by_peer=False))
                return
            self._written_since_transmit = 0
            self._round_streams.clear()
            self._round_written.clear()
            self._flushed.clear()
            if datagrams:
                await self._send(datagrams)
            self._release_writers()
            if self._acknowledged_waiters:  # they check what they wait for themselves
                self._acknowledged.set()
                self._acknowledged = trio.Event()
            deadline = math.inf if timer_at is None else timer_at
            if timer_at is not None and timer_at == fired_at:
                # aioquic can re-arm its loss timer at exactly the instant it just handled
                # (sent_time + delay rounds so that nothing is lost yet). Real clocks move
                # on; a frozen clock (MockClock) would spin, so step just past it.
                deadline = timer_at + _TIMER_STEP
            if not self.handshake_complete.is_set():
                deadline = min(deadline, self._handshake_deadline)
            if self._wake_pending:
                await trio.lowlevel.checkpoint()
            else:
                await self._park(deadline)
            await self._let_writers_write(
                _COALESCE_IDLE_PASSES if self._written_since_transmit else 0
            )
            self._wake_pending = False

    async def _let_writers_write(self, patience: int) -> None:
        """Yield scheduler passes while application tasks keep writing, so that their
        writes share this round's datagrams (and its ACK) instead of rounds of their own.
        Stops once ``patience`` passes went by without a new write (``_COALESCE_IDLE_PASSES``
        once something was written: a write takes a few passes), after ``_COALESCE_PASSES``
        passes, once ``_COALESCE_BYTES`` wait, or when a datagram arrives. Called with
        ``_ANSWER_PASSES`` after data reached the application (an immediate reply then
        joins the ACK of what it answers), and to finish a burst of writes. Stops at once
        once every stream that received data or was written to since the last transmit
        has had its user say it is done (:meth:`QuicStream.request_flush`)."""
        written = self._written_since_transmit
        idle = 0
        for _ in range(_COALESCE_PASSES):
            if idle >= patience or written >= _COALESCE_BYTES or self._inbox:
                return
            if self._flushed and self._round_streams | self._round_written <= self._flushed:
                return
            await trio.lowlevel.checkpoint()
            if self._written_since_transmit == written:
                idle += 1
            else:
                written, idle, patience = self._written_since_transmit, 0, _COALESCE_IDLE_PASSES

    async def _send(self, datagrams: list[tuple[bytes, Address]]) -> None:
        self._datagrams_sent += len(datagrams)
        self._bytes_sent += sum(len(data) for data, _ in datagrams)
        await self._endpoint.send_datagrams(datagrams)

    def _flush_nowait(self, *, unpaced: bool = False) -> None:
        now = trio.current_time()
        quic = self._quic
        try:
            if self._written_since_transmit or unpaced:
                quic.ack_now(now)
            self._written_since_transmit = 0
            if unpaced:
                datagrams = quic.datagrams_to_send_unpaced(now)
            else:
                datagrams = quic.datagrams_to_send(now=now)
        except _engine.ENGINE_ERRORS:
            return
        self._datagrams_sent += len(datagrams)
        self._bytes_sent += sum(len(data) for data, _ in datagrams)
        self._endpoint.send_datagrams_nowait(datagrams)

    def _release_writers(self) -> None:
        if not self._blocked_writers:
            return
        for stream in list(self._blocked_writers):
            unacked = self._quic.unacked_send_bytes(stream.stream_id)
            if unacked <= self.config.stream_send_high_water // 2 or self.terminated.is_set():
                self._blocked_writers.discard(stream)
                stream._on_writable()

    def _route_events(self) -> bool:
        """Hand every engine event to its stream or handler; True if stream data (or a
        FIN) reached a stream or the handshake completed."""
        quic = self._quic
        delivered = False
        while (event := quic.next_event()) is not None:
            if isinstance(event, _engine.StreamDataReceived):
                stream = self._stream_for_event(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data, event.end_stream)
                    self._round_streams.add(stream)
                    self._flushed.discard(stream)  # an earlier hint does not cover this
                    delivered = True
            elif isinstance(event, _engine.StreamReset):
                stream = self._stream_for_event(event.stream_id)
                if stream is not None:
                    stream._on_reset(event.error_code)
            elif isinstance(event, _engine.StopSendingReceived):
                stream = self._stream_for_event(event.stream_id)
                if stream is not None:
                    stream._on_stop_sending(event.error_code)
            elif isinstance(event, _engine.HandshakeCompleted):
                self._end_handshake()
                if self.on_established is not None:
                    self.on_established(self)
                delivered = True  # the client's first stream data may join its Finished
            elif isinstance(event, _engine.ConnectionIdIssued):
                self._endpoint.add_cid(self, event.connection_id)
            elif isinstance(event, _engine.ConnectionIdRetired):
                self._endpoint.remove_cid(self, event.connection_id)
            elif isinstance(event, _engine.ConnectionTerminated):
                self._terminate(self._termination_error(event, by_peer=False))
                return delivered
        return delivered

    def _stream_for_event(self, stream_id: int) -> QuicStream | None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        peer_initiated = (stream_id & 1) == (1 if self.is_client else 0)
        if not peer_initiated:
            return None  # a local stream this side already closed
        index = stream_id >> 2
        if stream_id & 2:  # unidirectional: refuse each new one once
            while self._next_peer_uni <= index:
                uni_id = (self._next_peer_uni << 2) | (stream_id & 3)
                self._next_peer_uni += 1
                self.unidirectional_streams_refused += 1
                with contextlib.suppress(ValueError):  # already finished in the engine
                    self._quic.stop_stream(uni_id, 0)
                self._refused_new_uni = True
            return None
        # A new peer stream implicitly opens every lower-numbered one (RFC 9000, 3.2).
        while self._next_peer_bidi <= index:
            new_id = (self._next_peer_bidi << 2) | (stream_id & 3)
            self._next_peer_bidi += 1
            new_stream = QuicStream(self, new_id)
            self._streams[new_id] = new_stream
            self._accept_send.send_nowait(new_stream)
        return self._streams.get(stream_id)

    # -- termination --------------------------------------------------------------------

    def _termination_error(
        self, event: _engine.ConnectionTerminated, *, by_peer: bool
    ) -> QuicConnectionError | trio.ClosedResourceError:
        """``by_peer``: the peer's CONNECTION_CLOSE (the engine reports its own closes, and
        the idle timeout, only once their closing period is over)."""
        kind = _engine.termination_kind(event)
        if self._closed_locally:
            return trio.ClosedResourceError("connection closed by this side")
        if kind == "application":
            return ConnectionClosedByPeer(event.error_code, event.reason_phrase)
        if kind == "idle":
            return IdleTimeout(event.error_code, event.reason_phrase)
        return TransportError(
            event.error_code, event.reason_phrase, event.frame_type, by_peer=by_peer
        )

    def peer_unreachable(self) -> None:
        """The peer's address answered ICMP port unreachable. Trusted only while the
        handshake is in progress (afterwards such messages could be forged to kill a live
        connection, and QUIC's own timers decide)."""
        if not self.handshake_complete.is_set():
            self._terminate(ConnectionRefused(QUIC_INTERNAL_ERROR, "connection refused"))

    def _drop_undecryptable(self) -> None:
        """A server connection whose first datagrams held no packet that decrypts: forged
        or corrupted. It would hold a handshake slot until the handshake timeout; drop it
        without a word (the client of a corrupted Initial retransmits it). Initials that
        decrypt can still be built by anyone, from any address, until the server asks for
        address validation (``QuicConfig.address_validation``)."""
        self._endpoint.dropped_datagrams += self._datagrams_received
        self._terminate(
            TransportError(QUIC_INTERNAL_ERROR, "no packet of the first datagram decrypts")
        )
        if self.on_undecryptable is not None:
            self.on_undecryptable()

    def _give_up_handshake(self) -> None:
        self._tell_peer_nowait(0, "handshake timed out")
        answered = self._datagrams_received > 0
        reason = "handshake timed out" if answered else "no answer from the peer"
        self._terminate(HandshakeTimeout(QUIC_INTERNAL_ERROR, reason, peer_answered=answered))

    def _fail_engine(self, exc: BaseException) -> None:
        logger.warning("QUIC engine error, closing connection: %r", exc)
        self._tell_peer_nowait(QUIC_INTERNAL_ERROR, "internal error", transport=True)
        self._terminate(TransportError(QUIC_INTERNAL_ERROR, f"engine error: {exc!r}"))

    def _tell_peer_nowait(self, code: int, reason: str, *, transport: bool = False) -> None:
        """Best effort, before ending the connection without the engine's closing period:
        hand a CONNECTION_CLOSE to the socket (an engine that just failed may not manage
        to build one; the peer then learns by its idle timeout)."""
        if self._closed_locally or self.terminated.is_set():
            return
        self._closed_locally = True
        try:
            if transport:
                self._quic.close_with_transport_error(code, reason)
            else:
                self._quic.close(error_code=code, reason_phrase=reason)
        except _engine.ENGINE_ERRORS:
            return
        self._flush_nowait()

    def _terminate(self, error: QuicConnectionError | trio.ClosedResourceError) -> None:
        if self.terminated.is_set():
            return
        self.error = error
        self.terminated.set()
        self._end_handshake()  # releases handshake waiters; they check error
        for stream in self._streams.values():
            stream._on_connection_error(error)
        self._accept_send.close()
        self._blocked_writers.clear()
        self._stream_credit.unpark_all()
        self._inbox.clear()
        self._acknowledged.set()
        self._endpoint.timers.cancel(self)
        self._wake()  # the driver may be running (in its send): it must not park again
        self._endpoint.remove_connection(self)

    def _end_handshake(self) -> None:
        if not self.handshake_complete.is_set():
            self.handshake_complete.set()
            self._endpoint.handshaking -= 1

    def _raise_if_over(self) -> None:
        if self.error is not None:
            raise self.error
        if self._closed_locally:  # closing: the engine would accept data and never send it
            raise trio.ClosedResourceError("connection closed by this side")

    # -- called by streams --------------------------------------------------------------

    def _unacked(self, stream_id: int) -> int:
        return self._quic.unacked_send_bytes(stream_id)

    def _send_stream_data(self, stream: QuicStream, data: bytes, *, end_stream: bool) -> None:
        self._raise_if_over()
        try:
            self._quic.send_stream_data(stream.stream_id, data, end_stream=end_stream)
        except _engine.ENGINE_ERRORS as exc:
            raise trio.BrokenResourceError(f"stream {stream.stream_id}: {exc!r}") from exc
        self._written_since_transmit += len(data) + 1
        self._round_written.add(stream)
        self._flushed.discard(stream)  # an earlier hint does not cover this write
        self._wake()

    def _request_flush(self, stream: QuicStream) -> None:
        if stream not in self._flushed:
            self._flushed.add(stream)
            self._wake()  # a hint that comes after the round has ended starts one

    def _stream_consumed(self, stream: QuicStream, total: int) -> None:
        if self._quic.stream_consumed(stream.stream_id, total):
            self._wake()

    def _credit_eagerly(self, stream: QuicStream, consumed: int) -> None:
        self._quic.credit_eagerly(stream.stream_id)
        self._stream_consumed(stream, consumed)  # a smaller step may be due already

    def _close_stream(self, stream: QuicStream, *, send_fin: bool, stop_receiving: bool) -> None:
        self._streams.pop(stream.stream_id, None)
        self._blocked_writers.discard(stream)
        self._quic.forget_stream(stream.stream_id)
        if self.terminated.is_set():
            return
        with contextlib.suppress(*_engine.ENGINE_ERRORS):  # direction already finished
            if send_fin:
                self._quic.send_stream_data(stream.stream_id, b"", end_stream=True)
            if stop_receiving:
                self._quic.stop_stream(stream.stream_id, 0)
        self._wake()

    def _reset_stream(self, stream: QuicStream, code: int) -> None:
        self._streams.pop(stream.stream_id, None)
        self._blocked_writers.discard(stream)
        self._quic.forget_stream(stream.stream_id)
        if self.terminated.is_set():
            return
        for call in (self._quic.reset_stream, self._quic.stop_stream):
            with contextlib.suppress(*_engine.ENGINE_ERRORS):  # direction already finished
                call(stream.stream_id, code)
        self._wake()
