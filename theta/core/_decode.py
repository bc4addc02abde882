"""Validating decoder for untrusted frames (spec section 3).

The FlatBuffers Python runtime trusts its input, so this module reads ``Frame`` buffers
itself: every offset, vtable, vector length, string and union type is checked against the
buffer before use, and every failure becomes :class:`~theta.core.MalformedFrame`. Byte
vectors are sliced out of the buffer in one copy, never read element by element.

:class:`FrameDecoder` turns a stream's bytes into messages: it handles any fragmentation,
rejects a bad length from the 4-byte prefix alone (without buffering the body), and checks
that each message type is allowed on the stream's channel.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import FrameTooLarge, LocalProtocolError, MalformedFrame, ProtocolViolation
from ._layout import BODY_TYPES, FILE_IDENTIFIER, LAYOUTS, SCALAR_WIDTH
from ._messages import (
    AssetChunk,
    Channel,
    ChannelOpen,
    Heartbeat,
    Message,
    ReplicationMessage,
    SessionAcknowledge,
    SessionClose,
    SessionConfirm,
    SessionHello,
    SessionReject,
)

__all__ = ["FrameDecoder", "FrameLimits", "decode_payload_untrusted"]

_Buffer = bytes | bytearray | memoryview

_U8 = struct.Struct("<B").unpack_from
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U64 = struct.Struct("<Q").unpack_from

_SCALAR_READ = {"u8": _U8, "u16": _U16, "u32": _U32, "u64": _U64}
_TYPES_BY_BODY: dict[int, type[Message]] = {value: cls for cls, value in BODY_TYPES.items()}
_DEFAULTS: dict[str, object] = {"u8": 0, "u16": 0, "u32": 0, "u64": 0, "bytes": b"", "str": ""}
_DEFAULTS["u32s"] = ()
_MAX_OFFSET = 0x7FFF_FFFF


def _fail(what: str) -> MalformedFrame:
    return MalformedFrame(f"malformed frame: {what}")


def _table(buf: _Buffer, pos: int, size: int) -> tuple[int, int, int]:
    """Check the table at ``pos``; return (vtable position, vtable size, table size)."""
    if pos % 4 or pos + 4 > size:
        raise _fail(f"table offset {pos} out of bounds or misaligned")
    vtable = pos - _I32(buf, pos)[0]
    if vtable < 0 or vtable % 2 or vtable + 4 > size:
        raise _fail(f"vtable offset {vtable} out of bounds or misaligned")
    vtable_size, table_size = _U16(buf, vtable)[0], _U16(buf, vtable + 2)[0]
    if vtable_size < 4 or vtable_size % 2 or vtable + vtable_size > size:
        raise _fail(f"vtable size {vtable_size} invalid")
    if table_size < 4 or pos + table_size > size:
        raise _fail(f"table size {table_size} invalid")
    return vtable, vtable_size, table_size


def _field(buf: _Buffer, pos: int, table: tuple[int, int, int], slot: int, width: int) -> int:
    """Absolute position of field ``slot`` of the table at ``pos`` (0 when absent)."""
    vtable, vtable_size, table_size = table
    entry = 4 + 2 * slot
    if entry + 2 > vtable_size:
        return 0
    offset: int = _U16(buf, vtable + entry)[0]
    if offset == 0:
        return 0
    where = pos + offset
    if offset < 4 or offset + width > table_size or where % width:
        raise _fail(f"field {slot} at offset {offset} out of its table or misaligned")
    return where


def _indirect(buf: _Buffer, where: int, size: int) -> int:
    target: int = _U32(buf, where)[0]
    if target == 0 or target > _MAX_OFFSET or where + target >= size:
        raise _fail(f"offset {target} at {where} points outside the buffer")
    return where + target


def _vector(buf: _Buffer, where: int, size: int, element: int) -> tuple[int, int]:
    """(start, length) of the vector referenced at ``where``."""
    start = _indirect(buf, where, size)
    if start % 4 or start + 4 > size:
        raise _fail(f"vector at {start} out of bounds or misaligned")
    length = _U32(buf, start)[0]
    if start + 4 + length * element > size:
        raise _fail(f"vector of {length} elements at {start} runs past the buffer")
    return start + 4, length


def _read_field(buf: _Buffer, where: int, kind: str, size: int) -> object:
    if kind in _SCALAR_READ:
        return _SCALAR_READ[kind](buf, where)[0]
    if kind == "u32s":
        start, length = _vector(buf, where, size, 4)
        return struct.unpack_from(f"<{length}I", buf, start)
    start, length = _vector(buf, where, size, 1)
    if kind == "bytes":
        return bytes(buf[start : start + length])
    end = start + length
    if end >= size or buf[end] != 0:
        raise _fail("string is not zero-terminated")
    try:
        return str(buf[start:end], "utf-8")
    except UnicodeDecodeError:
        raise _fail("string is not valid UTF-8") from None


def _body_type(buf: _Buffer) -> tuple[int, int]:
    """Check the ``Frame`` root; return (body type value, body table position)."""
    size = len(buf)
    if size < 8:
        raise _fail(f"{size} bytes is too short for a FlatBuffers header")
    if buf[4:8] != FILE_IDENTIFIER:
        raise _fail(f"file identifier {bytes(buf[4:8])!r} is not {FILE_IDENTIFIER!r}")
    root = _U32(buf, 0)[0]
    table = _table(buf, root, size)
    type_at = _field(buf, root, table, 0, 1)
    body_type = _U8(buf, type_at)[0] if type_at else 0
    if body_type == 0:
        raise _fail("frame has no body")
    if body_type not in _TYPES_BY_BODY:
        raise _fail(f"unknown body type {body_type}")
    body_at = _field(buf, root, table, 1, 4)
    if not body_at:
        raise _fail("frame has a body type but no body")
    return body_type, _indirect(buf, body_at, size)


def _decode_body(buf: _Buffer, cls: type[Message], pos: int) -> Message:
    size = len(buf)
    table = _table(buf, pos, size)
    values = []
    for slot, kind in enumerate(LAYOUTS[cls]):
        where = _field(buf, pos, table, slot, SCALAR_WIDTH.get(kind, 4))
        values.append(_read_field(buf, where, kind, size) if where else _DEFAULTS[kind])
    return cls(*values)  # type: ignore[arg-type]


def decode_payload_untrusted(payload: _Buffer) -> Message:
    """Decode one frame payload (without its length prefix), validating everything.

    Raises :class:`~theta.core.MalformedFrame` for anything that is not a well-formed
    ``Frame``; never another exception.
    """
    body_type, pos = _body_type(payload)
    return _decode_body(payload, _TYPES_BY_BODY[body_type], pos)


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """Largest frame payload accepted per channel (spec section 3 defaults); a payload of
    exactly the limit is legal. Each limit is an ``int`` in 1..2**32-1 (``TypeError``,
    ``ValueError`` otherwise)."""

    control: int = 16 * 1024
    replication: int = 1024 * 1024
    assets: int = 1024 * 1024 + 4 * 1024

    def __post_init__(self) -> None:
        for name in ("control", "replication", "assets"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"FrameLimits.{name} must be an int, not {value!r}")
            if not 0 < value <= 0xFFFF_FFFF:
                raise ValueError(f"FrameLimits.{name} must be in 1..2**32-1, not {value!r}")

    def for_channel(self, channel: Channel) -> int:
        """The limit of ``channel``."""
        return (self.control, self.replication, self.assets)[channel]


_ALLOWED: dict[Channel, frozenset[int]] = {
    Channel.CONTROL: frozenset(
        BODY_TYPES[cls]
        for cls in (SessionAcknowledge, SessionConfirm, SessionReject, Heartbeat, SessionClose)
    ),
    Channel.REPLICATION: frozenset({BODY_TYPES[ReplicationMessage]}),
    Channel.ASSETS: frozenset({BODY_TYPES[AssetChunk]}),
}
_IDENTIFYING = frozenset({BODY_TYPES[SessionHello], BODY_TYPES[ChannelOpen]})
_PREFIX = struct.Struct(">I").unpack_from


class FrameDecoder:
    """Incremental decoder of one stream's frames.

    ``channel`` is the stream's channel when this side knows it (the client, which opened
    the stream). ``None`` means the stream is not identified yet (the accepting server): its
    first frame is read under the control limit and must be ``SessionHello`` (control) or
    ``ChannelOpen`` (replication or assets), which then sets :attr:`channel`.
    ``SessionHello`` and ``ChannelOpen`` are accepted only as that identifying frame.

    ``max_frame_size`` overrides the limit of a known ``channel``; ``limits`` gives all
    three. :meth:`feed` and :meth:`end_of_stream` raise only
    :class:`~theta.core.ProtocolError` subclasses; after one, the decoder stays failed.
    """

    def __init__(
        self,
        channel: Channel | None,
        max_frame_size: int | None = None,
        *,
        limits: FrameLimits | None = None,
    ) -> None:
        self._limits = limits or FrameLimits()
        if channel is None:
            if max_frame_size is not None:
                raise ValueError("an unidentified stream takes per-channel limits=, not a size")
            self._limit = self._limits.control
        else:
            channel = Channel(channel)
            self._limit = self._limits.for_channel(channel)
            if max_frame_size is not None:
                if not 0 < max_frame_size <= 0xFFFF_FFFF:
                    raise ValueError(f"max_frame_size must be in 1..2**32-1: {max_frame_size}")
                self._limit = max_frame_size
        self._channel = channel
        self._buffer = bytearray()
        self._failed: MalformedFrame | FrameTooLarge | ProtocolViolation | None = None
        self._ended = False
        self._decode: Callable[[memoryview], Message] = self._decode_frame

    @property
    def channel(self) -> Channel | None:
        """The stream's channel, or ``None`` until its identifying frame arrived."""
        return self._channel

    @property
    def max_frame_size(self) -> int:
        """The payload limit applied to the next frame."""
        return self._limit

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._buffer)

    def feed(self, data: _Buffer) -> list[Message]:
        """Add received bytes; return every message they complete, in order."""
        if self._failed is not None:
            raise type(self._failed)(self._failed.reason)
        if self._ended:
            raise LocalProtocolError("feed() after end_of_stream()")
        try:
            messages: list[Message] = []
            with memoryview(data) as whole:
                rest = whole
                if self._buffer:  # the frame begun earlier takes only its own bytes
                    rest = self._complete_buffered(whole, messages)
                if not self._buffer:
                    more, used = self._parse(rest)
                    messages += more
                    self._buffer += rest[used:]
        except (MalformedFrame, FrameTooLarge, ProtocolViolation) as error:
            self._failed = error
            # The traceback may still hold views of the old buffer: replace, don't resize.
            self._buffer = bytearray()
            raise
        return messages

    def end_of_stream(self) -> None:
        """The stream ended (FIN). Raises ``MalformedFrame`` if it ended inside a frame."""
        if self._failed is not None:
            raise type(self._failed)(self._failed.reason)
        self._ended = True
        if self._buffer:
            error = _fail(f"stream ended inside a frame ({len(self._buffer)} bytes pending)")
            self._failed = error
            self._buffer = bytearray()
            raise error

    def _complete_buffered(self, view: memoryview, messages: list[Message]) -> memoryview:
        """Move into the buffer the bytes of ``view`` that the buffered frame still lacks
        (a prefix split across feeds is checked before any body byte is taken); append
        the frame to ``messages`` once whole. Return the rest of ``view``."""
        buffer = self._buffer
        if len(buffer) < 4:
            missing = 4 - len(buffer)
            buffer += view[:missing]
            view = view[missing:]
            if len(buffer) < 4:
                return view
            self._check_length(_PREFIX(buffer, 0)[0])
        end = 4 + _PREFIX(buffer, 0)[0]
        missing = end - len(buffer)
        buffer += view[:missing]
        view = view[missing:]
        if len(buffer) == end:
            with memoryview(buffer) as frame:
                messages.append(self._decode(frame[4:]))
            self._buffer = bytearray()
        return view

    def _check_length(self, length: int) -> None:
        """Spec 3: a bad length is known from the prefix alone, before any body byte."""
        if length == 0:
            raise _fail("zero-length frame")
        if length > self._limit:
            raise FrameTooLarge(
                f"frame of {length} bytes exceeds the {self._limit}-byte limit"
                f" of the {self._channel_name()} channel"
            )

    def _parse(self, view: memoryview) -> tuple[list[Message], int]:
        messages: list[Message] = []
        pos, size = 0, len(view)
        while size - pos >= 4:
            length = _PREFIX(view, pos)[0]
            self._check_length(length)
            end = pos + 4 + length
            if end > size:
                break
            messages.append(self._decode(view[pos + 4 : end]))
            pos = end
        return messages, pos

    def _channel_name(self) -> str:
        return "unidentified" if self._channel is None else self._channel.name.lower()

    def _decode_frame(self, payload: memoryview) -> Message:
        body_type, pos = _body_type(payload)
        if self._channel is None:
            return self._identify(payload, body_type, pos)
        if body_type not in _ALLOWED[self._channel]:
            raise ProtocolViolation(
                f"{_TYPES_BY_BODY[body_type].__name__} is not allowed on the"
                f" {self._channel_name()} channel"
            )
        return _decode_body(payload, _TYPES_BY_BODY[body_type], pos)

    def _identify(self, payload: memoryview, body_type: int, pos: int) -> Message:
        if body_type not in _IDENTIFYING:
            raise ProtocolViolation(
                f"a stream must start with SessionHello or ChannelOpen, not"
                f" {_TYPES_BY_BODY[body_type].__name__}"
            )
        message = _decode_body(payload, _TYPES_BY_BODY[body_type], pos)
        if isinstance(message, ChannelOpen):
            if message.channel not in (Channel.REPLICATION, Channel.ASSETS):
                raise ProtocolViolation(f"ChannelOpen for unknown channel {message.channel}")
            channel = Channel(message.channel)
        else:
            channel = Channel.CONTROL
        self._channel = channel
        self._limit = self._limits.for_channel(channel)
        return message
