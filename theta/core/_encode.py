"""Encoding messages into length-prefixed frames (spec sections 3 and 4).

Each message type has a precomputed FlatBuffers layout (:class:`_Plan`): the ``Frame``
table and its vtable, the body's vtable and table with every field at a fixed, aligned
position, then the body's vectors and strings. Encoding is one ``struct`` pack for the
fixed part and one join with the vectors, so a byte vector is copied once. Every field is
checked first, so nothing out of range is ever written. The tests read every encoded frame
with flatc's generated code as well as with the validating decoder.
"""

from __future__ import annotations

import dataclasses
import struct

from ._layout import BODY_TYPES, FILE_IDENTIFIER, LAYOUTS, SCALAR_WIDTH
from ._messages import AssetChunk, Message

__all__ = ["encode_frame"]

_MAX_UINT = {"u8": 0xFF, "u16": 0xFFFF, "u32": 0xFFFF_FFFF, "u64": 0xFFFF_FFFF_FFFF_FFFF}
_FORMAT = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q"}
_PREFIX = struct.Struct(">I")
_VTABLE_AT = 28  # after the root offset, identifier, Frame vtable (8) and Frame table (12)


class _Plan:
    """Where every byte of one message type's frame goes."""

    def __init__(self, cls: type[Message]) -> None:
        kinds = LAYOUTS[cls]
        self.cls = cls
        self.names = tuple(field.name for field in dataclasses.fields(cls))
        self.kinds = kinds
        widths = [SCALAR_WIDTH.get(kind, 4) for kind in kinds]
        vtable_size = 4 + 2 * len(kinds)
        table = _VTABLE_AT + vtable_size
        table += (4 - table) % 8  # table ≡ 4 (mod 8): its first field is 8-aligned
        offsets = [0] * len(kinds)
        cursor = 4  # after the table's soffset to its vtable
        for slot in sorted(range(len(kinds)), key=lambda s: -widths[s]):
            cursor += -(table + cursor) % widths[slot]
            offsets[slot] = cursor
            cursor += widths[slot]
        table_size = cursor + -cursor % 4
        self.table = table
        self.offsets = offsets
        self.vectors_at = table + table_size
        fmt = [
            "<I4s",
            "HHHH",
            "iIB3x",
            f"{len(kinds) + 2}H",
            "x" * (table - _VTABLE_AT - vtable_size),
            "i",
        ]
        position = 4
        self.order = sorted(range(len(kinds)), key=lambda s: offsets[s])
        for slot in self.order:
            fmt.append("x" * (offsets[slot] - position) + _FORMAT.get(kinds[slot], "I"))
            position = offsets[slot] + widths[slot]
        fmt.append("x" * (table_size - position))
        self.fixed = struct.Struct("".join(fmt))
        assert self.fixed.size == self.vectors_at
        # Root offset, identifier, Frame vtable and table, body vtable, body soffset.
        self.head = (
            16, FILE_IDENTIFIER, 8, 12, 8, 4, 8, table - 20, BODY_TYPES[cls],
            vtable_size, table_size, *offsets, table - _VTABLE_AT,
        )  # fmt: skip

    def encode(self, message: Message) -> bytes:
        values: list[object] = [0] * len(self.kinds)
        blobs: list[bytes | bytearray | memoryview] = []
        at = self.vectors_at
        for slot, (name, kind) in enumerate(zip(self.names, self.kinds, strict=True)):
            value = getattr(message, name)
            if kind in _MAX_UINT:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise self._type_error(name, "an int", value)
                if not 0 <= value <= _MAX_UINT[kind]:
                    raise ValueError(
                        f"{self.cls.__name__}.{name} = {value} does not fit an unsigned"
                        f" {SCALAR_WIDTH[kind] * 8}-bit field"
                    )
                values[slot] = value
                continue
            values[slot] = at - (self.table + self.offsets[slot])
            if kind == "u32s":
                blob: bytes | bytearray | memoryview = self._uint32s(name, value)
            elif kind == "str":
                if not isinstance(value, str):
                    raise self._type_error(name, "str", value)
                encoded = value.encode("utf-8")
                blob = _PREFIX_LE.pack(len(encoded)) + encoded + b"\x00" * (4 - len(encoded) % 4)
            else:
                if not isinstance(value, bytes | bytearray | memoryview):
                    raise self._type_error(name, "bytes", value)
                size = value.nbytes if isinstance(value, memoryview) else len(value)
                padding = -size % 4
                blobs += (_PREFIX_LE.pack(size), value, b"\x00" * padding)
                at += 4 + size + padding
                continue
            blobs.append(blob)
            at += len(blob)
        if at % 8:
            blobs.append(b"\x00" * (8 - at % 8))
            at += 8 - at % 8
        if at > 0xFFFF_FFFF:
            raise ValueError(f"{self.cls.__name__} of {at} bytes does not fit one frame")
        fixed = self.fixed.pack(*self.head, *(values[slot] for slot in self.order))
        return b"".join((_PREFIX.pack(at), fixed, *blobs))

    def _uint32s(self, name: str, values: object) -> bytes:
        if not isinstance(values, tuple | list):
            raise self._type_error(name, "a tuple of ints", values)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
                raise ValueError(
                    f"{self.cls.__name__}.{name} holds {value!r}, not an unsigned 32-bit int"
                )
        return struct.pack(f"<I{len(values)}I", len(values), *values)

    def _type_error(self, name: str, expected: str, value: object) -> TypeError:
        return TypeError(
            f"{self.cls.__name__}.{name} must be {expected}, not {type(value).__name__}"
        )


_PREFIX_LE = struct.Struct("<I")
_PLANS: dict[type[Message], _Plan] = {cls: _Plan(cls) for cls in LAYOUTS}


def asset_chunk_overhead(name_size: int) -> int:
    """Payload bytes of an ``AssetChunk`` besides its data, for a name of ``name_size``
    UTF-8 bytes (every part is 4-aligned: data of ``n`` bytes adds ``n`` rounded up to 4,
    and the whole payload is rounded up to 8)."""
    return _PLANS[AssetChunk].vectors_at + 4 + (name_size + 4) // 4 * 4 + 4


def encode_frame(message: Message) -> bytes:
    """Encode ``message`` as one frame: the big-endian u32 length, then a ``Frame`` buffer.

    Raises ``TypeError`` or ``ValueError`` (naming the field) when a field does not fit its
    wire type; nothing is written then.
    """
    try:
        plan = _PLANS[type(message)]
    except KeyError:
        raise TypeError(f"not a theta message: {message!r}") from None
    return plan.encode(message)
