"""The assets channel of a session: large binary transfers, chunked per spec 4.5."""

from __future__ import annotations

import collections
import contextlib
import inspect
from collections.abc import AsyncIterable, Callable, Iterable
from typing import TYPE_CHECKING

import trio

from theta._channel import DataChannel, ReceiveIterator
from theta._framed import FramedStream
from theta.core import (
    DEFAULT_MAX_UNFINISHED_ASSETS,
    Asset,
    AssetAssembler,
    AssetChunk,
    AssetProgress,
    AssetSender,
    FrameLimits,
    Message,
    Role,
    chunk_asset,
    max_chunk_data_for,
)

if TYPE_CHECKING:
    from theta._config import ClientConfig, ServerConfig
    from theta._session import Session

__all__ = ["AssetChannel"]

_PEER_FRAME_LIMIT = FrameLimits().assets  # chunks sent fit the spec's default limit

DEFAULT_MAX_BUFFERED_ASSET_BYTES = 256 * 1024 * 1024
"""The default ``max_buffered_asset_bytes`` of a session configuration."""

# What a receiver with theta's defaults tracks of one sender's unfinished assets: sends of
# several chunks wait for room rather than have the peer close the session.
_PEER_MAX_UNFINISHED = DEFAULT_MAX_UNFINISHED_ASSETS
_PEER_MAX_UNFINISHED_BYTES = DEFAULT_MAX_BUFFERED_ASSET_BYTES

Progress = Callable[[int, int], object]
"""``progress(bytes_sent, total_size)``, called after each chunk is handed to QUIC (awaited
when it returns an awaitable, e.g. an ``async def`` callback)."""


class _RoomWaiter:
    """A send waiting for room for an unfinished asset of ``cost`` bytes."""

    __slots__ = ("cost", "event", "gone")

    def __init__(self, cost: int) -> None:
        self.cost = cost
        self.event = trio.Event()
        self.gone = False  # left the queue (cancelled) while not at its head


class AssetChannel(DataChannel[AssetProgress]):
    """Send assets and receive them whole (:meth:`receive`) or chunk by chunk
    (:meth:`receive_chunk`, for assets too large to hold) — use one style per session.

    Received chunks wait in a queue bounded in chunks and bytes (``receive_queue``,
    ``receive_queue_bytes``); while it is full the session stops reading the stream and
    QUIC flow control slows the peer down.
    """

    _permission = Role.UPLOAD_ASSETS
    _action = "upload assets"
    _name = "assets channel"

    def __init__(
        self, session: Session, framed: FramedStream, config: ClientConfig | ServerConfig
    ) -> None:
        super().__init__(session, framed, config.receive_queue, config.receive_queue_bytes)
        self._chunk_size = config.asset_chunk_size
        self._frame_limit = min(config.frame_limits.assets, _PEER_FRAME_LIMIT)
        self._assembler = AssetAssembler(
            max_asset_size=config.max_asset_size,
            max_unfinished_bytes=config.max_buffered_asset_bytes,
        )
        self._partial: dict[int, bytearray] = {}
        self._next_id = 1
        # Assets with some chunks written, not all, and their cost as the peer counts it
        # (size + name), for the sends that must wait for room (in turn).
        self._unfinished: dict[int, int] = {}
        self._unfinished_total = 0
        self._budget = min(config.max_buffered_asset_bytes, _PEER_MAX_UNFINISHED_BYTES)
        self._waiting: collections.deque[_RoomWaiter] = collections.deque()
        self._gone = 0  # waiters in _waiting that left it

    def _max_chunk_data(self, name: str) -> int:
        # What the peer accepts is not known: within the spec's default limit, and within
        # this side's own when lower (the limits of a deployment are often set alike).
        return min(self._chunk_size, max_chunk_data_for(self._frame_limit, name))

    async def send(
        self,
        name: str,
        data: bytes | bytearray | memoryview | AsyncIterable[bytes],
        *,
        total_size: int | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Send one asset named ``name``; return its asset id.

        ``data`` is the whole asset (``total_size``, if given, must match), or an async
        iterable of pieces of any size adding up to ``total_size`` (required then;
        ``ValueError`` if the pieces do not add up, or if ``name`` leaves no room for data in
        a frame within the spec's default assets limit and this side's own); an iterable's
        last chunk goes out once it has ended, so one yielding too much delivers nothing.
        An async generator left early (an error, a cancellation) is closed. Chunks of
        concurrent sends interleave; an asset of several chunks waits, in turn, before its
        first while 64 of this side's assets are unfinished, or while their sizes and this
        one's would pass 256 MiB or this side's ``max_buffered_asset_bytes`` if lower (what
        a receiver with theta's defaults, or with the same budget, tracks).
        Raises :class:`SessionClosed` once the session is over, ``PermissionError`` if this
        client's role lacks ``UPLOAD_ASSETS``, ``trio.ClosedResourceError`` after
        :meth:`finish`. An asset whose send stops half-way (an error, a cancellation, a
        raising ``progress`` callback before the last chunk) is left unfinished: the
        protocol has no way to abandon one, so the peer holds its chunks until the session
        ends, and this side's direction can then only end with the session (no FIN inside
        an asset: :meth:`finish` raises, a graceful close leaves the stream to the QUIC
        close). ``progress`` is called after each chunk is written; once the last one is,
        the asset is complete whatever the callback does.
        """
        self._check_may_send()
        if not isinstance(name, str):
            raise TypeError(f"an asset name is a str, not {type(name).__name__}")
        if not name:
            raise ValueError("an asset needs a non-empty name")
        if isinstance(data, bytes | bytearray | memoryview):
            data = memoryview(data).cast("B")  # sized in bytes, whatever its item size
            if total_size is not None and total_size != len(data):
                raise ValueError(f"total_size {total_size} != {len(data)} bytes of data")
        elif not hasattr(data, "__aiter__"):
            raise TypeError(
                f"asset data is bytes-like or an async iterable of bytes, not {type(data).__name__}"
            )
        asset_id = self._next_id
        self._next_id = self._next_id % (2**64 - 1) + 1
        limit = self._max_chunk_data(name)
        if isinstance(data, bytes | bytearray | memoryview):
            total = len(data)
            await self._send_chunks(
                chunk_asset(asset_id, name, data, max_chunk_data=limit), total, progress
            )
            return asset_id
        if total_size is None:
            raise ValueError("total_size is required when data is an async iterable")
        sender = AssetSender(asset_id, name, total_size, limit)
        last: list[AssetChunk] = []  # sent once the iterable has ended: more data is an error
        try:
            async for piece in data:
                chunks = sender.feed(piece)
                if chunks and sender.complete:  # this piece completed the asset
                    chunks, last = chunks[:-1], chunks[-1:]
                await self._send_chunks(chunks, total_size, progress)
        except BaseException:
            if inspect.isasyncgen(data):  # left early: it is ours to finalize
                await data.aclose()
            raise
        await self._send_chunks([*last, *sender.finish()], total_size, progress)
        return asset_id

    async def _send_chunks(
        self, chunks: Iterable[AssetChunk], total: int, progress: Progress | None
    ) -> None:
        for chunk in chunks:
            last = chunk.offset + len(chunk.data) == chunk.total_size
            opening = chunk.offset == 0 and not last
            if opening:  # before the write: a finish() waiting for the channel must see it
                cost = chunk.total_size + len(chunk.name.encode())
                await self._wait_for_room(cost)
                self._unfinished[chunk.asset_id] = cost
                self._unfinished_total += cost
            try:
                await self._send(chunk)
            except BaseException:
                if opening:  # a failed send wrote nothing of the chunk
                    self._release(chunk.asset_id)
                raise
            if last:
                self._release(chunk.asset_id)
            if progress is not None:
                result = progress(chunk.offset + len(chunk.data), total)
                if inspect.isawaitable(result):
                    await result

    def _has_room(self, cost: int) -> bool:
        """Whether a receiver with theta's defaults (and this side's budget, when lower)
        can track one more unfinished asset of ``cost`` (one too large for the budget
        alone goes when none is unfinished)."""
        return not self._unfinished or (
            len(self._unfinished) < _PEER_MAX_UNFINISHED
            and self._unfinished_total + cost <= self._budget
        )

    async def _wait_for_room(self, cost: int) -> None:
        """Wait, in turn, until :meth:`_has_room` for ``cost``: first come, first served,
        so a large asset is not overtaken for ever, and one completion wakes one waiter."""
        self._session._check_open()  # a closed session wakes only those already waiting
        if not self._waiting and self._has_room(cost):
            return
        waiter = _RoomWaiter(cost)
        self._waiting.append(waiter)
        try:
            while True:
                await waiter.event.wait()
                self._session._check_open()
                if self._waiting[0] is waiter and self._has_room(cost):
                    return
                waiter.event = trio.Event()
        finally:
            if self._waiting[0] is waiter:
                self._waiting.popleft()
                self._wake_next()  # it may fit next to this one (checked once it is counted)
            else:  # dropped when it reaches the head (or at a compaction), not searched for
                waiter.gone = True
                self._gone += 1
                if self._gone > len(self._waiting) // 2:  # behind a head that may never move
                    self._waiting = collections.deque(w for w in self._waiting if not w.gone)
                    self._gone = 0

    def _wake_next(self) -> None:
        while self._waiting and self._waiting[0].gone:
            self._waiting.popleft()
            self._gone -= 1
        if self._waiting:
            self._waiting[0].event.set()

    def _release(self, asset_id: int) -> None:
        """``asset_id`` is no longer unfinished (complete, or its first chunk not sent)."""
        cost = self._unfinished.pop(asset_id, None)
        if cost is not None:
            self._unfinished_total -= cost
            self._wake_next()

    def _session_closed(self) -> None:
        super()._session_closed()
        for waiter in self._waiting:  # waiting sends raise SessionClosed
            waiter.event.set()

    async def receive(self) -> Asset:
        """The next complete asset from the peer.

        Raises ``trio.EndOfChannel`` once the peer finished its direction and
        :class:`SessionClosed` once the session is over.
        """
        while True:
            chunk = await self.receive_chunk()
            if chunk.first:
                if chunk.complete:
                    return Asset(chunk.asset_id, chunk.name, chunk.data)
                self._partial[chunk.asset_id] = bytearray(chunk.data)
                continue
            buffer = self._partial.get(chunk.asset_id)
            if buffer is None:
                raise RuntimeError(
                    f"asset {chunk.asset_id}: its first chunk was taken by receive_chunk();"
                    " use either receive() or receive_chunk() on a channel, not both"
                )
            buffer += chunk.data
            if chunk.complete:
                del self._partial[chunk.asset_id]
                return Asset(chunk.asset_id, chunk.name, bytes(buffer))

    def __aiter__(self) -> ReceiveIterator[Asset]:
        """``async for asset in session.assets``: whole assets, see :class:`ReceiveIterator`."""
        return ReceiveIterator(self.receive, self)

    async def receive_chunk(self) -> AssetProgress:
        """The next validated chunk (offset, data, whether it completes its asset)."""
        return await self._next()

    async def finish(self) -> None:
        """End this side's direction (FIN): no more assets follow. Raises
        ``trio.BrokenResourceError`` while an asset is not completely sent (its send
        stopped part-way, or is still under way in another task): the protocol cannot end
        the stream inside an asset (the peer would reject it with ``MALFORMED_FRAME``);
        after a send that stopped, only closing the session ends this direction."""
        self._session._check_open()
        if self._unfinished:
            raise trio.BrokenResourceError(self._left_unfinished())
        await super().finish()

    async def _finish_quietly(self) -> None:
        # Decided once the sends queued for the channel have had their turn: a close
        # refuses their writes, so those that had written nothing are no longer counted.
        async with self._framed._send_lock:
            if self._unfinished:  # the QUIC close ends the stream: the asset is lost
                return
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._framed.stream.send_eof()

    def _left_unfinished(self) -> str:
        ids = ", ".join(map(str, sorted(self._unfinished)[:8]))
        return f"cannot end the assets channel inside an asset: {ids} not completely sent"

    def _size(self, item: AssetProgress) -> int:
        return len(item.data) + (len(item.name.encode()) if item.first else 0)

    def _accept(self, message: Message) -> AssetProgress:
        assert isinstance(message, AssetChunk)  # the decoder checked the type
        return self._assembler.receive(message)

    def _end_of_stream(self) -> None:
        self._assembler.end_of_stream()
