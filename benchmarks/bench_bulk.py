"""Bulk transfer: 64 MiB sent in 64 KiB pieces — theta's assets channel vs aioquic's
asyncio API (one stream into a byte-counting sink) vs trio TCP+TLS, same certificate.

QUIC variants run at 1200-byte datagrams and at 8000 (a known-MTU loopback profile). The
sender (client) and the sink (server) are separate processes on 127.0.0.1, fresh for
every trial; trials are interleaved. MB/s counts from the first byte handed over until
the sink's confirmation arrives; RSS growth is the sender's peak minus its RSS just
before the transfer (5 ms sampling plus ``ru_maxrss``); sink UDP drops are datagrams the
kernel dropped at the sink's socket (receive buffer full).
Run: ``python benchmarks/bench_bulk.py [--runs 5] [--mib 64] [--quick] [--json PATH]``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import struct
import time
from collections.abc import AsyncIterator

from _common import (
    HOST,
    PeakRss,
    Peer,
    aioquic_client_configuration,
    certificate_files,
    column,
    interleave,
    met,
    parse,
    parser,
    run_peer,
    say,
    serve_aioquic,
    table,
    udp_drops,
    write_json,
)

CHUNK = 64 * 1024
DATAGRAMS = (1200, 8000)


def _pieces(size: int) -> tuple[bytes, int]:
    if size % CHUNK:
        raise ValueError("size must be a multiple of 64 KiB")
    return os.urandom(CHUNK), size // CHUNK


def _report(size: int, started: float, rss: PeakRss, confirmed: int) -> None:
    elapsed = time.perf_counter() - started
    growth = rss.stop()
    if confirmed != size:
        raise RuntimeError(f"sink confirmed {confirmed} of {size} bytes")
    say("result", {"mb_s": size / elapsed / 1e6, "rss_mib": growth / 2**20, "s": elapsed})


# --- theta ------------------------------------------------------------------------------


def theta_sink(argv: list[str]) -> None:
    import trio

    import theta

    cert, key, datagram, size = argv[0], argv[1], int(argv[2]), int(argv[3])

    async def handler(session: theta.Session) -> None:
        received = 0
        while not (chunk := await session.assets.receive_chunk()).complete:
            received += len(chunk.data)
        received += len(chunk.data)
        await session.replication.send(b"%d" % received, tick=0)
        await session.wait_closed()

    async def main() -> None:
        config = theta.ServerConfig(
            certificate=cert, private_key=key, max_datagram_size=datagram, max_asset_size=size
        )
        async with trio.open_nursery() as nursery:
            server = await nursery.start(theta.serve, handler, HOST, 0, config)
            say("port", str(server.port))

    trio.run(main)


def theta_send(argv: list[str]) -> None:
    import trio

    import theta

    port, cert, datagram, size = int(argv[0]), argv[1], int(argv[2]), int(argv[3])
    piece, count = _pieces(size)

    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield piece

    async def main() -> None:
        config = theta.ClientConfig(
            ca_certs=cert, server_name="localhost", max_datagram_size=datagram
        )
        async with theta.connect(HOST, port, config) as session:
            rss, started = PeakRss(), time.perf_counter()
            await session.assets.send("bulk", pieces(), total_size=size)
            reply = await session.replication.receive()
            _report(size, started, rss, int(reply.payload))

    trio.run(main)


# --- aioquic asyncio --------------------------------------------------------------------


def aioquic_sink(argv: list[str]) -> None:
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.events import QuicEvent, StreamDataReceived

    cert, key, datagram = argv[0], argv[1], int(argv[2])

    class Sink(QuicConnectionProtocol):
        received = 0

        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, StreamDataReceived):
                self.received += len(event.data)
                if event.end_stream:
                    reply = b"%d" % self.received
                    self._quic.send_stream_data(event.stream_id, reply, end_stream=True)

    asyncio.run(serve_aioquic(cert, key, Sink, max_datagram_size=datagram))


def aioquic_send(argv: list[str]) -> None:
    from aioquic.asyncio.client import connect

    port, cert, datagram, size = int(argv[0]), argv[1], int(argv[2]), int(argv[3])
    piece, count = _pieces(size)

    async def main() -> None:
        configuration = aioquic_client_configuration(cert, max_datagram_size=datagram)
        async with connect(HOST, port, configuration=configuration) as protocol:
            rss, started = PeakRss(), time.perf_counter()
            reader, writer = await protocol.create_stream()
            for _ in range(count):
                writer.write(piece)
                await writer.drain()
            writer.write_eof()
            _report(size, started, rss, int(await reader.read()))

    asyncio.run(main())


# --- trio TCP + TLS ---------------------------------------------------------------------


def tcp_sink(argv: list[str]) -> None:
    import trio

    cert, key = argv[0], argv[1]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        header = b""
        while len(header) < 8:
            header += await stream.receive_some(8 - len(header))
        (size,) = struct.unpack("!Q", header)
        received = 0
        while received < size and (data := await stream.receive_some(1 << 20)):
            received += len(data)
        await stream.send_all(b"%d" % received)
        await stream.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_ssl_over_tcp, host=HOST)
            listeners = await nursery.start(serve, handler, 0, context)
            say("port", str(listeners[0].transport_listener.socket.getsockname()[1]))

    trio.run(main)


def tcp_send(argv: list[str]) -> None:
    import trio

    port, cert, size = int(argv[0]), argv[1], int(argv[3])
    piece, count = _pieces(size)
    context = ssl.create_default_context(cafile=cert)

    async def main() -> None:
        stream = await trio.open_ssl_over_tcp_stream(HOST, port, ssl_context=context)
        async with stream:
            await stream.do_handshake()
            rss, started = PeakRss(), time.perf_counter()
            await stream.send_all(struct.pack("!Q", size))
            for _ in range(count):
                await stream.send_all(piece)
            reply = b""
            while data := await stream.receive_some():
                reply += data
            _report(size, started, rss, int(reply))

    trio.run(main)


ROLES = {
    "theta-sink": theta_sink,
    "theta-send": theta_send,
    "aioquic-sink": aioquic_sink,
    "aioquic-send": aioquic_send,
    "tcp-sink": tcp_sink,
    "tcp-send": tcp_send,
}


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--mib", type=int, default=64, help="MiB per transfer (default 64)")
    args = parse(cli)
    size = (4 if args.quick else args.mib) * 2**20
    variants = [f"{kind} @{d}" for d in DATAGRAMS for kind in ("theta", "aioquic")]
    variants.append("tcp @-")

    with certificate_files() as (cert, key):

        def trial(name: str, run: int) -> dict[str, float]:
            kind, datagram = name.split(" @")
            with Peer(__file__, f"{kind}-sink", cert, key, datagram, size) as sink:
                port = sink.port()
                with Peer(__file__, f"{kind}-send", port, cert, datagram, size) as sender:
                    outcome: dict[str, float] = sender.result(timeout=180)
                    sender.wait(10)
                if kind != "tcp":
                    outcome["sink_drops"] = udp_drops(port)
            return outcome

        outcomes = interleave(variants, args.runs, trial)

    labels = {"theta": "theta assets channel", "aioquic": "aioquic asyncio", "tcp": "trio TCP+TLS"}
    rows = []
    for name in variants:
        kind, datagram = name.split(" @")
        rate, rss = column(outcomes[name], "mb_s"), column(outcomes[name], "rss_mib")
        ratio = target = rss_target = "—"
        if kind != "tcp":
            base = outcomes[f"aioquic @{datagram}"]
            base_rate, base_rss = column(base, "mb_s").median, column(base, "rss_mib").median
            ratio = f"{rate.median / base_rate:.2f}×"
            rss_ratio = rss.median / base_rss if base_rss > 0 else float("inf")
            ratio += f" / RSS {rss_ratio:.2f}×"
            if kind == "theta":
                target = f"≥ 1.2×: {met(rate.median >= 1.2 * base_rate)}"
                rss_target = f"≤ ⅓: {met(rss_ratio <= 1 / 3)}"
        drops = column(outcomes[name], "sink_drops").show(".0f") if kind != "tcp" else "—"
        row = [labels[kind], datagram, rate.show(), rss.show(), ratio, drops, target, rss_target]
        rows.append(row)
    title = f"Bulk: {size >> 20} MiB, 64 KiB pieces, {args.runs} interleaved runs"
    headers = ["variant", "datagram B", "MB/s median (min–max)", "sender RSS growth MiB"]
    headers += ["× aioquic (MB/s / RSS)", "sink UDP drops", "MB/s target", "RSS target"]
    text = table(title, headers, rows)
    payload = {"table": text, "size": size, "runs": args.runs, "outcomes": outcomes}
    write_json(args.json, __file__, payload)


if __name__ == "__main__" and not run_peer(ROLES):
    main()
