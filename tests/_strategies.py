"""Hypothesis strategies for every wire message, reaching the extremes of each field."""

from __future__ import annotations

from hypothesis import strategies as st

from theta.core import (
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


def _uint(bits: int) -> st.SearchStrategy[int]:
    top = 2**bits - 1
    return st.one_of(st.sampled_from([0, 1, top - 1, top]), st.integers(0, top))


u8, u16, u32, u64 = _uint(8), _uint(16), _uint(32), _uint(64)
small_bytes = st.one_of(st.binary(max_size=80), st.sampled_from([b"", b"\x00" * 24, b"\xff" * 32]))
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", "héllo ✓ жж 𝄞", "\x00inner nul"]))
capability_lists = st.lists(u32, max_size=70).map(tuple)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(SessionHello, u16, u64, small_bytes, capability_lists, small_bytes, small_bytes),
    st.builds(
        SessionAcknowledge,
        u16,
        u64,
        small_bytes,
        u64,
        u32,
        capability_lists,
        small_bytes,
        small_bytes,
    ),
    st.builds(SessionConfirm, small_bytes),
    st.builds(SessionReject, u16, texts, u16, u64),
    st.builds(ChannelOpen, u8),
    st.builds(Heartbeat, u64, u64, u64, u64, u64, u32, u32),
    st.builds(SessionClose, u16, texts),
    st.builds(ReplicationMessage, u64, u32, st.binary(max_size=2000), u32),
    st.builds(AssetChunk, u64, u64, u64, texts, st.binary(max_size=2000)),
)
