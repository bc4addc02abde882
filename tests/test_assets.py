"""Asset chunking and reassembly (spec section 4.5)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from theta.core import (
    AssetChunk,
    Channel,
    ErrorCode,
    FrameDecoder,
    FrameLimits,
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    encode_frame,
)
from theta.core._assets import (
    Asset,
    AssetAssembler,
    AssetCollector,
    AssetProgress,
    AssetSender,
    chunk_asset,
    max_chunk_data_for,
)
from theta.core._encode import asset_chunk_overhead

MALFORMED, TOO_LARGE = ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE
U64 = 2**64 - 1


def payload_size(chunk: AssetChunk) -> int:
    return len(encode_frame(chunk)) - 4


# --- frame sizing ------------------------------------------------------------------------


NAMES = ["a", "ab", "abc", "abcd", "x" * 37, "ж" * 10, "𝄞" * 3, "n" * 120]


@pytest.mark.parametrize("name_len", range(41))
def test_chunk_overhead_is_exact(name_len: int) -> None:
    """The layout model behind max_chunk_data_for, against the real encoder."""
    name = "n" * name_len
    for data_len in range(17):
        expected = -(-(asset_chunk_overhead(name_len) + data_len) // 8) * 8
        for ids in ((1, 1, 1), (U64, U64, U64), (0, 0, 0), (1, 0, U64)):
            assert payload_size(AssetChunk(*ids, name, b"x" * data_len)) == expected


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("limit", [256, 1000, 1024, 4099, 65536])
def test_max_chunk_data_for_is_the_largest_that_fits(limit: int, name: str) -> None:
    room = max_chunk_data_for(limit, name)
    data = bytes(random.Random(limit).randbytes(3 * room + room // 2))
    chunks = list(chunk_asset(U64, name, data, max_chunk_data=room))
    sizes = [payload_size(c) for c in chunks]
    assert all(size <= limit for size in sizes)
    # The bound is tight: the named first chunk fills the limit (rounded down to 8).
    usable = limit - limit % 8
    assert sizes[0] == usable
    assert payload_size(AssetChunk(U64, U64, U64, name, bytes(room + 1))) > limit
    assert all(size <= sizes[0] for size in sizes)


def test_max_chunk_data_for_default_assets_limit() -> None:
    limit = FrameLimits().assets
    room = max_chunk_data_for(limit, "texture.png")
    assert room == limit - 92 - 8
    full = AssetChunk(U64, U64, U64, "texture.png", bytes(room))
    assert payload_size(full) == limit
    FrameDecoder(Channel.ASSETS).feed(encode_frame(full))  # accepted at exactly the limit


def test_max_chunk_data_for_name_too_long() -> None:
    with pytest.raises(ValueError, match="no room"):
        max_chunk_data_for(256, "n" * 164)
    assert max_chunk_data_for(256, "n" * 163) == 4


# --- sender ------------------------------------------------------------------------------


def test_chunk_asset_splits_and_names_first_only() -> None:
    chunks = list(chunk_asset(7, "a.bin", b"0123456789", max_chunk_data=4))
    assert chunks == [
        AssetChunk(7, 0, 10, "a.bin", b"0123"),
        AssetChunk(7, 4, 10, "", b"4567"),
        AssetChunk(7, 8, 10, "", b"89"),
    ]


def test_chunk_asset_empty_asset_is_one_empty_chunk() -> None:
    assert list(chunk_asset(1, "e", b"", max_chunk_data=10)) == [AssetChunk(1, 0, 0, "e", b"")]


@pytest.mark.parametrize(
    ("asset_id", "name", "limit"), [(0, "", 4), (-1, "n", 4), (U64 + 1, "n", 4), (0, "n", 0)]
)
def test_chunk_asset_rejects_bad_arguments(asset_id: int, name: str, limit: int) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - several messages
        chunk_asset(asset_id, name, b"data", max_chunk_data=limit)
    with pytest.raises(ValueError):  # noqa: PT011
        AssetSender(asset_id, name, 4, limit)


def test_asset_sender_feeds_pieces_and_finishes() -> None:
    sender = AssetSender(3, "s", 10, 4)
    assert sender.feed(b"01") == []
    assert sender.feed(b"2345") == [AssetChunk(3, 0, 10, "s", b"0123")]
    assert sender.feed(b"") == []
    assert sender.feed(b"6789") == [
        AssetChunk(3, 4, 10, "", b"4567"),
        AssetChunk(3, 8, 10, "", b"89"),
    ]
    assert sender.complete
    assert sender.finish() == []
    with pytest.raises(LocalProtocolError):
        sender.feed(b"")


def test_asset_sender_checks_the_total() -> None:
    sender = AssetSender(3, "s", 5, 4)
    sender.feed(b"abc")
    with pytest.raises(ValueError, match="exceed"):
        sender.feed(b"abc")
    assert sender.bytes_fed == 3  # unchanged by the rejected feed
    with pytest.raises(ValueError, match="3 bytes fed"):
        sender.finish()
    assert sender.feed(memoryview(b"de")) == [
        AssetChunk(3, 0, 5, "s", b"abcd"),
        AssetChunk(3, 4, 5, "", b"e"),
    ]
    assert sender.finish() == []


def test_asset_sender_empty_asset() -> None:
    assert AssetSender(1, "e", 0, 8).finish() == [AssetChunk(1, 0, 0, "e", b"")]
    sender = AssetSender(1, "e", 0, 8)
    assert sender.feed(b"") == [AssetChunk(1, 0, 0, "e", b"")]
    assert sender.finish() == []


# --- receiver rules ----------------------------------------------------------------------


def test_single_chunk_and_multi_chunk_progress() -> None:
    assembler = AssetAssembler()
    assert assembler.receive(AssetChunk(1, 0, 3, "one", b"abc")) == AssetProgress(
        1, "one", 0, 3, b"abc", first=True, complete=True
    )
    assert assembler.receive(AssetChunk(2, 0, 4, "two", b"ab")) == AssetProgress(
        2, "two", 0, 4, b"ab", first=True, complete=False
    )
    assert (assembler.unfinished, assembler.unfinished_bytes) == (1, 4 + len("two"))
    assert assembler.receive(AssetChunk(2, 2, 4, "", b"cd")) == AssetProgress(
        2, "two", 2, 4, b"cd", first=False, complete=True
    )
    assert (assembler.unfinished, assembler.unfinished_bytes) == (0, 0)
    assembler.end_of_stream()


STARTED = [AssetChunk(5, 0, 10, "five", b"01234")]  # asset 5 expects offset 5 next

BAD_CHUNKS = [
    pytest.param([], AssetChunk(1, 3, 10, "n", b"x"), MALFORMED, id="first-offset-not-0"),
    pytest.param([], AssetChunk(1, 0, 10, "", b"x"), MALFORMED, id="first-without-name"),
    pytest.param([], AssetChunk(1, 0, 2, "n", b"xyz"), MALFORMED, id="first-past-total"),
    pytest.param([], AssetChunk(1, 0, 0, "n", b"x"), MALFORMED, id="empty-asset-with-data"),
    pytest.param(STARTED, AssetChunk(5, 4, 10, "", b"x"), MALFORMED, id="offset-back"),
    pytest.param(STARTED, AssetChunk(5, 6, 10, "", b"x"), MALFORMED, id="offset-gap"),
    pytest.param(STARTED, AssetChunk(5, 0, 10, "five", b"x"), MALFORMED, id="restart-unfinished"),
    pytest.param(STARTED, AssetChunk(5, 5, 11, "", b"x"), MALFORMED, id="total-changed"),
    pytest.param(STARTED, AssetChunk(5, 5, 10, "", b"x" * 6), MALFORMED, id="past-total"),
    pytest.param([], AssetChunk(1, 0, 2**26 + 1, "n", b""), TOO_LARGE, id="above-max-size"),
    pytest.param([], AssetChunk(1, 0, U64, "n", b"x"), TOO_LARGE, id="u64-total"),
]


@pytest.mark.parametrize(("before", "chunk", "code"), BAD_CHUNKS)
def test_rejected_chunks(before: list[AssetChunk], chunk: AssetChunk, code: ErrorCode) -> None:
    assembler = AssetAssembler()
    for good in before:
        assembler.receive(good)
    state = (assembler.unfinished, assembler.unfinished_bytes)
    with pytest.raises(ProtocolError) as caught:
        assembler.receive(chunk)
    assert caught.value.code == code
    # Nothing changed: the stream goes on as if the chunk never came.
    assert (assembler.unfinished, assembler.unfinished_bytes) == state
    if before:
        assert assembler.receive(AssetChunk(5, 5, 10, "", b"56789")).complete
    assembler.end_of_stream()


def test_max_asset_size_is_inclusive() -> None:
    assembler = AssetAssembler(max_asset_size=4)
    assert assembler.receive(AssetChunk(1, 0, 4, "n", b"abcd")).complete
    with pytest.raises(ProtocolError) as caught:
        assembler.receive(AssetChunk(2, 0, 5, "n", b""))
    assert caught.value.code == TOO_LARGE


def test_empty_asset() -> None:
    progress = AssetAssembler().receive(AssetChunk(9, 0, 0, "empty", b""))
    assert progress.complete
    assert progress.first
    collector = AssetCollector()
    assert collector.receive(AssetChunk(9, 0, 0, "empty", b"")) == Asset(9, "empty", b"")


def test_interleaved_assets_and_id_reuse() -> None:
    collector = AssetCollector()
    chunks = [
        AssetChunk(1, 0, 6, "one", b"ab"),
        AssetChunk(2, 0, 4, "two", b"AB"),
        AssetChunk(1, 2, 6, "", b"cd"),
        AssetChunk(2, 2, 4, "", b"CD"),
        AssetChunk(2, 0, 3, "two again", b"xyz"),  # id 2 reused once complete
        AssetChunk(1, 4, 6, "", b"ef"),
    ]
    results = [collector.receive(chunk) for chunk in chunks]
    assert results == [
        None,
        None,
        None,
        Asset(2, "two", b"ABCD"),
        Asset(2, "two again", b"xyz"),
        Asset(1, "one", b"abcdef"),
    ]
    assert collector.buffered == 0
    collector.end_of_stream()


def test_later_chunk_name_is_ignored() -> None:
    assembler = AssetAssembler()
    assembler.receive(AssetChunk(1, 0, 2, "real", b"a"))
    assert assembler.receive(AssetChunk(1, 1, 2, "other", b"b")).name == "real"


def test_zero_length_chunks_inside_an_asset_are_accepted() -> None:
    collector = AssetCollector()
    assert collector.receive(AssetChunk(1, 0, 2, "n", b"")) is None
    assert collector.receive(AssetChunk(1, 0, 2, "", b"a")) is None
    assert collector.receive(AssetChunk(1, 1, 2, "", b"")) is None
    assert collector.receive(AssetChunk(1, 1, 2, "", b"b")) == Asset(1, "n", b"ab")
    assert collector.buffered == 0


def test_end_of_stream_with_unfinished_asset() -> None:
    assembler = AssetAssembler()
    assembler.receive(AssetChunk(4, 0, 8, "n", b"abc"))
    with pytest.raises(ProtocolError, match="1 unfinished: 4") as caught:
        assembler.end_of_stream()
    assert caught.value.code == MALFORMED
    collector = AssetCollector()
    collector.receive(AssetChunk(4, 0, 8, "n", b"abc"))
    with pytest.raises(ProtocolError) as caught:
        collector.end_of_stream()
    assert caught.value.code == MALFORMED


def test_receive_after_end_of_stream_is_local_misuse() -> None:
    assembler = AssetAssembler()
    assembler.end_of_stream()
    with pytest.raises(LocalProtocolError):
        assembler.receive(AssetChunk(1, 0, 0, "n", b""))


def test_unfinished_asset_count_is_bounded() -> None:
    assembler = AssetAssembler(max_unfinished_assets=2)
    assembler.receive(AssetChunk(1, 0, 2, "n", b"a"))
    assembler.receive(AssetChunk(2, 0, 2, "n", b"a"))
    assert assembler.receive(AssetChunk(3, 0, 1, "n", b"a")).complete  # finished: no slot
    with pytest.raises(ProtocolError, match="more than 2 unfinished") as caught:
        assembler.receive(AssetChunk(4, 0, 2, "n", b"a"))
    assert caught.value.code == TOO_LARGE
    assert assembler.unfinished == 2
    assembler.receive(AssetChunk(1, 1, 2, "", b"b"))
    assembler.receive(AssetChunk(4, 0, 2, "n", b"a"))  # a slot is free again


def test_collector_buffer_budget_counts_declared_sizes_and_names() -> None:
    collector = AssetCollector(max_asset_size=100, max_buffered_bytes=152)
    assert collector.receive(AssetChunk(1, 0, 100, "n", b"a")) is None
    assert collector.assembler.unfinished_bytes == 101
    assert collector.buffered == 1
    with pytest.raises(ProtocolError, match="budget") as caught:
        collector.receive(AssetChunk(2, 0, 51, "n", b"a"))
    assert caught.value.code == TOO_LARGE
    assert collector.receive(AssetChunk(2, 0, 50, "n", b"a")) is None
    # Assets that complete in one chunk are never buffered, so never count.
    assert collector.receive(AssetChunk(3, 0, 100, "n", bytes(100))) is not None
    assert collector.receive(AssetChunk(1, 1, 100, "", bytes(99))) == Asset(
        1, "n", b"a" + bytes(99)
    )
    assert (collector.buffered, collector.assembler.unfinished_bytes) == (1, 51)
    with pytest.raises(ProtocolError, match="budget"):  # a long name counts too
        collector.receive(AssetChunk(4, 0, 1, "n" * 101, b""))


def test_name_budget_counts_utf8_bytes() -> None:
    assembler = AssetAssembler(max_asset_size=1000, max_unfinished_bytes=100)
    with pytest.raises(FrameTooLarge):
        assembler.receive(AssetChunk(1, 0, 10, "\U0001f600" * 30, b"x"))  # 10 + 120 bytes
    assembler.receive(AssetChunk(1, 0, 10, "\U0001f600" * 20, b"x"))  # 10 + 80
    assert assembler.unfinished_bytes == 90
    assembler.receive(AssetChunk(1, 1, 10, "", bytes(9)))
    assert assembler.unfinished_bytes == 0


def test_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_unfinished_assets"):
        AssetAssembler(max_unfinished_assets=0)
    with pytest.raises(ValueError, match="max_unfinished_bytes"):
        AssetAssembler(max_unfinished_bytes=-1)


# --- round trips -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=3000),
    limit=st.integers(1, 700),
    cuts=st.lists(st.integers(0, 3000), max_size=8),
    name=st.text(min_size=1, max_size=20),
    asset_id=st.integers(0, U64),
)
def test_round_trip(data: bytes, limit: int, cuts: list[int], name: str, asset_id: int) -> None:
    chunks = list(chunk_asset(asset_id, name, data, max_chunk_data=limit))
    # The incremental sender, fed arbitrary pieces, produces the very same chunks.
    sender = AssetSender(asset_id, name, len(data), limit)
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    fed = [c for lo, hi in itertools.pairwise(bounds) for c in sender.feed(data[lo:hi])]
    assert fed + sender.finish() == chunks
    assert all(len(c.data) <= limit for c in chunks)
    assert all(c.data for c in chunks) or data == b""
    # Through the wire and back.
    wire = b"".join(encode_frame(chunk) for chunk in chunks)
    received = FrameDecoder(Channel.ASSETS).feed(wire)
    assert received == chunks
    assembler = AssetAssembler()
    progress = [assembler.receive(chunk) for chunk in received]  # type: ignore[arg-type]
    assert b"".join(p.data for p in progress) == data
    assert [p.complete for p in progress] == [False] * (len(chunks) - 1) + [True]
    assert {p.name for p in progress} == {name}
    collector = AssetCollector()
    assets = [collector.receive(chunk) for chunk in chunks]
    assert assets[-1] == Asset(asset_id, name, data)
    collector.end_of_stream()


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 200), min_size=1, max_size=6),
    limit=st.integers(1, 64),
    seed=st.integers(0, 2**32),
)
def test_interleaved_round_trip(sizes: list[int], limit: int, seed: int) -> None:
    rng = random.Random(seed)
    assets = {i: rng.randbytes(size) for i, size in enumerate(sizes)}
    queues = {
        i: list(chunk_asset(i, f"asset-{i}", d, max_chunk_data=limit)) for i, d in assets.items()
    }
    collector = AssetCollector()
    done: dict[int, bytes] = {}
    while queues:
        i = rng.choice(sorted(queues))
        result = collector.receive(queues[i].pop(0))
        if not queues[i]:
            del queues[i]
            assert result == Asset(i, f"asset-{i}", assets[i])
            done[i] = result.data
        else:
            assert result is None
    assert done == assets
    collector.end_of_stream()
