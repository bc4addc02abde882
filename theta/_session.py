"""An established Theta session: one nursery owning every task of the session.

Theory of operation: :meth:`Session.run` opens the session's nursery and starts the
control reader (heartbeats and ``SessionClose`` in; a server's reader also answers the
client's heartbeats), the heartbeat sender (heartbeats out when its timer says so, and the
heartbeat-timeout deadline), the replication and asset readers, and a watcher that
treats any further stream as a protocol violation. Background tasks never raise: a
protocol error, a heartbeat timeout or the peer's close is recorded once as the session's
:class:`SessionClosed`, the QUIC connection is closed with the matching code, and the
session's cancel scope is cancelled — so every task of the session is gone when ``run``
returns. Every later operation on the session raises that :class:`SessionClosed`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn, TypeVar

import trio

from theta._asset_channel import AssetChannel
from theta._config import MAX_CLOSE_REASON
from theta._diagnostics import DiagnosticsWatch, TransportDiagnostics
from theta._errors import SessionClosed
from theta._framed import FramedStream
from theta._groups import only_session_closed, split_cancelled
from theta._quic import (
    QUIC_INTERNAL_ERROR,
    ConnectionClosedByPeer,
    IdleTimeout,
    QuicConnection,
    QuicConnectionError,
    QuicStream,
    StreamResetError,
    StreamStoppedError,
    TransportError,
    truncate_utf8,
)
from theta._replication_channel import ReplicationChannel
from theta.core import (
    PROTOCOL_VERSION,
    ClientHandshake,
    ErrorCode,
    Heartbeat,
    HeartbeatTracker,
    ProtocolError,
    ProtocolViolation,
    Role,
    ServerHandshake,
    SessionClose,
)

if TYPE_CHECKING:
    from theta._config import ClientConfig, ServerConfig

__all__ = ["Session"]

logger = logging.getLogger("theta")
T = TypeVar("T")

# Closing waits for data still on its way as long as it keeps moving, within the QUIC
# idle timeout in all. What the peer sent: each _CLOSE_GRACE seconds must see bytes arrive
# or the application take some. What this side sent: the peer's acknowledgements must
# advance within a heartbeat timeout (a receiver whose peer has closed grants credit in
# steps of a sixteenth of its window, not half, so that a slow reader's progress shows).
# A SessionClose alone, and any close with an error code, is waited for at most
# _CLOSE_GRACE.
_CLOSE_GRACE = 1.0


class Session:
    """An established Theta session (what :func:`theta.connect` yields and
    :func:`theta.serve` hands to its handler).

    Channels: :attr:`replication` and :attr:`assets`. Leaving ``connect``'s block, the
    handler returning, or :meth:`close` ends the session gracefully.
    """

    def __init__(
        self,
        *,
        connection: QuicConnection,
        control: FramedStream,
        replication: FramedStream,
        assets: FramedStream,
        handshake: ClientHandshake | ServerHandshake,
        config: ClientConfig | ServerConfig,
        established_at: float,
    ) -> None:
        self._connection = connection
        self._control = control
        self._handshake = handshake
        self._config = config
        self._established_at = established_at
        self._heartbeats = HeartbeatTracker(
            now=established_at,
            interval=config.heartbeat_interval,
            timeout=config.heartbeat_timeout,
            # The server answers the client's heartbeats, so that one datagram carries its
            # heartbeat and the acknowledgement of the client's.
            follow_peer=isinstance(handshake, ServerHandshake),
        )
        self._closed: SessionClosed | None = None
        self._ended_at: float | None = None  # when the end was decided (uptime stops)
        self._closed_event = trio.Event()
        self._closing: trio.Event | None = None  # set once this side's close() is done
        self._progress = trio.Event()  # set when received data moves after the close
        self._has_handler = False  # a server's handler runs in run(): see _peer_closed
        # The heartbeat sender sleeps in this scope until its timer; the reader moves the
        # deadline when it has sent a heartbeat itself.
        self._sender_wait = trio.CancelScope()
        self._cancel_scope = trio.CancelScope()  # everything, the handler included
        self._tasks_scope = trio.CancelScope()  # the protocol tasks only
        self.replication = ReplicationChannel(self, replication, config)
        """The replication channel: state deltas, both ways."""
        self.assets = AssetChannel(self, assets, config)
        """The assets channel: large binary transfers, both ways."""

    # -- identity ----------------------------------------------------------------------

    @property
    def is_client(self) -> bool:
        """Whether this side opened the session."""
        return isinstance(self._handshake, ClientHandshake)

    @property
    def session_id(self) -> int:
        """The non-zero session id the server chose."""
        return self._handshake.session_id

    @property
    def role(self) -> Role:
        """The client's role (permissions mask; may hold application bits 16..31)."""
        return self._handshake.role

    @property
    def negotiated_capabilities(self) -> tuple[int, ...]:
        """Capabilities both sides support, sorted ascending."""
        return self._handshake.negotiated_capabilities

    @property
    def public_key(self) -> bytes:
        """This side's raw Ed25519 public key."""
        return self._handshake.public_key

    @property
    def peer_public_key(self) -> bytes:
        """The peer's raw Ed25519 public key, proven by its handshake signature."""
        return self._handshake.peer_public_key

    @property
    def peer_address(self) -> tuple[str, int]:
        """The peer's UDP address (host, port); it follows a peer whose address changed
        (e.g. a NAT rebinding between a client and the server)."""
        address = self._connection.remote_address
        return str(address[0]), int(address[1])

    @property
    def protocol_version(self) -> int:
        """The wire protocol version in use."""
        return PROTOCOL_VERSION

    @property
    def schema_hash(self) -> int:
        """The schema hash both sides agreed on."""
        return self._config.schema_hash

    @property
    def closed(self) -> SessionClosed | None:
        """Why the session ended, or ``None`` while it is open."""
        return self._closed

    # -- diagnostics -------------------------------------------------------------------

    def diagnostics(self) -> TransportDiagnostics:
        """A snapshot of RTT, jitter, heartbeat, traffic and QUIC figures."""
        metrics = self._heartbeats.metrics()
        stats = self._connection.stats()
        return TransportDiagnostics(
            uptime=(trio.current_time() if self._ended_at is None else self._ended_at)
            - self._established_at,
            rtt_latest=metrics.latest_rtt,
            rtt_smoothed=metrics.smoothed_rtt,
            rtt_min=metrics.min_rtt,
            rtt_p50=metrics.rtt_p50,
            rtt_p90=metrics.rtt_p90,
            rtt_p99=metrics.rtt_p99,
            jitter=metrics.jitter,
            peer_rtt=metrics.peer_rtt,
            peer_jitter=metrics.peer_jitter,
            heartbeats_sent=metrics.heartbeats_sent,
            heartbeats_received=metrics.heartbeats_received,
            datagrams_sent=stats.datagrams_sent,
            datagrams_received=stats.datagrams_received,
            bytes_sent=stats.bytes_sent,
            bytes_received=stats.bytes_received,
            quic_smoothed_rtt=stats.engine.smoothed_rtt,
            quic_lost_packets=stats.engine.lost_packets,
            quic_congestion_window=stats.engine.congestion_window,
            compression_ratio=self.replication.compression_ratio,
        )

    def watch_diagnostics(self, interval: float = 1.0) -> DiagnosticsWatch:
        """``async for snapshot in session.watch_diagnostics(interval)``: a
        :meth:`diagnostics` snapshot at once, then every ``interval`` seconds, until the
        session ends. Safe to leave early (nothing to clean up)."""
        return DiagnosticsWatch(self, interval)

    # -- closing -----------------------------------------------------------------------

    async def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """End the session: ``SessionClose{code, reason}`` to the peer, FIN on every
        stream (on the assets stream only if no asset is left half sent), then the QUIC
        close with the same code. Sends under way in other tasks
        stop between frames and raise :class:`SessionClosed`. With ``NO_ERROR``, what the
        application sent on the replication and assets channels is acknowledged by the
        peer before the QUIC close, however long that takes while acknowledgements keep
        coming (a slow reader on the other side gets everything), within the idle timeout;
        the wait ends when a heartbeat timeout passes without any, and what is left
        unacknowledged then is logged as abandoned (``WARNING``). Other codes wait at most
        a second. The ``SessionClose`` too is waited for once the connection has had to
        retransmit; with nothing to wait for, the close is immediate. Idempotent: a
        ``close`` while another is under way waits for it; a close after the connection has
        ended (before the session's tasks saw it) records that end, not its own code.
        Returns once the session's tasks are stopping.

        ``code`` is a wire error code, an ``int`` in 0..65535; ``reason`` is a ``str``, cut to
        1 KiB of UTF-8. Anything else raises ``TypeError``/``ValueError`` and closes nothing.
        """
        if isinstance(code, bool) or not isinstance(code, int):
            raise TypeError(f"close code must be an int, not {code!r}")
        if not isinstance(reason, str):
            raise TypeError(f"close reason must be a str, not {type(reason).__name__}")
        code = int(code)
        if not 0 <= code <= 0xFFFF:
            raise ValueError(f"close code {code} is not an unsigned 16-bit value")
        reason = truncate_utf8(reason, MAX_CLOSE_REASON)
        if self._closed is None and self._connection.error is not None:
            # The connection ended before the session's tasks saw it (a send may already
            # have reported the peer's close): that, not this close, is how it ended.
            self._connection_lost(self._connection.error)
        if self._closed is None:
            self._closing = closing = trio.Event()
            self._record_close(code, reason, by_peer=False)
            self._stop_sends()
            try:
                with trio.CancelScope(shield=True):
                    try:
                        with trio.move_on_after(_CLOSE_GRACE):
                            await self._control.send(SessionClose(code, reason))
                            await self._control.send_eof()
                            await self.replication._finish_quietly()
                            await self.assets._finish_quietly()
                        # The peer's QUIC stack has what was sent once it acknowledged it.
                        # Channels that carried no application data need no wait, nor does
                        # the SessionClose on a clean path (the QUIC close repeats its code);
                        # on a path that has needed retransmissions it is waited for too,
                        # lest the whole closing flight be lost and the peer only time out.
                        awaited = [
                            channel._framed.stream
                            for channel in (self.replication, self.assets)
                            if channel._carried_data
                        ]
                        engine = self._connection.stats().engine
                        if engine.lost_packets or engine.probe_timeouts:
                            awaited.append(self._control.stream)
                        if awaited:
                            await self._wait_acknowledged(awaited, patient=code == 0)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            finally:
                self._close_connection()
                closing.set()
        elif self._closing is not None:
            await self._closing.wait()  # the first close() is still delivering what was sent
        self._cancel_scope.cancel()

    def _stop_sends(self) -> None:
        """The session's end is decided: the application's sends under way stop before
        their next frame and raise SessionClosed (none waits on for flow control)."""
        for channel in (self.replication, self.assets):
            channel._framed.stream.refuse_writes("the session is closing")

    async def _wait_acknowledged(self, streams: list[QuicStream], *, patient: bool) -> None:
        """Wait until the peer acknowledged everything sent on ``streams``: if ``patient``,
        for as long as acknowledgements advance within a heartbeat timeout (the idle
        timeout in all), else for :data:`_CLOSE_GRACE`. Logs what is left behind."""
        stall = max(_CLOSE_GRACE, self._config.heartbeat_timeout) if patient else _CLOSE_GRACE
        unacknowledged = sum(stream.unacked_bytes() for stream in streams)
        with trio.move_on_after(self._config.idle_timeout if patient else _CLOSE_GRACE):
            while True:
                with trio.move_on_after(stall) as waited:
                    await self._connection.wait_acknowledged(streams)
                if not waited.cancelled_caught:
                    break  # all acknowledged, or the connection is closing or over
                left = sum(stream.unacked_bytes() for stream in streams)
                if not patient or left >= unacknowledged:
                    break
                unacknowledged = left
        error = self._connection.error
        if (
            isinstance(error, ConnectionClosedByPeer)
            and self._closed is not None
            and error.code == self._closed.code
        ):
            # The peer closed the connection with our code: it answered our SessionClose,
            # so what is left unacknowledged on the control stream was received. (Under
            # load the SessionClose's packet can be declared lost before its ACK comes;
            # aioquic then ignores that ACK and waits for the retransmission's, which the
            # peer, closing, may never send.)
            streams = [stream for stream in streams if stream is not self._control.stream]
        left = sum(stream.unacked_bytes() for stream in streams)
        if left:
            logger.warning(
                "session %#x: closing with %d bytes sent but not acknowledged by the peer",
                self.session_id,
                left,
            )

    def _close_connection(self) -> None:
        """Close QUIC with the session's code (idempotent: the first close counts)."""
        assert self._closed is not None
        self._connection.close_nowait(
            self._closed.code,
            self._closed.reason,  # the QUIC layer cuts it to size
        )

    async def wait_closed(self) -> SessionClosed:
        """Wait until the session's end is decided (this side's :meth:`close` began, the
        peer's close arrived, or an error was found); return why. Data on its way may
        still be delivered after that, and the session's tasks may still be stopping."""
        await self._closed_event.wait()
        assert self._closed is not None
        return self._closed

    def _record_close(self, code: int, reason: str, *, by_peer: bool) -> None:
        if self._closed is None:
            self._closed = SessionClosed(code, reason, by_peer=by_peer)
            self._ended_at = trio.current_time()
            self._closed_event.set()
        self.replication._session_closed()
        self.assets._session_closed()

    def _application_progress(self) -> None:
        """Received data moved (into an inbox, or to the application) after the close."""
        self._progress.set()
        self._progress = trio.Event()

    async def _peer_closed(self, code: int, reason: str) -> None:
        """The peer ended the session: stop sending, but deliver the data already on its
        way, up to the peer's FIN on each data stream, for as long as it keeps moving
        (:data:`_CLOSE_GRACE`) and within the idle timeout; a handler must also have
        taken it all from the inboxes (a client reads what is left after the session's
        end). The handler then gets :data:`_CLOSE_GRACE` more before it is cancelled."""
        if self._closed is not None:
            return
        self._closed = SessionClosed(code, reason, by_peer=True)
        self._ended_at = trio.current_time()
        self._closed_event.set()
        self._stop_sends()  # a handler blocked in a send can then take what is arriving
        emptied = self._has_handler
        channels = (self.replication, self.assets)
        for channel in channels:
            # The closing peer gives up a heartbeat timeout after its last acknowledgement:
            # let a slow reader's progress show sooner than every half window.
            channel._framed.stream.credit_eagerly()
        try:
            with trio.move_on_after(self._config.idle_timeout):  # a trickle ends too
                await self._wait_peer_data(channels, emptied=emptied)
        finally:
            self._record_close(code, reason, by_peer=True)
            self._close_connection()
            self._tasks_scope.cancel()
            self._cancel_scope.deadline = min(
                self._cancel_scope.deadline, trio.current_time() + _CLOSE_GRACE
            )

    async def _wait_peer_data(
        self, channels: tuple[ReplicationChannel, AssetChannel], *, emptied: bool
    ) -> None:
        """Until every channel is settled, as long as something moves each grace."""
        streams = [channel._framed.stream for channel in channels]
        arrived = sum(stream.bytes_received for stream in streams)
        while not all(channel._settled(emptied=emptied) for channel in channels):
            with trio.move_on_after(_CLOSE_GRACE) as waited:
                await self._progress.wait()
            if waited.cancelled_caught:
                # Nothing taken: still moving if bytes arrive (a large asset chunk on a
                # slow path); otherwise the application has stopped taking.
                before, arrived = arrived, sum(stream.bytes_received for stream in streams)
                if arrived == before:
                    return

    def _fail(self, error: ProtocolError) -> None:
        """A protocol error detected here: close the connection at once with its code.
        (Once the session is closing, that path ends it: errors after are expected.)"""
        if self._closed is None:
            logger.info("closing session %#x: %s: %s", self.session_id, error.code.name, error)
            self._record_close(error.code, error.reason, by_peer=False)
            self._close_connection()
            self._cancel_scope.cancel()

    def _connection_lost(self, error: BaseException) -> None:
        if self._closed is None:
            if isinstance(error, ConnectionClosedByPeer):
                self._record_close(error.code, error.reason, by_peer=True)
            elif isinstance(error, IdleTimeout):  # the peer went silent
                self._record_close(
                    ErrorCode.HEARTBEAT_TIMEOUT,
                    "nothing received within the QUIC idle timeout",
                    by_peer=False,
                )
            elif isinstance(error, QuicConnectionError):
                # A QUIC transport code is not a Theta code: report the failure as the
                # Theta code nearest to it, and the QUIC code in the reason.
                code = (
                    ErrorCode.INTERNAL_ERROR
                    if error.code == QUIC_INTERNAL_ERROR
                    else ErrorCode.PROTOCOL_VIOLATION
                )
                by_peer = isinstance(error, TransportError) and error.by_peer
                reason = f"QUIC transport error {error.code:#x}: {error.reason}"
                self._record_close(code, reason, by_peer=by_peer)
            else:
                self._record_close(
                    ErrorCode.INTERNAL_ERROR, f"connection lost: {error!r}", by_peer=False
                )
                self._close_connection()
            self._cancel_scope.cancel()

    def _raise_closed(self) -> NoReturn:
        assert self._closed is not None
        raise self._closed

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed

    async def _guard(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run a user-facing send: connection errors become the session's SessionClosed,
        and so does this side's close(), which stops the send (before its next frame: what
        was sent is delivered) rather than wait for it."""
        self._check_open()
        try:
            return await operation()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            if isinstance(error, ConnectionClosedByPeer) and self._closed is None:
                # The session's tasks see the peer's close too and end the session as
                # after a SessionClose (received data drained, handler grace): this send
                # only reports it.
                raise SessionClosed(error.code, error.reason, by_peer=True) from None
            if isinstance(error, StreamResetError | StreamStoppedError):
                self._fail(ProtocolViolation(f"the peer aborted a channel ({error!r})"))
            elif not isinstance(error, SessionClosed):
                self._connection_lost(error)
            self._raise_closed()

    # -- tasks -------------------------------------------------------------------------

    async def run(
        self,
        handler: Callable[[Session], Awaitable[object]] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the session's tasks (and ``handler(self)``, if given) until the session ends.

        A handler returning closes the session with ``NO_ERROR``; a handler raising closes it
        with ``INTERNAL_ERROR`` and the exception is logged, not propagated. Cancellation
        from outside closes the session with ``GOING_AWAY``.
        """
        self._has_handler = handler is not None
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._run_tasks)
                    if handler is not None:
                        nursery.start_soon(self._run_handler, handler)
                    task_status.started()
        finally:
            if self._closed is None:  # cancelled from outside
                await self.close(ErrorCode.GOING_AWAY, "shutting down")
            self._close_connection()
            self.replication._session_closed()
            self.assets._session_closed()

    async def _run_tasks(self) -> None:
        with self._tasks_scope:
            async with trio.open_nursery() as nursery:
                for task in (
                    self._control_reader,
                    self._heartbeat_sender,
                    self.replication._reader,
                    self.assets._reader,
                    self._stray_streams,
                ):
                    nursery.start_soon(self._supervise, task)

    async def _run_handler(self, handler: Callable[[Session], Awaitable[object]]) -> None:
        try:
            await handler(self)
        except BaseException as error:
            # Cancellation goes on; what came with it (e.g. the SessionClosed of a task the
            # handler ran, or its failure) is dealt with here, never passed up to serve().
            cancelled, failure = split_cancelled(error)
            if failure is None:
                raise  # cancelled, nothing else: run() closes the session if need be
            if not only_session_closed(failure):
                if not isinstance(failure, Exception):
                    raise  # KeyboardInterrupt, SystemExit
                logger.error(
                    "session handler failed (session %#x)", self.session_id, exc_info=failure
                )
                await self.close(ErrorCode.INTERNAL_ERROR, "handler failed")
            else:
                await self.close()
            if cancelled is not None:
                raise cancelled from None
            return
        await self.close()

    async def _supervise(self, task: Callable[[], Awaitable[None]]) -> None:
        try:
            await task()
        except ProtocolError as error:
            self._fail(error)
        except (StreamResetError, StreamStoppedError) as error:
            # The spec has no code for a peer aborting a channel: it breaks the protocol.
            self._fail(ProtocolViolation(f"the peer aborted a channel ({error!r})"))
        except ConnectionClosedByPeer as error:
            # The peer's QUIC close often arrives with its SessionClose and last data in
            # one flight: what was received before it is still delivered, as after a
            # SessionClose.
            await self._peer_closed(error.code, error.reason)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            self._connection_lost(error)

    async def _control_reader(self) -> None:
        heartbeats = self._heartbeats
        while True:
            message = await self._control.receive()  # the sender watches the deadline
            now = trio.current_time()
            if isinstance(message, Heartbeat):
                heartbeats.check_timeout(now)
                heartbeats.receive(message, now)
                if heartbeats.next_send_at <= now and self._closed is None:
                    # A server answers the client's heartbeat at once, from this task (it
                    # then joins the ACK of the client's); the sender sleeps on.
                    await self._control.send(heartbeats.build(now))
                    self._sender_wait.deadline = heartbeats.get_timer()
                self._control.stream.request_flush()  # a heartbeat has no other answer
            elif isinstance(message, SessionClose):
                await self._peer_closed(message.code, message.reason)
                return
            elif message is None:
                await self._peer_closed(ErrorCode.NO_ERROR, "control stream ended")
                return
            else:
                raise ProtocolViolation(f"{type(message).__name__} after the handshake")

    async def _heartbeat_sender(self) -> None:
        """Send heartbeats when due and enforce the heartbeat timeout: this task's single
        timer is the earlier of the two (the reader then needs none)."""
        heartbeats = self._heartbeats
        while True:
            now = trio.current_time()
            heartbeats.check_timeout(now)
            if now < heartbeats.next_send_at:
                with self._sender_wait:
                    self._sender_wait.deadline = heartbeats.get_timer()
                    await trio.sleep_forever()
                self._sender_wait = trio.CancelScope()
                continue
            if self._closed is not None:
                return  # closing: "stops sending" (spec 4.6)
            await self._control.send(heartbeats.build(trio.current_time()))
            self._control.stream.request_flush()

    async def _stray_streams(self) -> None:
        """Close at once when the peer opens a stream beyond the three channels (spec 2)."""
        connection = self._connection
        connection.on_unidirectional_stream = self._unidirectional_stream
        if connection.peer_opened_unidirectional_stream:  # during the handshake
            self._unidirectional_stream()
        await connection.accept_stream()
        raise ProtocolViolation("a stream beyond the three channels was opened")

    def _unidirectional_stream(self) -> None:
        self._fail(ProtocolViolation("the peer opened a unidirectional stream"))
