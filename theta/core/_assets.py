"""Asset transfer over the assets channel (wire spec section 4.5).

Theory of operation
-------------------
An asset travels as :class:`~theta.core.AssetChunk` frames with contiguous offsets starting
at 0; the first chunk carries the asset's ``name``; the asset is complete when
``offset + len(data) == total_size``. Chunks of different assets may interleave, and an
``asset_id`` may be reused once its asset is complete.

Receiving
    One :class:`AssetAssembler` per direction of an assets stream validates every chunk and
    returns an :class:`AssetProgress`. It keeps only a few integers and the name per
    unfinished asset and never buffers data, so a session can stream a large asset to
    wherever it goes. The checks, in this order (the first failing one decides the error)::

        unknown asset_id, offset != 0            MALFORMED_FRAME
        unknown asset_id, empty name             MALFORMED_FRAME
        known asset_id, offset != next expected  MALFORMED_FRAME
        known asset_id, total_size changed       MALFORMED_FRAME
        total_size > max_asset_size              FRAME_TOO_LARGE
        offset + len(data) > total_size          MALFORMED_FRAME
        a new unfinished asset beyond max_unfinished_assets, or beyond
        max_unfinished_bytes of declared sizes
        and name lengths                         FRAME_TOO_LARGE

    The last two are this receiver's resource limits (the spec names no code for them; we
    use the code of its other size limit). A rejected chunk leaves the assembler unchanged.
    Later chunks' ``name`` is ignored; zero-length chunks inside an asset are accepted.
    :meth:`AssetAssembler.end_of_stream` (FIN) is ``MALFORMED_FRAME`` while an asset is
    unfinished.

    :class:`AssetCollector` wraps an assembler for callers that want whole assets as
    ``bytes``. Its memory is bounded by ``max_buffered_bytes``, which it enforces through the
    assembler's ``max_unfinished_bytes``: the declared sizes of all unfinished assets (and
    their names' lengths, which the assembler keeps), checked on each asset's first chunk,
    before any of its data is kept.

Sending
    :func:`chunk_asset` splits bytes already in memory; :class:`AssetSender` does the same for
    data arriving in pieces of any size (e.g. from an async iterable) and checks that they
    add up to the announced ``total_size``. Both set ``name`` on the first chunk only, never
    emit an empty chunk except for the single chunk of an empty asset, and never exceed
    ``max_chunk_data`` bytes of data per chunk. :func:`max_chunk_data_for` gives the largest
    ``max_chunk_data`` whose frames fit a payload limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ._encode import asset_chunk_overhead
from ._errors import FrameTooLarge, LocalProtocolError, MalformedFrame
from ._messages import AssetChunk

__all__ = [
    "DEFAULT_MAX_ASSET_SIZE",
    "DEFAULT_MAX_BUFFERED_BYTES",
    "DEFAULT_MAX_UNFINISHED_ASSETS",
    "Asset",
    "AssetAssembler",
    "AssetCollector",
    "AssetProgress",
    "AssetSender",
    "chunk_asset",
    "max_chunk_data_for",
]

DEFAULT_MAX_ASSET_SIZE = 64 * 1024 * 1024
"""Largest ``total_size`` a receiver accepts by default (spec section 4.5)."""

DEFAULT_MAX_UNFINISHED_ASSETS = 64
"""Unfinished assets a receiver tracks at once by default."""

DEFAULT_MAX_BUFFERED_BYTES = 128 * 1024 * 1024
"""Declared bytes of unfinished assets an :class:`AssetCollector` buffers by default."""

_U64_MAX = 2**64 - 1


def max_chunk_data_for(frame_limit: int, name: str) -> int:
    """Largest ``len(data)`` such that every ``AssetChunk`` of an asset called ``name``
    encodes to a frame payload of at most ``frame_limit`` bytes.

    Exact for the chunk that carries ``name`` (one byte more would not fit, and with a
    limit that is a multiple of 8 it fills the limit to the byte); chunks without the
    name are smaller. Raises ``ValueError`` when not even one byte of data fits.
    """
    name_size = len(name.encode("utf-8"))
    room = frame_limit - frame_limit % 8 - asset_chunk_overhead(name_size)
    if room < 1:
        raise ValueError(
            f"a {frame_limit}-byte frame limit leaves no room for data next to a name of"
            f" {name_size} bytes"
        )
    return room


def _check_u64(what: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64_MAX:
        raise ValueError(f"{what} must be an unsigned 64-bit int, not {value!r}")


def _check_sender_args(asset_id: int, name: str, max_chunk_data: int) -> None:
    _check_u64("asset_id", asset_id)
    if not isinstance(name, str) or not name:
        raise ValueError("an asset needs a non-empty name (spec section 4.5)")
    if not isinstance(max_chunk_data, int) or max_chunk_data < 1:
        raise ValueError(f"max_chunk_data must be a positive int, not {max_chunk_data!r}")


def chunk_asset(
    asset_id: int, name: str, data: bytes | bytearray | memoryview, *, max_chunk_data: int
) -> Iterator[AssetChunk]:
    """Split ``data`` into the chunks of one asset, lazily (one copy per chunk).

    ``name`` goes on the first chunk only; an empty ``data`` gives one empty chunk. Arguments
    are checked before the first chunk is produced (``ValueError``).
    """
    _check_sender_args(asset_id, name, max_chunk_data)
    view = memoryview(data).cast("B")
    _check_u64("len(data)", len(view))
    return _chunks(asset_id, name, view, max_chunk_data)


def _chunks(asset_id: int, name: str, view: memoryview, limit: int) -> Iterator[AssetChunk]:
    total = len(view)
    yield AssetChunk(asset_id, 0, total, name, view[:limit].tobytes())
    for offset in range(limit, total, limit):
        yield AssetChunk(asset_id, offset, total, "", view[offset : offset + limit].tobytes())


class AssetSender:
    """Chunks one asset whose ``total_size`` bytes arrive in pieces of any size.

    :meth:`feed` returns every chunk the data completes: full chunks of ``max_chunk_data``
    bytes, and the final (possibly shorter) chunk as soon as ``total_size`` bytes have been
    fed. :meth:`finish` checks that the data added up and returns the single chunk of an
    empty asset if it was not sent yet. Data beyond ``total_size``, or a :meth:`finish`
    short of it, is ``ValueError`` and changes nothing.
    """

    def __init__(self, asset_id: int, name: str, total_size: int, max_chunk_data: int) -> None:
        _check_sender_args(asset_id, name, max_chunk_data)
        _check_u64("total_size", total_size)
        self.asset_id = asset_id
        self.name = name
        self.total_size = total_size
        self.max_chunk_data = max_chunk_data
        self._pending = bytearray()
        self._sent = 0
        self._complete = False
        self._finished = False

    @property
    def bytes_fed(self) -> int:
        """Bytes given to :meth:`feed` so far."""
        return self._sent + len(self._pending)

    @property
    def complete(self) -> bool:
        """Whether the final chunk has been returned."""
        return self._complete

    def feed(self, data: bytes | bytearray | memoryview) -> list[AssetChunk]:
        """Add the next piece of the asset; return the chunks it completes."""
        if self._finished:
            raise LocalProtocolError("feed() after finish()")
        view = memoryview(data).cast("B")
        if self.bytes_fed + len(view) > self.total_size:
            raise ValueError(
                f"asset {self.asset_id}: {self.bytes_fed + len(view)} bytes fed exceed its"
                f" total_size of {self.total_size}"
            )
        chunks: list[AssetChunk] = []
        limit, pos = self.max_chunk_data, 0
        if self._pending:
            pos = min(len(view), limit - len(self._pending))
            self._pending += view[:pos]
            if len(self._pending) == limit:
                chunks.append(self._emit(bytes(self._pending)))
                self._pending.clear()
        while len(view) - pos >= limit:
            chunks.append(self._emit(view[pos : pos + limit].tobytes()))
            pos += limit
        self._pending += view[pos:]
        if self.bytes_fed == self.total_size and not self._complete:
            chunks.append(self._emit(bytes(self._pending)))
            self._pending.clear()
        return chunks

    def finish(self) -> list[AssetChunk]:
        """Check that exactly ``total_size`` bytes were fed; return any last chunk."""
        if self.bytes_fed != self.total_size:
            raise ValueError(
                f"asset {self.asset_id}: {self.bytes_fed} bytes fed, but its total_size is"
                f" {self.total_size}"
            )
        chunks = [] if self._complete else [self._emit(b"")]
        self._finished = True
        return chunks

    def _emit(self, data: bytes) -> AssetChunk:
        offset = self._sent
        chunk = AssetChunk(
            self.asset_id, offset, self.total_size, self.name if offset == 0 else "", data
        )
        self._sent += len(data)
        self._complete = self._sent == self.total_size
        return chunk


@dataclass(frozen=True, slots=True)
class AssetProgress:
    """One accepted chunk: ``data`` sits at ``offset`` of asset ``asset_id``.

    ``name`` is the asset's name (from its first chunk, repeated for every later one);
    ``first`` and ``complete`` say this chunk was the asset's first and its last.
    """

    asset_id: int
    name: str
    offset: int
    total_size: int
    data: bytes
    first: bool
    complete: bool


@dataclass(slots=True)
class _Unfinished:
    name: str
    total_size: int
    next_offset: int
    cost: int  # counted against max_unfinished_bytes: total_size + the name's UTF-8 bytes


class AssetAssembler:
    """Validates the chunks of one direction of an assets stream (see the module docstring).

    ``max_unfinished_bytes`` (``None``: no limit) bounds the sum of the declared
    ``total_size`` of unfinished assets and of their names' UTF-8 lengths (kept until
    they complete), for callers that buffer them.
    """

    def __init__(
        self,
        *,
        max_asset_size: int = DEFAULT_MAX_ASSET_SIZE,
        max_unfinished_assets: int = DEFAULT_MAX_UNFINISHED_ASSETS,
        max_unfinished_bytes: int | None = None,
    ) -> None:
        if max_asset_size < 0 or max_unfinished_assets < 1:
            raise ValueError("max_asset_size must be >= 0 and max_unfinished_assets >= 1")
        if max_unfinished_bytes is not None and max_unfinished_bytes < 0:
            raise ValueError("max_unfinished_bytes must be >= 0")
        self.max_asset_size = max_asset_size
        self.max_unfinished_assets = max_unfinished_assets
        self.max_unfinished_bytes = max_unfinished_bytes
        self._unfinished: dict[int, _Unfinished] = {}
        self._unfinished_bytes = 0
        self._ended = False

    @property
    def unfinished(self) -> int:
        """Number of assets started but not complete."""
        return len(self._unfinished)

    @property
    def unfinished_bytes(self) -> int:
        """Sum of the declared ``total_size`` of the unfinished assets and of their names'
        UTF-8 lengths."""
        return self._unfinished_bytes

    def receive(self, chunk: AssetChunk) -> AssetProgress:
        """Validate ``chunk``; raise ``MalformedFrame``/``FrameTooLarge`` or return its
        progress."""
        if self._ended:
            raise LocalProtocolError("receive() after end_of_stream()")
        aid, offset, total, size = chunk.asset_id, chunk.offset, chunk.total_size, len(chunk.data)
        state = self._unfinished.get(aid)
        if state is None:
            if offset != 0:
                raise MalformedFrame(f"asset {aid}: first chunk at offset {offset}, not 0")
            if not chunk.name:
                raise MalformedFrame(f"asset {aid}: first chunk has no name")
            name = chunk.name
        else:
            if offset != state.next_offset:
                raise MalformedFrame(
                    f"asset {aid}: chunk at offset {offset}, expected {state.next_offset}"
                )
            if total != state.total_size:
                raise MalformedFrame(
                    f"asset {aid}: total_size changed from {state.total_size} to {total}"
                )
            name = state.name
        if total > self.max_asset_size:
            raise FrameTooLarge(
                f"asset {aid}: total_size {total} exceeds the {self.max_asset_size}-byte limit"
            )
        end = offset + size
        if end > total:
            raise MalformedFrame(f"asset {aid}: data runs to {end}, past total_size {total}")
        complete = end == total
        if state is None and not complete:
            cost = total + len(name.encode())  # a name can be most of a frame: count it
            self._check_room(aid, cost)
            self._unfinished[aid] = _Unfinished(name, total, end, cost)
            self._unfinished_bytes += cost
        elif state is not None and complete:
            del self._unfinished[aid]
            self._unfinished_bytes -= state.cost
        elif state is not None:
            state.next_offset = end
        return AssetProgress(aid, name, offset, total, chunk.data, state is None, complete)

    def _check_room(self, aid: int, cost: int) -> None:
        if len(self._unfinished) >= self.max_unfinished_assets:
            raise FrameTooLarge(
                f"asset {aid}: more than {self.max_unfinished_assets} unfinished assets"
            )
        limit = self.max_unfinished_bytes
        if limit is not None and self._unfinished_bytes + cost > limit:
            raise FrameTooLarge(
                f"asset {aid}: {cost} more bytes would exceed the {limit}-byte budget of"
                f" unfinished assets ({self._unfinished_bytes} in use)"
            )

    def end_of_stream(self) -> None:
        """The assets stream ended (FIN): ``MalformedFrame`` if an asset is unfinished."""
        if self._unfinished:
            ids = sorted(self._unfinished)
            shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
            raise MalformedFrame(f"assets stream ended with {len(ids)} unfinished: {shown}")
        self._ended = True


@dataclass(frozen=True, slots=True)
class Asset:
    """A complete received asset."""

    asset_id: int
    name: str
    data: bytes


class AssetCollector:
    """Reassembles whole assets in memory, bounded by ``max_buffered_bytes``.

    :meth:`receive` returns the :class:`Asset` a chunk completes, else ``None``. Errors and
    limits are those of :class:`AssetAssembler`, plus ``FRAME_TOO_LARGE`` when a new asset's
    declared size and name (UTF-8 bytes) would take the unfinished assets past
    ``max_buffered_bytes``.
    """

    def __init__(
        self,
        *,
        max_asset_size: int = DEFAULT_MAX_ASSET_SIZE,
        max_unfinished_assets: int = DEFAULT_MAX_UNFINISHED_ASSETS,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    ) -> None:
        self.assembler = AssetAssembler(
            max_asset_size=max_asset_size,
            max_unfinished_assets=max_unfinished_assets,
            max_unfinished_bytes=max_buffered_bytes,
        )
        self._buffers: dict[int, bytearray] = {}
        self._buffered = 0

    @property
    def buffered(self) -> int:
        """Bytes of data held for unfinished assets."""
        return self._buffered

    def receive(self, chunk: AssetChunk) -> Asset | None:
        """Validate and keep ``chunk``; return its asset if this chunk completed it."""
        progress = self.assembler.receive(chunk)
        aid = progress.asset_id
        if progress.first and progress.complete:
            return Asset(aid, progress.name, progress.data)
        if progress.first:
            self._buffers[aid] = bytearray(progress.data)
            self._buffered += len(progress.data)
            return None
        buffer = self._buffers[aid]
        buffer += progress.data
        self._buffered += len(progress.data)
        if not progress.complete:
            return None
        del self._buffers[aid]
        self._buffered -= len(buffer)
        return Asset(aid, progress.name, bytes(buffer))

    def end_of_stream(self) -> None:
        """The assets stream ended (FIN): ``MalformedFrame`` if an asset is unfinished."""
        self.assembler.end_of_stream()
