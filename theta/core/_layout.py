"""The wire tables' layout as data: union values and field kinds in field-id order.

``fbs/theta.fbs`` is the schema; flatc's generated code (``theta._generated``) is its
reference implementation. The hand-written encoder and validating decoder both work from
this table, and the tests check them against the generated code.
"""

from __future__ import annotations

from ._messages import (
    AssetChunk,
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

__all__ = ["BODY_TYPES", "FILE_IDENTIFIER", "LAYOUTS", "SCALAR_WIDTH"]

FILE_IDENTIFIER = b"THTA"

#: Union value of each message type in ``Frame.body`` (spec section 4).
BODY_TYPES: dict[type[Message], int] = {
    SessionHello: 1,
    SessionAcknowledge: 2,
    SessionConfirm: 3,
    SessionReject: 4,
    ChannelOpen: 5,
    Heartbeat: 6,
    SessionClose: 7,
    ReplicationMessage: 8,
    AssetChunk: 9,
}

#: Field kinds in field-id order: unsigned scalars, ``bytes`` ([ubyte]), ``u32s``
#: ([uint32]) and ``str`` (string).
LAYOUTS: dict[type[Message], tuple[str, ...]] = {
    SessionHello: ("u16", "u64", "bytes", "u32s", "bytes", "bytes"),
    SessionAcknowledge: ("u16", "u64", "bytes", "u64", "u32", "u32s", "bytes", "bytes"),
    SessionConfirm: ("bytes",),
    SessionReject: ("u16", "str", "u16", "u64"),
    ChannelOpen: ("u8",),
    Heartbeat: ("u64", "u64", "u64", "u64", "u64", "u32", "u32"),
    SessionClose: ("u16", "str"),
    ReplicationMessage: ("u64", "u32", "bytes", "u32"),
    AssetChunk: ("u64", "u64", "u64", "str", "bytes"),
}

#: Bytes of a scalar kind (vectors and strings are 4-byte offsets in their table).
SCALAR_WIDTH = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}
