"""Session establishment: sequential full theta sessions (QUIC + TLS + signed handshake +
channels, then closed without waiting out the closing period) vs aioquic's bare QUIC
connects (asyncio API: connect + handshake + close without waiting). A third variant,
theta's own QUIC layer alone (same connect + handshake + close, no session), separates
what the QUIC driver costs from what the session layer adds.

Client and server are separate processes on 127.0.0.1, fresh per trial (a few untimed
warm-up connections first); trials are interleaved. Latency is connect → established;
sessions/s counts establishment and close. CPU ms per connection is from each process's
own clock (the server's over the whole trial, warm-up included).
Run: ``python benchmarks/bench_sessions.py [--runs 5] [--count 200] [--quick] [--json PATH]``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

from _common import (
    HOST,
    Peer,
    aioquic_client_configuration,
    certificate_files,
    column,
    cpu_seconds,
    interleave,
    met,
    parse,
    parser,
    percentile,
    run_peer,
    say,
    serve_aioquic,
    table,
    write_json,
)

WARMUP = 5


def _report(times: list[tuple[float, float]], total: float, cpu: float) -> None:
    establish = [t[0] for t in times]
    say(
        "result",
        {
            "per_s": len(times) / total,
            "p50_ms": percentile(establish, 50) * 1e3,
            "p99_ms": percentile(establish, 99) * 1e3,
            "close_ms": percentile([t[1] for t in times], 50) * 1e3,
            "close_p90_ms": percentile([t[1] for t in times], 90) * 1e3,
            "client_cpu_ms": cpu / len(times) * 1e3,
        },
    )


async def _measure(one: Callable[[], Awaitable[tuple[float, float]]], count: int) -> None:
    """Open and close ``WARMUP`` untimed sessions with ``one``, then ``count`` timed ones;
    report them."""
    for _ in range(WARMUP):
        await one()
    cpu, started = time.process_time(), time.perf_counter()
    times = [await one() for _ in range(count)]
    _report(times, time.perf_counter() - started, time.process_time() - cpu)


# --- theta ------------------------------------------------------------------------------


def theta_server(argv: list[str]) -> None:
    import trio

    import theta

    async def handler(session: theta.Session) -> None:
        await session.wait_closed()

    async def main() -> None:
        config = theta.ServerConfig(certificate=argv[0], private_key=argv[1])
        async with trio.open_nursery() as nursery:
            server = await nursery.start(theta.serve, handler, HOST, 0, config)
            say("port", str(server.port))

    trio.run(main)


def theta_client(argv: list[str]) -> None:
    import trio

    import theta

    port, cert, count = int(argv[0]), argv[1], int(argv[2])
    config = theta.ClientConfig(ca_certs=cert, server_name="localhost")

    async def one() -> tuple[float, float]:
        started = time.perf_counter()
        async with theta.connect(HOST, port, config):
            established = time.perf_counter()
        return established - started, time.perf_counter() - established

    trio.run(_measure, one, count)


# --- theta's QUIC layer alone ------------------------------------------------------------


def quic_server(argv: list[str]) -> None:
    import trio

    from theta._quic import QuicConfig, QuicConnection, serve_quic

    async def handler(connection: QuicConnection) -> None:
        await connection.terminated.wait()

    async def main() -> None:
        config = QuicConfig(certificate=argv[0], private_key=argv[1])
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_quic, handler, HOST, 0, config)
            say("port", str(server.port))

    trio.run(main)


def quic_client(argv: list[str]) -> None:
    import trio

    from theta._quic import QuicConfig, open_quic_connection

    port, cert, count = int(argv[0]), argv[1], int(argv[2])
    config = QuicConfig(ca_certs=cert, server_name="localhost")

    async def one() -> tuple[float, float]:
        started = time.perf_counter()
        async with open_quic_connection(HOST, port, config):
            established = time.perf_counter()
        return established - started, time.perf_counter() - established

    trio.run(_measure, one, count)


# --- aioquic asyncio --------------------------------------------------------------------


def aioquic_server(argv: list[str]) -> None:
    asyncio.run(serve_aioquic(argv[0], argv[1]))


def aioquic_client(argv: list[str]) -> None:
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.connection import QuicConnection

    port, cert, count = int(argv[0]), argv[1], int(argv[2])
    configuration = aioquic_client_configuration(cert)

    async def one() -> tuple[float, float]:
        # aioquic.asyncio.connect() waits out the closing period on exit: done by hand here.
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOST, 0))
        connection = QuicConnection(configuration=configuration)
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: QuicConnectionProtocol(connection), sock=sock
        )
        try:
            protocol.connect((HOST, port))
            await protocol.wait_connected()
            established = time.perf_counter()
            protocol.close()
        finally:
            transport.close()
        return established - started, time.perf_counter() - established

    asyncio.run(_measure(one, count))


ROLES = {
    "theta-server": theta_server,
    "theta-client": theta_client,
    "quic-server": quic_server,
    "quic-client": quic_client,
    "aioquic-server": aioquic_server,
    "aioquic-client": aioquic_client,
}


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--count", type=int, default=200, help="sessions per trial (default 200)")
    args = parse(cli)
    count = 20 if args.quick else args.count

    with certificate_files() as (cert, key):

        def trial(name: str, run: int) -> dict[str, float]:
            with Peer(__file__, f"{name}-server", cert, key) as server:
                port = server.port()
                cpu = cpu_seconds(server.pid)
                with Peer(__file__, f"{name}-client", port, cert, count) as client:
                    outcome: dict[str, float] = client.result(timeout=60 + count)
                    client.wait(10)
                used = cpu_seconds(server.pid) - cpu
            return outcome | {"server_cpu_ms": used / (count + WARMUP) * 1e3}

        outcomes = interleave(["theta", "quic", "aioquic"], args.runs, trial)

    base = column(outcomes["aioquic"], "per_s").median
    rows = []
    for name, label in (
        ("theta", "theta full sessions"),
        ("quic", "theta's QUIC layer, bare connects"),
        ("aioquic", "aioquic bare connects"),
    ):
        rate = column(outcomes[name], "per_s")
        target = "—"
        if name == "theta":
            target = f"≥ 0.8× aioquic: {met(rate.median >= 0.8 * base)}"
        rows.append(
            [
                label,
                rate.show(),
                f"{rate.median / base:.2f}×",
                column(outcomes[name], "p50_ms").show(".2f"),
                column(outcomes[name], "p99_ms").show(".2f"),
                column(outcomes[name], "close_ms").show(".2f"),
                column(outcomes[name], "close_p90_ms").show(".1f"),
                column(outcomes[name], "client_cpu_ms").show(".2f"),
                column(outcomes[name], "server_cpu_ms").show(".2f"),
                target,
            ]
        )
    headers = ["variant", "per s median (min–max)", "× aioquic", "establish p50 ms"]
    headers += [
        "establish p99 ms",
        "close p50 ms",
        "close p90 ms",
        "client CPU ms/conn",
        "server CPU ms/conn",
        "target",
    ]
    text = table(
        f"Session establishment: {count} sequential, {args.runs} interleaved runs", headers, rows
    )
    payload = {"table": text, "count": count, "runs": args.runs, "outcomes": outcomes}
    write_json(args.json, __file__, payload)


if __name__ == "__main__" and not run_peer(ROLES):
    main()
