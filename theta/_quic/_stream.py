"""Bidirectional QUIC streams as ``trio.abc.HalfCloseableStream``.

Backpressure, both ways:

* send: ``send_all`` writes to the engine only while the stream's unacknowledged bytes
  (written but not yet acknowledged by the peer, including bytes queued behind flow
  control) are below ``QuicConfig.stream_send_high_water``, never past it, and blocks
  until they drop to half of it. Memory per stream is bounded however much is sent.
  ``send_whole`` (whole frames) waits the same way, then writes all its data at once.
* receive: arriving data goes to a per-stream buffer; the peer's credit is "bytes read by
  the application + ``stream_receive_window``" (see ``_engine.EngineConnection``), so a
  slow reader stalls the peer through QUIC flow control and the buffer never holds more
  than one window. The connection keeps receiving (ACKs, other streams) meanwhile.

Errors: a peer's RESET_STREAM raises :class:`StreamResetError` from ``receive_some``, a
STOP_SENDING raises :class:`StreamStoppedError` from ``send_all``; a connection that ends
raises its :class:`QuicConnectionError` from every operation; using a stream after
``aclose`` raises ``trio.ClosedResourceError``. A ``send_all`` cancelled (or failed) with
part of its data written breaks the sending side: later sends raise
``trio.BrokenResourceError`` and ``aclose`` resets the stream instead of sending a FIN.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import trio

from ._errors import StreamResetError, StreamStoppedError

if TYPE_CHECKING:
    from ._connection import QuicConnection

_DEFAULT_READ = 256 * 1024
_INTERRUPTED = "an earlier send_all was interrupted part-way"


class QuicStream(trio.abc.HalfCloseableStream):
    """One bidirectional QUIC stream of a :class:`QuicConnection`."""

    def __init__(self, connection: QuicConnection, stream_id: int) -> None:
        self._connection = connection
        self.stream_id = stream_id
        """The QUIC stream id."""
        self._closed = False
        # receive side
        self._buffer = bytearray()
        self._consumed = 0
        self._eof = False
        self._receive_error: BaseException | None = None
        self._receiving = False
        self.bytes_received = 0
        """Stream bytes received from the peer so far (read or not)."""
        # Waiters re-check the stream's state before parking: lots are reusable, where
        # an Event per wait would be one more object per frame for the collector.
        self._readable = trio.lowlevel.ParkingLot()
        # send side
        self._eof_sent = False
        self._send_error: BaseException | None = None
        self._send_interrupted = False  # a send_all stopped with part of its data written
        self._send_partial = False  # a send_all is running with part of its data written
        self._sending = False
        self._writes_refused: str | None = None  # see refuse_writes
        self._writable = trio.lowlevel.ParkingLot()
        self._high_water = connection.config.stream_send_high_water
        self.max_unacked_bytes = 0
        """Largest unacknowledged-bytes figure seen right after a write (for tests/stats)."""

    @property
    def connection(self) -> QuicConnection:
        """The connection this stream belongs to."""
        return self._connection

    @property
    def send_high_water(self) -> int:
        """Unacknowledged bytes at which sends block (``QuicConfig.stream_send_high_water``)."""
        return self._high_water

    def unacked_bytes(self) -> int:
        """Bytes written to this stream and not yet acknowledged by the peer."""
        return self._connection._unacked(self.stream_id)

    # -- sending ----------------------------------------------------------------------

    def _check_send(self) -> None:
        if self._closed or self._eof_sent:
            raise trio.ClosedResourceError("stream closed for sending")
        if self._send_error is not None:
            raise self._send_error

    async def _wait_writable(self) -> None:
        while True:
            self._check_send()
            if self._writes_refused is not None:
                raise trio.ClosedResourceError(self._writes_refused)
            if self.unacked_bytes() < self._high_water:
                return
            self._connection._blocked_writers.add(self)
            await self._writable.park()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``; blocks while the unacknowledged bytes are at the high-water mark."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_send()
            await trio.lowlevel.checkpoint()
            view = memoryview(data).cast("B")
            written = False
            try:
                while view:
                    await self._wait_writable()
                    room = self._high_water - self.unacked_bytes()
                    self._connection._send_stream_data(self, bytes(view[:room]), end_stream=False)
                    view, written = view[room:], True  # only once that chunk is written
                    self._send_partial = bool(view)
                    self.max_unacked_bytes = max(self.max_unacked_bytes, self.unacked_bytes())
            except BaseException:
                if written and view and self._send_error is None:
                    # Part of ``data`` is on its way: the peer must not take the stream's
                    # end for a complete message. Later sends fail; aclose() resets.
                    self._send_interrupted = True
                    self._send_error = trio.BrokenResourceError(_INTERRUPTED)
                raise
        finally:
            self._sending = self._send_partial = False

    async def send_whole(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one unit: wait until the unacknowledged bytes are below the
        high-water mark, then hand all of ``data`` to QUIC at once (which may take them
        past the mark by up to ``len(data)``). Cancelled while waiting, it has sent
        nothing; it never leaves part of ``data`` sent, so a framing layer stays intact."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_send()
            await trio.lowlevel.checkpoint()
            await self._wait_writable()  # no checkpoint between its last check and the write
            self._connection._send_stream_data(self, bytes(data), end_stream=False)
            self.max_unacked_bytes = max(self.max_unacked_bytes, self.unacked_bytes())
        finally:
            self._sending = False

    def refuse_writes(self, reason: str) -> None:
        """From now on ``send_all`` and ``send_whole`` raise ``trio.ClosedResourceError``
        (``reason``) before their next write, those waiting for the high-water mark
        included; what was written stays, and :meth:`send_eof` still ends the stream (unless
        a ``send_all`` was stopped part-way, see :meth:`aclose`)."""
        self._writes_refused = reason
        self._writable.unpark_all()

    def request_flush(self) -> None:
        """Say that this stream's user has written all it will write in answer to what
        it has read, or that no answer is coming: the transport sends what is pending,
        with the ACK it owes, without waiting for more writes, once every stream that
        received data or was written to since its last transmit has had such a hint (a
        write after the hint needs a new one); a hint after that transmit starts another.
        Only a hint: without it the transport waits a few scheduler passes for writers (a
        reply then shares the datagram of the ACK); with it, later writes go in a
        datagram of their own."""
        if not self._closed:
            self._connection._request_flush(self)

    async def wait_send_all_might_not_block(self) -> None:
        """Return when ``send_all`` would not block (below the high-water mark)."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            await self._wait_writable()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Send FIN: the peer reads end-of-stream after the data already sent. Idempotent;
        raises ``BrokenResourceError`` (the stream's error) if the FIN can no longer be
        sent: the peer sent STOP_SENDING, the connection is gone, or a ``send_all`` was
        interrupted part-way."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        self._sending = True  # no send_all may start during the checkpoint
        try:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("stream closed")
            if self._eof_sent:
                return
            if self._send_error is not None:
                raise self._send_error
            self._eof_sent = True
            self._connection._send_stream_data(self, b"", end_stream=True)
        finally:
            self._sending = False

    # -- receiving --------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return up to ``max_bytes`` received bytes, or ``b""`` at end of stream."""
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                if self._buffer and not isinstance(self._receive_error, StreamResetError):
                    break  # data received before a connection error is still readable
                if self._receive_error is not None:
                    raise self._receive_error
                if self._eof:
                    return b""
                await self._readable.park()
            count = min(len(self._buffer), max_bytes or _DEFAULT_READ)
            data = bytes(self._buffer[:count])
            del self._buffer[:count]
            self._consumed += count
            self._connection._stream_consumed(self, self._consumed)
            return data
        finally:
            self._receiving = False

    def credit_eagerly(self) -> None:
        """From now on let the peer send more each time the application has read a
        sixteenth of ``stream_receive_window`` (by default: half of it). For a slow reader
        whose progress the peer watches, e.g. while it drains what a closing peer sent."""
        if not self._closed:  # a closed stream's bookkeeping is gone for good
            self._connection._credit_eagerly(self, self._consumed)

    # -- closing ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close both directions: FIN if still sending, STOP_SENDING if still receiving;
        RESET_STREAM (code 0) instead of the FIN after a ``send_all`` that was interrupted
        part-way (the peer must not read a truncated message as a complete one)."""
        if not self._closed:
            self._closed = True
            if self._send_interrupted or self._send_partial:
                # RESET_STREAM, not a FIN after part of a message (a send_all blocked in
                # another task fails once woken)
                self._connection._reset_stream(self, 0)
            else:
                self._connection._close_stream(
                    self,
                    send_fin=not self._eof_sent and self._send_error is None,
                    stop_receiving=not self._eof and self._receive_error is None,
                )
            self._wake_all()
        await trio.lowlevel.checkpoint()

    async def reset(self, code: int = 0) -> None:
        """Abort both directions with application error ``code`` (RESET_STREAM + STOP)."""
        if not self._closed:
            self._closed = True
            self._connection._reset_stream(self, code)
            self._wake_all()
        await trio.lowlevel.checkpoint()

    # -- called by the connection driver ------------------------------------------------

    def _wake_all(self) -> None:
        self._readable.unpark_all()
        self._writable.unpark_all()

    def _on_data(self, data: bytes, end_stream: bool) -> None:
        if data and not self._closed:
            self._buffer += data
            self.bytes_received += len(data)
        if end_stream:
            self._eof = True
        self._readable.unpark_all()

    def _on_reset(self, code: int) -> None:
        if self._receive_error is None and not self._eof:
            self._receive_error = StreamResetError(code)
            self._buffer.clear()
        self._readable.unpark_all()

    def _on_stop_sending(self, code: int) -> None:
        if self._send_error is None:
            self._send_error = StreamStoppedError(code)
        self._writable.unpark_all()

    def _on_writable(self) -> None:
        self._writable.unpark_all()

    def _on_connection_error(self, error: BaseException) -> None:
        if self._receive_error is None and not self._eof:
            self._receive_error = error
        if self._send_error is None:
            self._send_error = error
        self._wake_all()
