"""What the replication and assets channels share: one stream, an inbox, permissions."""

from __future__ import annotations

import abc
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import trio

from theta._errors import SessionClosed
from theta._framed import FramedStream
from theta.core import ErrorCode, Message, PermissionDenied, Role

if TYPE_CHECKING:
    from theta._session import Session

T = TypeVar("T")
U = TypeVar("U")

_GRACEFUL = frozenset({ErrorCode.NO_ERROR, ErrorCode.GOING_AWAY})


class ReceiveIterator(Generic[U]):
    """``async for`` over a channel: ends when the peer finished its direction (every
    message it sent has been delivered) or when this side closed the session gracefully
    (``NO_ERROR``/``GOING_AWAY``). Otherwise the session's :class:`~theta.SessionClosed`
    is raised: the session ended with an error, or the peer's close came before the end
    of its direction reached the application (what it sent may be lost). Safe to leave
    early."""

    def __init__(self, receive: Callable[[], Awaitable[U]], channel: DataChannel[Any]) -> None:
        self._receive = receive
        self._channel = channel

    def __aiter__(self) -> ReceiveIterator[U]:
        return self

    async def __anext__(self) -> U:
        try:
            return await self._receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        except SessionClosed as closed:
            if closed.code in _GRACEFUL and (self._channel._end_received or not closed.by_peer):
                raise StopAsyncIteration from None
            raise


class DataChannel(abc.ABC, Generic[T]):
    """A data channel of a session: frames out through the stream, received items in
    through an inbox bounded in items and in bytes (while it is full the reader stops
    reading and QUIC flow control slows the peer down).

    Subclasses say which role bit permits sending (:attr:`_permission`) and turn each
    received message into an item (:meth:`_accept`).
    """

    _permission: Role
    _action: str
    _name: str

    def __init__(
        self, session: Session, framed: FramedStream, queue_size: int, queue_bytes: int
    ) -> None:
        self._session = session
        self._framed = framed
        self._inbox_send, self._inbox = trio.open_memory_channel[T](queue_size)
        # The count alone would let a peer park queue_size decompressed 1 MiB payloads
        # here for a few KiB of zstd on the wire.
        self._inbox_bytes = 0
        self._inbox_bytes_limit = queue_bytes
        self._inbox_room = trio.lowlevel.ParkingLot()
        self._drained = trio.Event()
        """Set once the peer's direction ended (or the reader stopped)."""
        self._end_received = False  # the peer's FIN, on a frame boundary
        self._carried_data = False  # whether the application sent anything on it
        self._finished = False  # finish() was called: this side's direction is over

    async def _send(self, message: Message) -> None:
        self._check_not_finished()
        self._carried_data = True
        await self._session._guard(functools.partial(self._framed.send, message))

    async def _send_many(self, messages: list[Message]) -> None:
        self._check_not_finished()
        self._carried_data = True
        await self._session._guard(functools.partial(self._framed.send_many, messages))

    def _check_may_send(self) -> None:
        self._session._check_open()
        if self._session.is_client and not self._session.role & self._permission:
            raise PermissionError(f"role {self._session.role!r} may not {self._action}")
        self._check_not_finished()

    def _check_not_finished(self) -> None:
        if self._finished:
            # The application's own mistake: the session (and the peer) carry on.
            raise trio.ClosedResourceError(f"this side finished the channel: cannot {self._action}")

    async def _next(self) -> T:
        try:
            item = await self._inbox.receive()
            self._inbox_bytes -= self._size(item)
            self._inbox_room.unpark_all()
        except trio.EndOfChannel:
            closed = self._session.closed
            if closed is None:
                raise
            if self._end_received:
                raise closed from None
            error = SessionClosed(closed.code, closed.reason, by_peer=closed.by_peer)
            error.add_note(f"the session ended before the peer finished its {self._name}")
            raise error from None
        if self._session.closed is not None:
            self._session._application_progress()
        return item

    async def finish(self) -> None:
        """End this side's direction (FIN); the peer's direction stays open. Sending
        afterwards raises ``trio.ClosedResourceError`` (the session carries on);
        calling it again does nothing while the session is open. Raises
        :class:`SessionClosed` once the session is over."""
        self._session._check_open()
        self._finished = True  # no new sends from now on, even if this wait is cancelled
        await self._session._guard(self._framed.send_eof)  # idempotent: a retry sends it

    async def _finish_quietly(self) -> None:
        """FIN our direction if it is still open (closing the session)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._framed.send_eof()

    def _session_closed(self) -> None:
        self._inbox_send.close()

    @abc.abstractmethod
    def _size(self, item: T) -> int:
        """Bytes of ``item`` counted against ``receive_queue_bytes``."""

    @abc.abstractmethod
    def _accept(self, message: Message) -> T:
        """Turn a received message into the item handed to the application (may raise
        :class:`~theta.core.ProtocolError`)."""

    def _end_of_stream(self) -> None:
        """The peer finished its direction (FIN on a frame boundary)."""

    async def _reader(self) -> None:
        try:
            await self._read_until_end()
        finally:
            self._drained.set()
            self._session._application_progress()

    async def _read_until_end(self) -> None:
        while True:
            message = await self._framed.receive()
            if message is None:
                self._end_of_stream()
                self._end_received = True
                self._inbox_send.close()
                return
            if not self._session.is_client and not self._session.role & self._permission:
                raise PermissionDenied(f"this client's role does not allow it to {self._action}")
            item = self._accept(message)
            size = self._size(item)
            while self._inbox_bytes and self._inbox_bytes + size > self._inbox_bytes_limit:
                await self._inbox_room.park()
            self._inbox_bytes += size
            await self._inbox_send.send(item)
            if self._session.closed is not None:
                self._session._application_progress()

    def _settled(self, *, emptied: bool) -> bool:
        """Whether the reader has stopped (and, if ``emptied``, the inbox is empty)."""
        if not self._drained.is_set():
            return False
        return not emptied or self._inbox.statistics().current_buffer_used == 0
