"""zstd compression of replication payloads (spec section 4.5)."""

from __future__ import annotations

import contextlib
import itertools
import random
import tracemalloc

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from theta.core import (
    Channel,
    ErrorCode,
    FrameDecoder,
    ProtocolError,
    ReplicationMessage,
    encode_frame,
)
from theta.core._replication import (
    FLAG_ZSTD,
    ReplicationReceiver,
    ReplicationSender,
    ReplicationStats,
    _ends_on_frame_boundary,
    compress_replication,
)

MIB = 1024 * 1024
COMPRESSIBLE = b"position x=1.0 y=2.0 z=3.0; " * 200
INCOMPRESSIBLE = random.Random(1).randbytes(4000)


def zstd(data: bytes, *, content_size: bool = True) -> bytes:
    if content_size:
        return zstandard.ZstdCompressor().compress(data)
    compressor = zstandard.ZstdCompressor().compressobj()
    return compressor.compress(data) + compressor.flush()


def wire(message: ReplicationMessage) -> ReplicationMessage:
    """``message`` after encoding and decoding."""
    (decoded,) = FrameDecoder(Channel.REPLICATION).feed(encode_frame(message))
    assert isinstance(decoded, ReplicationMessage)
    return decoded


def rejected(receiver: ReplicationReceiver, message: ReplicationMessage) -> ErrorCode:
    before = receiver.stats
    with pytest.raises(ProtocolError) as caught:
        receiver.receive(message)
    assert receiver.stats == before  # a rejected message is not counted
    return caught.value.code


# --- sending -----------------------------------------------------------------------------


def test_compress_when_it_helps() -> None:
    message = compress_replication(42, COMPRESSIBLE)
    assert message.tick == 42
    assert message.flags == FLAG_ZSTD
    assert message.uncompressed_size == len(COMPRESSIBLE)
    assert len(message.payload) < len(COMPRESSIBLE) // 10
    assert zstandard.frame_content_size(message.payload) == len(COMPRESSIBLE)


@pytest.mark.parametrize("payload", [INCOMPRESSIBLE, b"", b"aaaa" * 15])
def test_no_compression_when_it_does_not_help(payload: bytes) -> None:
    # Incompressible, empty, or below min_size (64) although compressible.
    assert compress_replication(1, payload) == ReplicationMessage(1, 0, payload, 0)


def test_min_size_and_level() -> None:
    small = b"aaaa" * 15
    assert compress_replication(1, small, min_size=0).flags == FLAG_ZSTD
    assert compress_replication(1, COMPRESSIBLE, level=19).flags == FLAG_ZSTD


def test_sender_checks_the_level_up_front() -> None:
    with pytest.raises(ValueError, match="at most 22"):
        ReplicationSender(zstd_negotiated=True, level=23)
    sender = ReplicationSender(zstd_negotiated=True, level=19)
    assert sender.message(1, COMPRESSIBLE) == compress_replication(1, COMPRESSIBLE, level=19)


def test_sender_without_zstd_never_compresses() -> None:
    sender = ReplicationSender(zstd_negotiated=False)
    assert sender.message(3, COMPRESSIBLE) == ReplicationMessage(3, 0, COMPRESSIBLE, 0)
    assert sender.stats == ReplicationStats(1, 0, len(COMPRESSIBLE), len(COMPRESSIBLE))
    assert sender.stats.ratio == 1.0


def test_sender_stats_and_limit() -> None:
    sender = ReplicationSender(zstd_negotiated=True, max_payload=6000)
    assert ReplicationSender(zstd_negotiated=True).stats.ratio == 1.0
    compressed = sender.message(1, COMPRESSIBLE)
    plain = sender.message(2, INCOMPRESSIBLE)
    assert compressed.flags == FLAG_ZSTD
    assert plain.flags == 0
    stats = sender.stats
    assert stats.messages == 2
    assert stats.compressed_messages == 1
    assert stats.bytes_on_wire == len(compressed.payload) + len(INCOMPRESSIBLE)
    assert stats.bytes_uncompressed == len(COMPRESSIBLE) + len(INCOMPRESSIBLE)
    assert stats.ratio > 1.0
    with pytest.raises(ValueError, match="6000-byte limit"):
        sender.message(3, bytes(6001))
    assert sender.stats == stats


# --- receiving ---------------------------------------------------------------------------


def test_compressed_round_trip_over_the_wire() -> None:
    sender = ReplicationSender(zstd_negotiated=True)
    receiver = ReplicationReceiver(zstd_negotiated=True)
    for tick, payload in enumerate([COMPRESSIBLE, INCOMPRESSIBLE, b"", b"x"]):
        assert receiver.receive(wire(sender.message(tick, payload))) == payload
    assert receiver.stats == sender.stats
    assert receiver.stats.compressed_messages == 1


def test_uncompressed_ignores_size_and_reserved_flags() -> None:
    receiver = ReplicationReceiver(zstd_negotiated=False)
    message = ReplicationMessage(1, 0xFFFF_FFFE, b"raw", uncompressed_size=12345)
    assert receiver.receive(message) == b"raw"
    assert receiver.stats == ReplicationStats(1, 0, 3, 3)


def test_reserved_flags_ignored_on_compressed_payloads() -> None:
    receiver = ReplicationReceiver(zstd_negotiated=True)
    message = ReplicationMessage(1, 0xFFFF_FFFF, zstd(COMPRESSIBLE), len(COMPRESSIBLE))
    assert receiver.receive(message) == COMPRESSIBLE


def test_compressed_without_capability_is_a_protocol_violation() -> None:
    receiver = ReplicationReceiver(zstd_negotiated=False)
    message = ReplicationMessage(1, FLAG_ZSTD, zstd(COMPRESSIBLE), len(COMPRESSIBLE))
    assert rejected(receiver, message) == ErrorCode.PROTOCOL_VIOLATION


@pytest.mark.parametrize("content_size", [True, False])
@pytest.mark.parametrize("delta", [-1, 1, -len(COMPRESSIBLE)])
def test_size_mismatch_is_malformed(content_size: bool, delta: int) -> None:
    receiver = ReplicationReceiver(zstd_negotiated=True)
    compressed = zstd(COMPRESSIBLE, content_size=content_size)
    message = ReplicationMessage(1, FLAG_ZSTD, compressed, len(COMPRESSIBLE) + delta)
    assert rejected(receiver, message) == ErrorCode.MALFORMED_FRAME
    good = ReplicationMessage(1, FLAG_ZSTD, compressed, len(COMPRESSIBLE))
    assert receiver.receive(good) == COMPRESSIBLE  # and the receiver still works


def test_above_the_replication_limit_is_malformed() -> None:
    receiver = ReplicationReceiver(zstd_negotiated=True, max_payload=1000)
    data = bytes(1001)
    for compressed in (zstd(data), zstd(data, content_size=False)):
        message = ReplicationMessage(1, FLAG_ZSTD, compressed, 1001)
        assert rejected(receiver, message) == ErrorCode.MALFORMED_FRAME
    # Exactly the limit is fine.
    assert receiver.receive(ReplicationMessage(1, FLAG_ZSTD, zstd(bytes(1000)), 1000)) == bytes(
        1000
    )


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not zstd at all",
        b"\x28\xb5\x2f\xfd",  # magic number only
        zstd(COMPRESSIBLE)[:-4],  # truncated
        zstd(COMPRESSIBLE) + b"junk",  # trailing garbage
        zstd(COMPRESSIBLE) + zstd(b"more"),  # a second frame with content: too long
    ],
)
def test_bad_zstd_data_is_malformed(payload: bytes) -> None:
    receiver = ReplicationReceiver(zstd_negotiated=True)
    message = ReplicationMessage(1, FLAG_ZSTD, payload, len(COMPRESSIBLE))
    assert rejected(receiver, message) == ErrorCode.MALFORMED_FRAME


def test_a_truncated_frame_after_a_whole_one_is_malformed() -> None:
    # The zstd library's stream reader stops quietly at the end of the input after a
    # whole frame, even inside the next one.
    receiver = ReplicationReceiver(zstd_negotiated=True)
    skippable = b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"pad"
    for tail in (zstd(b"more")[:10], skippable[:-1], zstd(b"")[:-1]):
        message = ReplicationMessage(1, FLAG_ZSTD, zstd(COMPRESSIBLE) + tail, len(COMPRESSIBLE))
        assert rejected(receiver, message) == ErrorCode.MALFORMED_FRAME
    # Every block there, and the declared size right: only the checksum is missing.
    checked = zstandard.ZstdCompressor(write_checksum=True).compress(b"more")
    payload = zstd(COMPRESSIBLE) + checked[:-4]
    message = ReplicationMessage(1, FLAG_ZSTD, payload, len(COMPRESSIBLE) + 4)
    with pytest.raises(ProtocolError, match="ends inside a zstd frame"):
        receiver.receive(message)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.binary(max_size=3000) | st.builds(bytes, st.integers(0, 300_000)),
            st.booleans(),
            st.booleans(),
            st.sampled_from([-5, 1, 19]),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_frame_walk_accepts_whole_frames_and_no_prefix(
    frames: list[tuple[bytes, bool, bool, int]],
) -> None:
    compressed = [
        zstandard.ZstdCompressor(
            level=level, write_checksum=checksum, write_content_size=content_size
        ).compress(data)
        for data, checksum, content_size, level in frames
    ]
    payload = b"".join(compressed)
    decompressor = zstandard.ZstdDecompressor()
    assert _ends_on_frame_boundary(decompressor, payload)
    ends = set(itertools.accumulate(len(frame) for frame in compressed))
    for cut in range(1, len(payload)):
        if cut not in ends:  # not a frame boundary: every cut is caught
            with contextlib.suppress(zstandard.ZstdError):  # cut inside a header
                assert not _ends_on_frame_boundary(decompressor, payload[:cut])


class _CountingDecompressor:
    """Counts the bytes the frame walk hands to zstd."""

    def __init__(self) -> None:
        self.inner = zstandard.ZstdDecompressor()
        self.fed = 0

    def decompressobj(self) -> _CountingDecompressor._Frame:
        return self._Frame(self, self.inner.decompressobj())

    class _Frame:
        def __init__(self, owner: _CountingDecompressor, frame: zstandard.ZstdDecompressionObj):
            self.owner, self.frame = owner, frame

        def decompress(self, data: memoryview) -> bytes:
            self.owner.fed += len(data)
            return self.frame.decompress(data)

        @property
        def eof(self) -> bool:
            return self.frame.eof

        @property
        def unused_data(self) -> bytes:
            return self.frame.unused_data


def test_frame_walk_work_is_linear_in_the_number_of_frames() -> None:
    """Many tiny frames (here 20,000 empty skippable ones) must not each be handed the
    whole rest of the payload: that was quadratic, seconds for one 1 MiB frame."""
    payload = b"\x50\x2a\x4d\x18" + bytes(4)
    payload *= 20_000
    counting = _CountingDecompressor()
    assert _ends_on_frame_boundary(counting, payload)  # type: ignore[arg-type]
    assert counting.fed <= 10 * len(payload)


def test_concatenated_and_skippable_frames_are_accepted() -> None:
    receiver = ReplicationReceiver(zstd_negotiated=True)
    skippable = b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"pad"
    payload = skippable + zstd(b"first half ") + zstd(b"second half", content_size=False)
    message = ReplicationMessage(1, FLAG_ZSTD, payload, 22)
    assert receiver.receive(message) == b"first half second half"


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """256 MiB of zeros in a few KiB, without a content size in the frame header."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    block = bytes(MIB)
    return b"".join(compressor.compress(block) for _ in range(256)) + compressor.flush()


@pytest.mark.parametrize("declared", [MIB, 1000, 0])
def test_zip_bomb_is_bounded(bomb: bytes, declared: int) -> None:
    assert len(bomb) < 64 * 1024
    receiver = ReplicationReceiver(zstd_negotiated=True)
    tracemalloc.start()
    try:
        code = rejected(receiver, ReplicationMessage(1, FLAG_ZSTD, bomb, declared))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == ErrorCode.MALFORMED_FRAME
    assert peak < 3 * MIB  # at most the declared size (<= 1 MiB) and one byte more


def test_declared_content_size_is_checked_before_decompressing() -> None:
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=256 * MIB)
    block = bytes(MIB)
    bomb = b"".join(compressor.compress(block) for _ in range(256)) + compressor.flush()
    assert zstandard.frame_content_size(bomb) == 256 * MIB
    receiver = ReplicationReceiver(zstd_negotiated=True)
    with pytest.raises(ProtocolError, match="declares 268435456 bytes"):
        receiver.receive(ReplicationMessage(1, FLAG_ZSTD, bomb, MIB))


def test_window_above_the_cap_is_malformed() -> None:
    # Without a content size, a 128 MiB window would make the decoder allocate 128 MiB.
    params = zstandard.ZstdCompressionParameters(window_log=27)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    payload = compressor.compress(COMPRESSIBLE) + compressor.flush()
    assert zstandard.get_frame_parameters(payload).window_size == 128 * MIB
    receiver = ReplicationReceiver(zstd_negotiated=True)
    message = ReplicationMessage(1, FLAG_ZSTD, payload, len(COMPRESSIBLE))
    assert rejected(receiver, message) == ErrorCode.MALFORMED_FRAME


def test_bad_receiver_limit() -> None:
    with pytest.raises(ValueError, match="max_payload"):
        ReplicationReceiver(zstd_negotiated=True, max_payload=-1)


@settings(max_examples=100, deadline=None)
@given(
    payloads=st.lists(
        st.one_of(
            st.binary(max_size=3000),
            st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=20), st.integers(0, 300)),
        ),
        max_size=5,
    ),
    negotiated=st.booleans(),
)
def test_round_trip(payloads: list[bytes], negotiated: bool) -> None:
    sender = ReplicationSender(zstd_negotiated=negotiated)
    receiver = ReplicationReceiver(zstd_negotiated=negotiated)
    for tick, payload in enumerate(payloads):
        message = sender.message(tick, payload)
        assert len(message.payload) <= len(payload)
        assert (message.uncompressed_size == 0) == (message.flags == 0)
        assert receiver.receive(wire(message)) == payload
    assert receiver.stats == sender.stats
