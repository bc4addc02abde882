"""Micro-benchmark of the sans-IO codec: encode and decode per Heartbeat and per 1 MiB
AssetChunk, each beside a baseline measured in the same run.

Baselines: flatc's generated accessors reading the same Heartbeat (they trust the buffer
and validate nothing), and a plain 1 MiB ``bytes`` copy (the floor for any decoder that
hands out ``bytes``). Run with ``nox -s bench`` or ``python benchmarks/bench_core.py``.
"""

from __future__ import annotations

import statistics
import timeit
from collections.abc import Callable

from theta._generated import wire
from theta.core import AssetChunk, Channel, FrameDecoder, Heartbeat, encode_frame

REPEATS = 7


def measure(action: Callable[[], object], number: int) -> tuple[float, float, float]:
    """(median, min, max) seconds per call over REPEATS runs of ``number`` calls."""
    runs = [t / number for t in timeit.repeat(action, number=number, repeat=REPEATS)]
    return statistics.median(runs), min(runs), max(runs)


def row(
    name: str, timing: tuple[float, float, float], baseline: tuple[float, float, float] | None
) -> str:
    median, low, high = timing
    ratio = f"{median / baseline[0]:.1f}×" if baseline else "—"
    return f"| {name} | {median * 1e6:,.2f} | {low * 1e6:,.2f}–{high * 1e6:,.2f} | {ratio} |"


def main() -> None:
    heartbeat = Heartbeat(7, 1_000_000, 6, 999_000, 250, 1200, 30)
    heartbeat_frame = encode_frame(heartbeat)
    heartbeat_payload = heartbeat_frame[4:]
    control = FrameDecoder(Channel.CONTROL)

    def generated_read() -> tuple[int, ...]:
        body = wire.Heartbeat()
        table = wire.Frame.GetRootAs(heartbeat_payload, 0).Body()
        body.Init(table.Bytes, table.Pos)
        return (
            body.Sequence(), body.SentAtUs(), body.EchoSequence(), body.EchoSentAtUs(),
            body.EchoDelayUs(), body.RttUs(), body.JitterUs(),
        )  # fmt: skip

    data = bytes(range(256)) * 4096
    chunk = AssetChunk(1, 0, len(data), "asset.bin", data)
    chunk_frame = encode_frame(chunk)
    assets = FrameDecoder(Channel.ASSETS)
    assert control.feed(heartbeat_frame) == [heartbeat]
    assert assets.feed(chunk_frame) == [chunk]

    copy_1mib = measure(lambda: bytearray(data), 200)
    generated = measure(generated_read, 20_000)
    rows = [
        row("Heartbeat encode", measure(lambda: encode_frame(heartbeat), 20_000), None),
        row(
            "Heartbeat decode (validating)",
            measure(lambda: control.feed(heartbeat_frame), 20_000),
            generated,
        ),
        row("Heartbeat read, generated code (baseline, no validation)", generated, None),
        row(
            "Heartbeat encode + decode",
            measure(lambda: control.feed(encode_frame(heartbeat)), 20_000),
            generated,
        ),
        row("1 MiB AssetChunk encode", measure(lambda: encode_frame(chunk), 200), copy_1mib),
        row("1 MiB AssetChunk decode", measure(lambda: assets.feed(chunk_frame), 200), copy_1mib),
        row(
            "1 MiB AssetChunk encode + decode",
            measure(lambda: assets.feed(encode_frame(chunk)), 200),
            copy_1mib,
        ),
        row("1 MiB bytes copy (baseline)", copy_1mib, None),
    ]
    print("\n### theta.core codec (µs per operation, median of 7 runs)\n")
    print("| operation | median µs | min–max µs | × baseline |")
    print("|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
