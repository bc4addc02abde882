"""Coverage-guided fuzzing of the frame decoder (run by ``nox -s fuzz``).

Every input is split into a channel choice, a feed step and a byte stream seeded from valid
frames; the decoder must return messages or raise ``ProtocolError`` — any other exception is
a crash that libFuzzer reports with the input that caused it. Prints how many inputs ran.

Usage: ``python fuzz/fuzz_decoder.py [RUNS]`` (default 1,000,000).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["theta"]):
    from theta.core import (
        AssetChunk,
        Channel,
        ChannelOpen,
        FrameDecoder,
        Heartbeat,
        Message,
        ProtocolError,
        ReplicationMessage,
        SessionAcknowledge,
        SessionClose,
        SessionConfirm,
        SessionHello,
        SessionReject,
        encode_frame,
    )

SEEDS: list[Message] = [
    SessionHello(1, 2**64 - 1, b"n" * 24, (1, 2, 0x80000001), b"token", b"k" * 32),
    SessionAcknowledge(1, 5, b"s" * 24, 3, 7, (2,), b"p" * 32, b"g" * 64),
    SessionConfirm(b"c" * 64),
    SessionReject(2, "version mismatch", 1, 99),
    ChannelOpen(1),
    ChannelOpen(2),
    Heartbeat(7, 1_000_000, 6, 999_000, 250, 1200, 30),
    SessionClose(13, "going away ✓"),
    ReplicationMessage(5, 1, b"delta" * 10, 50),
    AssetChunk(1, 0, 3, "tex.png", b"abc"),
]
CHANNELS: list[Channel | None] = [None, *Channel]


class Progress:
    """How far the run is: inputs tried, the target, the start time."""

    inputs = 0
    target = 1_000_000
    started = 0.0
    corpus = ""  # libFuzzer's working corpus, removed before the process ends


def one_input(data: bytes) -> None:
    Progress.inputs += 1
    if Progress.inputs % 250_000 == 0:
        print(f"fuzz: {Progress.inputs:,} inputs so far, only ProtocolError raised", flush=True)
    if Progress.inputs > Progress.target:
        elapsed = time.perf_counter() - Progress.started
        print(f"fuzz: {Progress.target:,} inputs in {elapsed:.1f} s, only ProtocolError raised")
        sys.stdout.flush()
        shutil.rmtree(Progress.corpus, ignore_errors=True)  # os._exit skips the cleanup
        os._exit(0)  # libFuzzer has no clean way to stop the loop from Python
    if len(data) < 2:
        return
    channel = CHANNELS[data[0] % len(CHANNELS)]
    step = data[1] + 1
    decoder = FrameDecoder(channel)
    try:
        stream = data[2:]
        for start in range(0, len(stream), step):
            decoder.feed(stream[start : start + step])
        decoder.end_of_stream()
    except ProtocolError:
        pass


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as corpus:
        for index, message in enumerate(SEEDS):
            for channel in range(len(CHANNELS)):
                frames = encode_frame(message) * 2
                Path(corpus, f"seed-{index}-{channel}").write_bytes(bytes([channel, 255]) + frames)
        Progress.target = runs
        Progress.corpus = corpus
        Progress.started = time.perf_counter()
        atheris.Setup([sys.argv[0], "-max_len=4096", corpus], one_input)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
