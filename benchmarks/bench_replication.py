"""Replication: 64-byte messages over a theta session's replication channel.

* Throughput: the client sends ``--messages`` messages as fast as ``send`` allows, then an
  end marker; the server counts them and answers with the count. messages/s from the
  first send to the answer.
* The same with ``send_many`` in batches of 100 (a tick producing 100 deltas).
* Baseline: the same count of 64-byte records (4-byte length prefix) written to one stream
  with aioquic's asyncio API (``write`` + ``drain``), counted by the server.
* Latency: the client offers ``--rate`` messages/s (open loop, paced by the clock) for
  ``--duration`` seconds to a server that echoes each one; round trip per message.

Payloads are random (zstd is negotiated, as by default, but cannot shrink them). Client
and server are separate processes on 127.0.0.1, fresh per trial; trials interleave.
Run: ``python benchmarks/bench_replication.py [--runs 5] [--quick] [--json PATH]``.
"""

from __future__ import annotations

import os
import struct
import time

from _common import (
    HOST,
    Peer,
    aioquic_client_configuration,
    certificate_files,
    column,
    interleave,
    parse,
    parser,
    percentile,
    run_peer,
    say,
    serve_aioquic,
    table,
    write_json,
)

SIZE = 64
RECORD = 4 + SIZE  # aioquic baseline: a 4-byte length prefix and the payload
END = 2**63  # tick of the end marker


def server(argv: list[str]) -> None:
    import trio

    import theta

    cert, key, mode = argv[0], argv[1], argv[2]

    async def handler(session: theta.Session) -> None:
        count = 0
        async for message in session.replication:
            if mode == "echo":
                await session.replication.send(message.payload, tick=message.tick)
            elif message.tick == END:
                await session.replication.send(b"%d" % count, tick=END)
            else:
                count += 1

    async def main() -> None:
        config = theta.ServerConfig(certificate=cert, private_key=key)
        async with trio.open_nursery() as nursery:
            server = await nursery.start(theta.serve, handler, HOST, 0, config)
            say("port", str(server.port))

    trio.run(main)


def throughput(argv: list[str]) -> None:
    import trio

    import theta

    port, cert, count, batch = int(argv[0]), argv[1], int(argv[2]), int(argv[3])
    config = theta.ClientConfig(ca_certs=cert, server_name="localhost")
    payload = os.urandom(SIZE)

    async def main() -> None:
        async with theta.connect(HOST, port, config) as session:
            cpu, started = time.process_time(), time.perf_counter()
            if batch == 1:
                for tick in range(count):
                    await session.replication.send(payload, tick=tick)
            else:
                for first in range(0, count, batch):
                    ticks = range(first, min(first + batch, count))
                    await session.replication.send_many((tick, payload) for tick in ticks)
            await session.replication.send(b"", tick=END)
            answer = await session.replication.receive()
            elapsed = time.perf_counter() - started
            if int(answer.payload) != count:
                raise RuntimeError(f"server counted {answer.payload!r} of {count}")
            cpu_us = (time.process_time() - cpu) / count * 1e6
            say("result", {"msg_s": count / elapsed, "sender_cpu_us": cpu_us})

    trio.run(main)


def latency(argv: list[str]) -> None:
    import trio

    import theta

    port, cert = int(argv[0]), argv[1]
    rate, duration = float(argv[2]), float(argv[3])
    config = theta.ClientConfig(ca_certs=cert, server_name="localhost")
    total = int(rate * duration)
    sent_at = [0.0] * total
    rtts: list[float] = []

    async def receive(session: theta.Session, done: trio.Event) -> None:
        while len(rtts) < total:
            message = await session.replication.receive()
            rtts.append(time.perf_counter() - sent_at[message.tick])
        done.set()

    async def main() -> None:
        async with theta.connect(HOST, port, config) as session, trio.open_nursery() as nursery:
            done = trio.Event()
            nursery.start_soon(receive, session, done)
            started = trio.current_time()
            for tick in range(total):
                await trio.sleep_until(started + tick / rate)
                sent_at[tick] = time.perf_counter()
                await session.replication.send(os.urandom(SIZE), tick=tick)
            offered = total / (trio.current_time() - started)
            with trio.move_on_after(5):
                await done.wait()
            nursery.cancel_scope.cancel()
        say(
            "result",
            {
                "offered_s": offered,
                "p50_ms": percentile(rtts, 50) * 1e3,
                "p99_ms": percentile(rtts, 99) * 1e3,
                "max_ms": max(rtts, default=float("nan")) * 1e3,
                "missing": total - len(rtts),
            },
        )

    trio.run(main)


def aioquic_server(argv: list[str]) -> None:
    import asyncio

    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.events import QuicEvent, StreamDataReceived

    class Counter(QuicConnectionProtocol):
        received = 0

        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, StreamDataReceived):
                self.received += len(event.data)
                if event.end_stream:
                    count = b"%d" % (self.received // RECORD)
                    self._quic.send_stream_data(event.stream_id, count, end_stream=True)

    asyncio.run(serve_aioquic(argv[0], argv[1], Counter))


def aioquic_throughput(argv: list[str]) -> None:
    import asyncio

    from aioquic.asyncio.client import connect

    port, cert, count = int(argv[0]), argv[1], int(argv[2])
    record = struct.pack("!I", SIZE) + os.urandom(SIZE)

    async def main() -> None:
        configuration = aioquic_client_configuration(cert)
        async with connect(HOST, port, configuration=configuration) as protocol:
            cpu, started = time.process_time(), time.perf_counter()
            reader, writer = await protocol.create_stream()
            for _ in range(count):
                writer.write(record)
                await writer.drain()
            writer.write_eof()
            answer = await reader.read()
            elapsed = time.perf_counter() - started
            if int(answer) != count:
                raise RuntimeError(f"server counted {answer!r} of {count}")
            cpu_us = (time.process_time() - cpu) / count * 1e6
            say("result", {"msg_s": count / elapsed, "sender_cpu_us": cpu_us})

    asyncio.run(main())


ROLES = {
    "server": server,
    "throughput": throughput,
    "latency": latency,
    "aioquic-server": aioquic_server,
    "aioquic-throughput": aioquic_throughput,
}
BATCH = 100
VARIANTS = {  # name: (server role, server mode, client role, messages per send call)
    "theta one way, send": ("server", "count", "throughput", 1),
    f"theta one way, send_many × {BATCH}": ("server", "count", "throughput", BATCH),
    "aioquic one way": ("aioquic-server", "-", "aioquic-throughput", 1),
    "theta echo": ("server", "echo", "latency", 1),
}


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--messages", type=int, default=50_000, help="throughput messages")
    cli.add_argument("--rate", type=float, default=1000.0, help="offered echo rate, msg/s")
    cli.add_argument("--duration", type=float, default=10.0, help="echo seconds per run")
    args = parse(cli)
    messages = 5_000 if args.quick else args.messages
    duration = min(args.duration, 2.0) if args.quick else args.duration

    with certificate_files() as (cert, key):

        def trial(name: str, run: int) -> dict[str, float]:
            server_role, mode, client_role, batch = VARIANTS[name]
            with Peer(__file__, server_role, cert, key, mode) as server:
                port = server.port()
                if mode == "echo":
                    client = Peer(__file__, client_role, port, cert, args.rate, duration)
                else:
                    client = Peer(__file__, client_role, port, cert, messages, batch)
                with client:
                    outcome: dict[str, float] = client.result(timeout=60 + messages / 1000)
                    client.wait(10)
            return outcome

        outcomes = interleave(list(VARIANTS), args.runs, trial)

    echo = outcomes["theta echo"]
    missing = sum(o["missing"] for o in echo)
    rows = [
        [
            f"{name}, {messages:,} messages as fast as possible",
            column(outcomes[name], "msg_s").show(",.0f"),
            column(outcomes[name], "sender_cpu_us").show(".1f") + " µs CPU/msg (sender)",
            "none set",
        ]
        for name in list(VARIANTS)[:3]
    ]
    rows += [
        [
            f"theta echo at {args.rate:,.0f}/s offered for {duration:g} s",
            column(echo, "offered_s").show(",.0f") + " offered",
            f"RTT p50 {column(echo, 'p50_ms').show('.2f')} ms, "
            f"p99 {column(echo, 'p99_ms').show('.2f')} ms, "
            f"max {column(echo, 'max_ms').show('.1f')} ms, {missing} unanswered",
            "none set",
        ],
    ]
    headers = ["measurement", "messages/s median (min–max)", "detail (median (min–max))", "target"]
    text = table(f"Replication: {SIZE}-byte messages, {args.runs} interleaved runs", headers, rows)
    settings = {"messages": messages, "rate": args.rate, "duration": duration, "runs": args.runs}
    write_json(args.json, __file__, settings | {"table": text, "outcomes": outcomes})


if __name__ == "__main__" and not run_peer(ROLES):
    main()
