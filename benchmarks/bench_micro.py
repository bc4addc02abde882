"""Micro: heartbeat encode + decode and the signed handshake's CPU per session, in memory,
each beside a baseline measured in the same run (cases interleave, median of ``--runs``).

* Heartbeat: ``encode_frame`` + ``FrameDecoder.feed`` vs ``struct`` packing and unpacking
  the same seven fields behind a length prefix.
* Handshake: ``ClientHandshake``/``ServerHandshake`` from hello to confirm, every message
  framed and decoded as on the wire, with the default keys (a fresh client key per
  session, one key per server) and with preset keys on both sides; vs one bare Ed25519
  sign + verify pair (a handshake does two pairs).

Run: ``python benchmarks/bench_micro.py [--runs 5] [--quick] [--json PATH]``.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from _common import column, interleave, parse, parser, table, write_json
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from theta.core import (
    CAP_ZSTD,
    Channel,
    ClientHandshake,
    FrameDecoder,
    Heartbeat,
    Message,
    ServerHandshake,
    encode_frame,
    schema_hash,
)

HEARTBEAT = Heartbeat(7, 1_000_000, 6, 999_000, 250, 1200, 30)
FIELDS = struct.Struct("<IQQQQIII")


def per_call_us(action: Callable[[], object], number: int) -> dict[str, float]:
    """Wall and CPU µs per call of ``action`` over ``number`` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(number):
        action()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_us": wall / number * 1e6, "cpu_us": cpu / number * 1e6}


def heartbeat_theta() -> Callable[[], object]:
    decoder = FrameDecoder(Channel.CONTROL)
    return lambda: decoder.feed(encode_frame(HEARTBEAT))


def heartbeat_struct() -> Callable[[], object]:
    values = (
        FIELDS.size - 4, HEARTBEAT.sequence, HEARTBEAT.sent_at_us, HEARTBEAT.echo_sequence,
        HEARTBEAT.echo_sent_at_us, HEARTBEAT.echo_delay_us, HEARTBEAT.rtt_us,
        HEARTBEAT.jitter_us,
    )  # fmt: skip
    return lambda: FIELDS.unpack(FIELDS.pack(*values))


def handshake(fresh_client_key: bool) -> Callable[[], object]:
    """One complete in-memory handshake, both sides, framed as on the wire."""
    hashed = schema_hash({})
    server_key = Ed25519PrivateKey.generate()  # what serve() does once per server
    keys = (None if fresh_client_key else Ed25519PrivateKey.generate(), server_key)

    def wire(message: Message | None, decoder: FrameDecoder) -> Message:
        assert message is not None
        (decoded,) = decoder.feed(encode_frame(message))
        return decoded

    def run() -> None:
        client_in, server_in = FrameDecoder(Channel.CONTROL), FrameDecoder(None)
        client = ClientHandshake(schema_hash=hashed, capabilities=(CAP_ZSTD,), signing_key=keys[0])
        server = ServerHandshake(
            schema_hash=hashed, capabilities=(CAP_ZSTD,), signing_key=keys[1], now=0.0
        )
        hello = wire(client.start(0.0), server_in)
        ack = wire(server.receive(hello, 0.0), client_in)
        confirm = wire(client.receive(ack, 0.0), server_in)
        server.receive(confirm, 0.0)
        assert client.is_established
        assert server.is_established

    return run


def ed25519_pair() -> Callable[[], object]:
    key = Ed25519PrivateKey.generate()
    public, transcript = key.public_key(), bytes(200)
    return lambda: public.verify(key.sign(transcript), transcript)


CASES: dict[str, tuple[Callable[[], Callable[[], object]], int]] = {
    "heartbeat encode + decode (theta.core)": (heartbeat_theta, 20_000),
    "heartbeat struct pack + unpack (baseline)": (heartbeat_struct, 20_000),
    "handshake, both sides, default keys": (lambda: handshake(True), 200),
    "handshake, both sides, preset keys": (lambda: handshake(False), 200),
    "Ed25519 sign + verify pair (baseline)": (ed25519_pair, 400),
}
BASELINES = {
    "heartbeat encode + decode (theta.core)": "heartbeat struct pack + unpack (baseline)",
    "handshake, both sides, default keys": "Ed25519 sign + verify pair (baseline)",
    "handshake, both sides, preset keys": "Ed25519 sign + verify pair (baseline)",
}


def main() -> None:
    args = parse(parser(__doc__))
    scale = 10 if args.quick else 1

    def trial(name: str, run: int) -> dict[str, float]:
        make, number = CASES[name]
        action = make()
        action()  # warm up
        return per_call_us(action, max(1, number // scale))

    outcomes = interleave(list(CASES), args.runs, trial)
    rows = []
    for name in CASES:
        cpu = column(outcomes[name], "cpu_us")
        baseline = BASELINES.get(name)
        ratio = "—"
        if baseline:
            ratio = f"{cpu.median / column(outcomes[baseline], 'cpu_us').median:.1f}×"
        wall = column(outcomes[name], "wall_us")
        rows.append([name, cpu.show(".2f"), wall.show(".2f"), ratio, "none set"])
    headers = ["operation", "CPU µs/op median (min–max)", "wall µs/op", "× its baseline", "target"]
    text = table(f"Micro: in memory, {args.runs} interleaved runs", headers, rows)
    write_json(args.json, __file__, {"table": text, "runs": args.runs, "outcomes": outcomes})


if __name__ == "__main__":
    main()
