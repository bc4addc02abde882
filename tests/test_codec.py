"""Frames: encoding, the validating decoder and FrameDecoder (spec sections 3 and 4)."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from theta._generated import wire
from theta.core import (
    AssetChunk,
    Channel,
    ChannelOpen,
    ErrorCode,
    FrameDecoder,
    FrameLimits,
    FrameTooLarge,
    Heartbeat,
    LocalProtocolError,
    MalformedFrame,
    Message,
    ProtocolError,
    ProtocolViolation,
    ReplicationMessage,
    SessionAcknowledge,
    SessionClose,
    SessionConfirm,
    SessionHello,
    SessionReject,
    decode_payload_untrusted,
    encode_frame,
)
from theta.core._layout import BODY_TYPES

from ._reference_encoder import encode_frame_with_builders
from ._strategies import messages

HELLO = SessionHello(1, 2, b"n" * 24, (1, 2, 0xFFFF_FFFF), b"token", b"k" * 32)
HEARTBEAT = Heartbeat(7, 1_000_000, 6, 999_000, 250, 1200, 30)
ALL_KINDS: list[Message] = [
    HELLO,
    SessionAcknowledge(1, 2, b"s" * 24, 3, 7, (2,), b"p" * 32, b"g" * 64),
    SessionConfirm(b"c" * 64),
    SessionReject(2, "version mismatch", 1, 99),
    ChannelOpen(1),
    HEARTBEAT,
    SessionClose(13, "going away"),
    ReplicationMessage(5, 0, b"delta", 0),
    AssetChunk(1, 0, 3, "tex.png", b"abc"),
]

CHANNEL_OF: dict[type[Message], Channel] = {
    SessionAcknowledge: Channel.CONTROL,
    SessionConfirm: Channel.CONTROL,
    SessionReject: Channel.CONTROL,
    Heartbeat: Channel.CONTROL,
    SessionClose: Channel.CONTROL,
    ReplicationMessage: Channel.REPLICATION,
    AssetChunk: Channel.ASSETS,
}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def read_with_generated_code(payload: bytes) -> Message:
    """Read a payload with flatc's generated accessors (trusting, element by element)."""
    frame = wire.Frame.GetRootAs(payload, 0)
    cls = next(c for c, value in BODY_TYPES.items() if value == frame.BodyType())
    table = frame.Body()
    body: Any = getattr(wire, cls.__name__)()
    body.Init(table.Bytes, table.Pos)
    values: list[object] = []
    for field in dataclasses.fields(cls):
        accessor = getattr(body, _camel(field.name))
        if field.type == "bytes":
            values.append(
                bytes(accessor(j) for j in range(getattr(body, _camel(field.name) + "Length")()))
            )
        elif field.type == "tuple[int, ...]":
            values.append(
                tuple(accessor(j) for j in range(getattr(body, _camel(field.name) + "Length")()))
            )
        elif field.type == "str":
            raw = accessor()
            values.append("" if raw is None else raw.decode("utf-8"))
        else:
            values.append(accessor())
    return cls(*values)  # type: ignore[arg-type]


def decoder_for(message: Message) -> FrameDecoder:
    if isinstance(message, SessionHello | ChannelOpen):
        return FrameDecoder(None)
    return FrameDecoder(CHANNEL_OF[type(message)], 0xFFFF_FFFF)


@pytest.mark.parametrize("message", ALL_KINDS, ids=lambda m: type(m).__name__)
def test_round_trip_each_kind(message: Message) -> None:
    frame = encode_frame(message)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert frame[8:12] == b"THTA"
    assert decoder_for(message).feed(frame) == [message]
    assert read_with_generated_code(frame[4:]) == message


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip_property(message: Message) -> None:
    frame = encode_frame(message)
    assert decode_payload_untrusted(frame[4:]) == message
    assert read_with_generated_code(frame[4:]) == message


def test_maximum_size_vectors_round_trip() -> None:
    chunk = AssetChunk(2**64 - 1, 2**64 - 1, 2**64 - 1, "ж" * 100, bytes(range(256)) * 4096)
    hello = SessionHello(
        2**16 - 1,
        2**64 - 1,
        b"\xff" * 4096,
        tuple(range(2**32 - 64, 2**32)),
        b"t" * 4096,
        b"k" * 32,
    )
    for message in (chunk, hello):
        assert decode_payload_untrusted(encode_frame(message)[4:]) == message


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (Heartbeat(-1, 0), "sequence"),
        (Heartbeat(2**64, 0), "sequence"),
        (Heartbeat(1, 0, rtt_us=2**32), "rtt_us"),
        (SessionClose(70000, ""), "code"),
        (ChannelOpen(256), "channel"),
        (SessionHello(1, 0, b"", (2**32,), b"", b""), "capabilities"),
    ],
)
def test_encoder_rejects_out_of_range_fields(message: Message, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_frame(message)


def test_encoder_rejects_wrong_types() -> None:
    with pytest.raises(TypeError, match="reason"):
        encode_frame(SessionClose(0, b"bytes"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="payload"):
        encode_frame(ReplicationMessage(1, 0, "text"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a theta message"):
        encode_frame("hello")  # type: ignore[arg-type]


# --- the length prefix ---------------------------------------------------------------------


def test_zero_length_rejected_from_prefix_alone() -> None:
    with pytest.raises(MalformedFrame) as info:
        FrameDecoder(Channel.CONTROL).feed(b"\x00\x00\x00\x00")
    assert info.value.code is ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize(
    ("channel", "limit"),
    [(Channel.CONTROL, 16384), (Channel.REPLICATION, 1 << 20), (Channel.ASSETS, (1 << 20) + 4096)],
)
def test_default_limits_enforced_from_prefix_alone(channel: Channel, limit: int) -> None:
    decoder = FrameDecoder(channel)
    assert decoder.max_frame_size == limit
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed((limit + 1).to_bytes(4, "big"))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert decoder.buffered == 0


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    frame = encode_frame(ReplicationMessage(1, 0, b"x" * 1000))
    size = len(frame) - 4
    assert FrameDecoder(Channel.REPLICATION, size).feed(frame) == [
        ReplicationMessage(1, 0, b"x" * 1000)
    ]
    with pytest.raises(FrameTooLarge):
        FrameDecoder(Channel.REPLICATION, size - 1).feed(frame[:4])


def test_unidentified_stream_reads_first_frame_under_control_limit() -> None:
    limits = FrameLimits(control=64, replication=4096, assets=8192)
    decoder = FrameDecoder(None, limits=limits)
    assert decoder.max_frame_size == 64
    opening = encode_frame(ChannelOpen(2))
    big = encode_frame(AssetChunk(1, 0, 2000, "n", b"d" * 2000))
    assert decoder.feed(opening + big) == [ChannelOpen(2), AssetChunk(1, 0, 2000, "n", b"d" * 2000)]
    assert decoder.channel is Channel.ASSETS
    assert decoder.max_frame_size == 8192
    with pytest.raises(FrameTooLarge):
        FrameDecoder(None, limits=limits).feed(big)


@pytest.mark.parametrize("rest", [b"\xff\xff\xff", b"\x00\x00\x00"])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_a_bad_length_split_across_feeds_is_rejected_before_the_body(
    rest: bytes, split: int
) -> None:
    """Spec 3: the receiver must not take in the body of a frame whose prefix is bad, also
    when the prefix came in two pieces and the second brings body bytes with it."""
    prefix = (b"\x7f" if rest[0] else b"\x00") + rest
    decoder = FrameDecoder(Channel.REPLICATION)
    assert decoder.feed(prefix[:split]) == []
    chunk = prefix[split:] + bytes(8 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge if rest[0] else MalformedFrame):
            decoder.feed(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_an_identifying_frame_split_across_feeds_sets_the_limit_for_the_rest() -> None:
    limits = FrameLimits(control=64, replication=4096, assets=8192)
    opening = encode_frame(ChannelOpen(2))
    big = encode_frame(AssetChunk(1, 0, 2000, "n", b"d" * 2000))
    stream = opening + big
    for cut in range(1, len(opening) + 8):
        decoder = FrameDecoder(None, limits=limits)
        received = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert received == [ChannelOpen(2), AssetChunk(1, 0, 2000, "n", b"d" * 2000)]
        assert decoder.buffered == 0


def test_limit_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="limits"):
        FrameDecoder(None, 100)
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameDecoder(Channel.CONTROL, 0)
    with pytest.raises(ValueError, match="control"):
        FrameLimits(control=0)
    with pytest.raises(TypeError, match=r"FrameLimits\.assets must be an int, not True"):
        FrameLimits(assets=True)
    with pytest.raises(TypeError, match=r"FrameLimits\.control must be an int, not 'x'"):
        FrameLimits(control="x")  # type: ignore[arg-type]


# --- stream ends ---------------------------------------------------------------------------


def test_fin_on_a_frame_boundary_is_clean() -> None:
    decoder = FrameDecoder(Channel.CONTROL)
    assert decoder.feed(encode_frame(HEARTBEAT)) == [HEARTBEAT]
    decoder.end_of_stream()
    with pytest.raises(LocalProtocolError):
        decoder.feed(b"")


@pytest.mark.parametrize("cut", [1, 3, 4, 10])
def test_fin_inside_a_frame_is_malformed(cut: int) -> None:
    decoder = FrameDecoder(Channel.CONTROL)
    assert decoder.feed(encode_frame(HEARTBEAT)[:cut]) == []
    with pytest.raises(MalformedFrame, match="ended inside a frame"):
        decoder.end_of_stream()


def test_decoder_stays_failed() -> None:
    decoder = FrameDecoder(Channel.CONTROL)
    with pytest.raises(MalformedFrame):
        decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(MalformedFrame):
        decoder.feed(encode_frame(HEARTBEAT))
    with pytest.raises(MalformedFrame):
        decoder.end_of_stream()


# --- channels ------------------------------------------------------------------------------


@pytest.mark.parametrize("message", ALL_KINDS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("channel", list(Channel), ids=lambda c: c.name)
def test_message_types_allowed_per_channel(message: Message, channel: Channel) -> None:
    decoder = FrameDecoder(channel)
    if CHANNEL_OF.get(type(message)) is channel:
        assert decoder.feed(encode_frame(message)) == [message]
    else:
        with pytest.raises(ProtocolViolation) as info:
            decoder.feed(encode_frame(message))
        assert info.value.code is ErrorCode.PROTOCOL_VIOLATION


def test_identification_by_first_frame() -> None:
    control = FrameDecoder(None)
    assert control.feed(encode_frame(HELLO) + encode_frame(SessionConfirm(b"s" * 64))) == [
        HELLO,
        SessionConfirm(b"s" * 64),
    ]
    assert control.channel is Channel.CONTROL
    replication = FrameDecoder(None)
    assert replication.feed(encode_frame(ChannelOpen(1))) == [ChannelOpen(1)]
    assert replication.channel is Channel.REPLICATION


@pytest.mark.parametrize(
    "frames",
    [
        [HEARTBEAT],  # not an identifying frame
        [ReplicationMessage(1)],
        [ChannelOpen(0)],  # channel other than 1 or 2
        [ChannelOpen(3)],
        [HELLO, HELLO],  # a second SessionHello
        [ChannelOpen(1), ChannelOpen(1)],  # a second ChannelOpen
        [ChannelOpen(1), AssetChunk(1, 0, 0, "n", b"")],  # wrong type for the channel
    ],
)
def test_identification_violations(frames: list[Message]) -> None:
    decoder = FrameDecoder(None)
    with pytest.raises(ProtocolViolation):
        decoder.feed(b"".join(encode_frame(m) for m in frames))


# --- malformed buffers ---------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def _heartbeat_payload() -> bytearray:
    return bytearray(encode_frame(HEARTBEAT)[4:])


def test_wrong_file_identifier() -> None:
    payload = _heartbeat_payload()
    payload[4:8] = b"THTB"
    with pytest.raises(MalformedFrame, match="identifier"):
        FrameDecoder(Channel.CONTROL).feed(_frame(bytes(payload)))


def _build_frame(body_type: int | None, with_body: bool) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(64)
    body = 0
    if with_body:
        wire.SessionConfirmStart(builder)
        body = wire.SessionConfirmEnd(builder)
    wire.FrameStart(builder)
    if body_type is not None:
        wire.FrameAddBodyType(builder, body_type)
    if with_body:
        wire.FrameAddBody(builder, body)
    builder.Finish(wire.FrameEnd(builder), file_identifier=b"THTA")
    return bytes(builder.Output())


@pytest.mark.parametrize(
    ("body_type", "with_body", "match"),
    [
        (None, False, "no body"),
        (0, True, "no body"),
        (10, True, "unknown body type 10"),
        (255, True, "unknown body type"),
        (3, False, "no body"),
    ],
)
def test_bad_unions(body_type: int | None, with_body: bool, match: str) -> None:
    with pytest.raises(MalformedFrame, match=match):
        decode_payload_untrusted(_build_frame(body_type, with_body))


def test_short_payloads() -> None:
    for size in range(8):
        with pytest.raises(MalformedFrame):
            decode_payload_untrusted(b"\x00" * size)


def test_vector_running_past_the_buffer() -> None:
    message = ReplicationMessage(1, 0, b"p" * 40)
    payload = bytearray(encode_frame(message)[4:])
    at = payload.index(b"p" * 40) - 4
    payload[at : at + 4] = (41).to_bytes(4, "little")
    with pytest.raises(MalformedFrame, match="runs past"):
        decode_payload_untrusted(bytes(payload[: at + 4 + 40]))


def test_string_without_terminator_and_bad_utf8() -> None:
    payload = bytearray(encode_frame(SessionClose(1, "abcd"))[4:])
    at = payload.index(b"abcd")
    broken = bytearray(payload)
    broken[at + 4] = 0x41
    with pytest.raises(MalformedFrame, match="zero-terminated"):
        decode_payload_untrusted(bytes(broken))
    broken = bytearray(payload)
    broken[at] = 0xFF
    with pytest.raises(MalformedFrame, match="UTF-8"):
        decode_payload_untrusted(bytes(broken))


def test_root_offset_out_of_bounds_and_misaligned() -> None:
    payload = _heartbeat_payload()
    for root in (len(payload), len(payload) - 2, 2**32 - 1, 1):
        payload[0:4] = root.to_bytes(4, "little")
        with pytest.raises(MalformedFrame):
            decode_payload_untrusted(bytes(payload))


# --- hostile input: only ProtocolError, whole or one byte at a time -----------------------


def _feed_all(decoder: FrameDecoder, data: bytes, step: int) -> list[Message]:
    out: list[Message] = []
    for start in range(0, len(data), step):
        out.extend(decoder.feed(data[start : start + step]))
    decoder.end_of_stream()
    return out


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([None, *Channel]))
@example(b"\x00\x00\x00\x08" + b"\x00" * 8, Channel.CONTROL)
def test_random_bytes_raise_only_protocol_errors(data: bytes, channel: Channel | None) -> None:
    for step in (len(data) or 1, 1):
        with contextlib.suppress(ProtocolError):
            _feed_all(FrameDecoder(channel), data, step)


@settings(max_examples=400, deadline=None)
@given(
    messages,
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_mutated_frames_raise_only_protocol_errors(
    message: Message, flips: list[tuple[int, int]]
) -> None:
    frame = bytearray(encode_frame(message))
    for where, value in flips:
        frame[4 + where % (len(frame) - 4)] = value
    for channel in (None, *Channel):
        for step in (len(frame), 1):
            with contextlib.suppress(ProtocolError):
                _feed_all(
                    FrameDecoder(channel, limits=FrameLimits(*(2**32 - 1,) * 3)), bytes(frame), step
                )


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.sampled_from([m for m in ALL_KINDS if type(m) in CHANNEL_OF]).filter(
            lambda m: CHANNEL_OF[type(m)] is Channel.CONTROL
        ),
        min_size=1,
        max_size=5,
    )
)
def test_every_split_point_yields_identical_messages(batch: list[Message]) -> None:
    stream = b"".join(encode_frame(m) for m in batch)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder(Channel.CONTROL)
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == batch
        decoder.end_of_stream()
    assert _feed_all(FrameDecoder(Channel.CONTROL), stream, 1) == batch


def test_large_chunk_split_in_transport_sized_pieces() -> None:
    chunk = AssetChunk(9, 0, 1 << 20, "big.bin", bytes(range(256)) * 4096)
    frame = encode_frame(chunk)
    decoder = FrameDecoder(Channel.ASSETS)
    received: list[Message] = []
    for start in range(0, len(frame), 1200):
        received += decoder.feed(frame[start : start + 1200])
        assert decoder.buffered <= len(frame)
    assert received == [chunk]
    assert decoder.buffered == 0


@settings(max_examples=300, deadline=None)
@given(messages)
def test_decoder_reads_what_the_generated_builders_write(message: Message) -> None:
    frame = encode_frame_with_builders(message)
    assert decode_payload_untrusted(frame[4:]) == message


@pytest.mark.parametrize("message", ALL_KINDS, ids=lambda m: type(m).__name__)
def test_encoded_payload_is_aligned_like_a_builders(message: Message) -> None:
    frame = encode_frame(message)
    assert (len(frame) - 4) % 8 == 0
    assert len(frame) <= len(encode_frame_with_builders(message)) + 16


def test_memoryview_and_bytearray_payloads_encode_like_bytes() -> None:
    data = bytes(range(256)) * 3
    expected = encode_frame(ReplicationMessage(1, 0, data))
    assert encode_frame(ReplicationMessage(1, 0, bytearray(data))) == expected  # type: ignore[arg-type]
    assert encode_frame(ReplicationMessage(1, 0, memoryview(data))) == expected  # type: ignore[arg-type]
