"""zstd compression of replication payloads (wire spec sections 4.2 and 4.5).

Theory of operation
-------------------
When both peers negotiated :data:`~theta.core.CAP_ZSTD`, a ``ReplicationMessage`` may carry
a zstd-compressed ``payload``: ``flags`` bit 0 is set and ``uncompressed_size`` gives the
payload's size before compression. Otherwise bit 0 is clear and ``uncompressed_size`` is 0.

Sending
    :func:`compress_replication` (or a :class:`ReplicationSender`, which keeps one zstd
    context and counts bytes) compresses payloads of at least ``min_size`` bytes and uses the
    result only when it is strictly smaller than the payload. The zstd frame records its
    content size. Compression never raises the receiver's limit: the *uncompressed* payload
    must fit it, which :class:`ReplicationSender` checks.

Receiving
    :class:`ReplicationReceiver` returns the application payload of each message:

    * bit 0 clear: ``payload`` as is; ``uncompressed_size`` and the other flag bits are
      ignored;
    * bit 0 set without the capability: ``PROTOCOL_VIOLATION``;
    * bit 0 set, ``uncompressed_size`` above ``max_payload``, a zstd frame header declaring a
      content size above ``uncompressed_size``, undecodable zstd data, or an output of any
      other size than ``uncompressed_size``: ``MALFORMED_FRAME``.

    Decompression is bounded, so a small frame cannot inflate into a large allocation (a
    "zip bomb"): it streams into at most ``uncompressed_size + 1`` bytes of output and stops
    there, and the zstd window is capped at ``max(8 MiB, max_payload)`` rounded up to a power
    of two (8 MiB is what RFC 8878 asks every decoder to support). Concatenated zstd frames
    and skippable frames are accepted; the payload must be exactly a sequence of whole
    frames (the library's stream reader ignores a truncated frame after a complete one),
    which a second, frame-by-frame decoding checks once the first has bounded the output.

Both ends count ``bytes_on_wire`` (``payload`` bytes as sent) and ``bytes_uncompressed``
(application bytes) for a compression-ratio diagnostic, in a :class:`ReplicationStats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import zstandard

from ._encode import encode_frame
from ._errors import MalformedFrame, ProtocolViolation
from ._messages import ReplicationMessage

__all__ = [
    "DEFAULT_MAX_REPLICATION_PAYLOAD",
    "DEFAULT_ZSTD_LEVEL",
    "DEFAULT_ZSTD_MIN_SIZE",
    "FLAG_ZSTD",
    "REPLICATION_FRAME_OVERHEAD",
    "ReplicationReceiver",
    "ReplicationSender",
    "ReplicationStats",
    "compress_replication",
]

FLAG_ZSTD = 1 << 0
"""``ReplicationMessage.flags`` bit 0: the payload is zstd-compressed."""

DEFAULT_ZSTD_LEVEL = 3
"""zstd compression level used by default (zstd's own default)."""

DEFAULT_ZSTD_MIN_SIZE = 64
"""Payloads shorter than this are sent uncompressed: a zstd frame's header alone is 6 to 18
bytes, so compressing tiny payloads rarely pays."""

DEFAULT_MAX_REPLICATION_PAYLOAD = 1024 * 1024
"""Default limit of a replication payload, compressed or not (the channel's frame limit)."""

REPLICATION_FRAME_OVERHEAD = (
    len(encode_frame(ReplicationMessage(2**64 - 1, 2**32 - 1, b"", 2**32 - 1))) + 8
)
"""The most frame bytes around a replication payload (largest scalars, alignment padding):
a payload of the replication frame limit less this always fits in a frame."""

_U32_MAX = 2**32 - 1
_MIN_WINDOW = 8 * 1024 * 1024
_FRAME_CHECK_STEP = 128 * 1024  # largest slice the frame-boundary check feeds at once


@dataclass(frozen=True, slots=True)
class ReplicationStats:
    """Counts of replication messages and their bytes, for diagnostics.

    ``bytes_on_wire`` sums ``payload`` lengths as carried in frames (frame overhead not
    included); ``bytes_uncompressed`` sums the application payloads they stand for.
    """

    messages: int = 0
    compressed_messages: int = 0
    bytes_on_wire: int = 0
    bytes_uncompressed: int = 0

    @property
    def ratio(self) -> float:
        """``bytes_uncompressed / bytes_on_wire`` (1.0 before any byte): above 1 is a gain."""
        return self.bytes_uncompressed / self.bytes_on_wire if self.bytes_on_wire else 1.0

    def _add(self, message: ReplicationMessage, uncompressed: int) -> ReplicationStats:
        return ReplicationStats(
            self.messages + 1,
            self.compressed_messages + (1 if message.flags & FLAG_ZSTD else 0),
            self.bytes_on_wire + len(message.payload),
            self.bytes_uncompressed + uncompressed,
        )


def _compress(
    compressor: zstandard.ZstdCompressor, tick: int, payload: bytes, min_size: int
) -> ReplicationMessage:
    size = len(payload)
    if min_size <= size <= _U32_MAX:
        compressed = compressor.compress(payload)
        if len(compressed) < size:
            return ReplicationMessage(tick, FLAG_ZSTD, compressed, size)
    return ReplicationMessage(tick, 0, payload)


def compress_replication(
    tick: int,
    payload: bytes,
    *,
    level: int = DEFAULT_ZSTD_LEVEL,
    min_size: int = DEFAULT_ZSTD_MIN_SIZE,
) -> ReplicationMessage:
    """A ``ReplicationMessage`` for ``payload``, zstd-compressed when that makes it smaller.

    Only for peers that negotiated ``CAP_ZSTD``. Compressed: ``flags`` = bit 0 and
    ``uncompressed_size`` = ``len(payload)``; otherwise both are 0. Payloads shorter than
    ``min_size`` are not tried.
    """
    return _compress(zstandard.ZstdCompressor(level=level), tick, bytes(payload), min_size)


class ReplicationSender:
    """Builds outgoing replication messages, compressing them when ``zstd_negotiated``.

    Keeps one zstd context (cheaper than :func:`compress_replication` per message) and the
    :attr:`stats`. :meth:`message` raises ``ValueError`` for a payload above
    ``max_payload``, which the peer would reject even if it compressed well.
    """

    def __init__(
        self,
        *,
        zstd_negotiated: bool,
        level: int = DEFAULT_ZSTD_LEVEL,
        min_size: int = DEFAULT_ZSTD_MIN_SIZE,
        max_payload: int = DEFAULT_MAX_REPLICATION_PAYLOAD,
    ) -> None:
        self.zstd_negotiated = zstd_negotiated
        self.min_size = min_size
        self.max_payload = max_payload
        if level > zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"zstd level must be at most {zstandard.MAX_COMPRESSION_LEVEL}")
        self._level = level
        self._compressor: zstandard.ZstdCompressor | None = None  # made when first needed
        self._stats = ReplicationStats()

    @property
    def stats(self) -> ReplicationStats:
        """Messages and bytes built so far."""
        return self._stats

    def message(self, tick: int, payload: bytes) -> ReplicationMessage:
        """The ``ReplicationMessage`` carrying ``payload`` (bytes-like) for ``tick``."""
        if not isinstance(payload, bytes | bytearray | memoryview):
            # bytes() would also take an int (that many zero bytes) or an iterable.
            raise TypeError(f"a replication payload is bytes-like, not {type(payload).__name__}")
        payload = bytes(payload)
        if len(payload) > self.max_payload:
            raise ValueError(
                f"replication payload of {len(payload)} bytes exceeds the"
                f" {self.max_payload}-byte limit"
            )
        if not self.zstd_negotiated or len(payload) < self.min_size:
            message = ReplicationMessage(tick, 0, payload)
        else:
            if self._compressor is None:
                self._compressor = zstandard.ZstdCompressor(level=self._level)
            message = _compress(self._compressor, tick, payload, self.min_size)
        self._stats = self._stats._add(message, len(payload))
        return message


def _ends_on_frame_boundary(decompressor: zstandard.ZstdDecompressor, data: bytes) -> bool:
    """Whether ``data`` is a sequence of whole zstd (or skippable) frames. Decodes frame by
    frame (in C: a walk over hostile block headers in Python cost 50x the decoding); call
    it only once a bounded decoding has shown how much all of ``data`` produces. Each
    frame is fed slices growing from 64 bytes, so that what it leaves over (a copy) stays
    small: handing every frame the whole rest made a payload of many tiny frames cost
    time quadratic in their number (seconds for one 1 MiB frame)."""
    view, pos, size = memoryview(data), 0, len(data)
    while pos < size:
        frame, step = decompressor.decompressobj(), 64
        while True:
            piece = view[pos : pos + step]
            frame.decompress(piece)
            if frame.eof:
                pos += len(piece) - len(frame.unused_data)
                break
            pos += len(piece)
            if pos >= size:
                return False
            step = min(step * 2, _FRAME_CHECK_STEP)
    return True


def _window_limit(max_payload: int) -> int:
    return max(_MIN_WINDOW, 1 << max(0, max_payload - 1).bit_length())


class ReplicationReceiver:
    """Turns received replication messages back into application payloads, with bounded
    decompression (see the module docstring). A rejected message changes nothing."""

    def __init__(
        self, *, zstd_negotiated: bool, max_payload: int = DEFAULT_MAX_REPLICATION_PAYLOAD
    ) -> None:
        if max_payload < 0:
            raise ValueError(f"max_payload must be >= 0, not {max_payload}")
        self.zstd_negotiated = zstd_negotiated
        self.max_payload = max_payload
        self._decompressor: zstandard.ZstdDecompressor | None = None  # made when first needed
        self._stats = ReplicationStats()

    @property
    def stats(self) -> ReplicationStats:
        """Messages and bytes accepted so far."""
        return self._stats

    def receive(self, message: ReplicationMessage) -> bytes:
        """The application payload of ``message``; raises ``ProtocolViolation`` or
        ``MalformedFrame`` as the spec says."""
        if not message.flags & FLAG_ZSTD:
            payload = message.payload
        elif not self.zstd_negotiated:
            raise ProtocolViolation(
                f"tick {message.tick}: compressed replication payload, but zstd was not negotiated"
            )
        else:
            payload = self._decompress_untrusted(message)
        self._stats = self._stats._add(message, len(payload))
        return payload

    def _decompress_untrusted(self, message: ReplicationMessage) -> bytes:
        size, data = message.uncompressed_size, message.payload
        where = f"tick {message.tick}: compressed payload"
        if size > self.max_payload:
            raise MalformedFrame(
                f"{where} declares {size} bytes, above the {self.max_payload}-byte limit"
            )
        pieces: list[bytes] = []
        produced = 0
        try:
            declared = zstandard.frame_content_size(data)
            if declared > size:
                raise MalformedFrame(f"{where}: zstd frame declares {declared} bytes, not {size}")
            if self._decompressor is None:
                self._decompressor = zstandard.ZstdDecompressor(
                    max_window_size=_window_limit(self.max_payload)
                )
            with self._decompressor.stream_reader(data, read_across_frames=True) as reader:
                while produced <= size:
                    piece = reader.read(size + 1 - produced)
                    if not piece:
                        break
                    pieces.append(piece)
                    produced += len(piece)
        except zstandard.ZstdError as error:
            raise MalformedFrame(f"{where} is not valid zstd data: {error}") from None
        if produced != size:
            more = "more than" if produced > size else f"{produced} bytes, not"
            raise MalformedFrame(f"{where} decompresses to {more} {size} bytes")
        assert self._decompressor is not None
        try:  # the stream reader stops quietly at a truncated frame after a whole one
            whole = _ends_on_frame_boundary(self._decompressor, data)
        except zstandard.ZstdError as error:
            raise MalformedFrame(f"{where} is not valid zstd data: {error}") from None
        if not whole:
            raise MalformedFrame(f"{where} ends inside a zstd frame")
        return b"".join(pieces)
