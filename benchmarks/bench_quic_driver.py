"""64 MiB over one QUIC stream: theta's trio driver vs aioquic's asyncio API.

Run: ``python benchmarks/bench_quic_driver.py [--runs 5] [--mib 64]``. Each trial runs the server
and the sender (client) in two fresh processes; variants are interleaved A B A B ...
Both sides use 1200-byte datagrams, Reno, 64 KiB application chunks. The sender samples
its own VmRSS every 2 ms; "RSS growth" is the peak during the transfer minus the RSS just
before it. Prints a markdown table (median and min-max of MB/s and RSS growth).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import ssl
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHUNK = 64 * 1024
ALPN = "theta/1"


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class _PeakSampler:
    """Samples VmRSS in a thread; ``growth_mib`` = peak - baseline."""

    def __init__(self) -> None:
        self.baseline = _rss_kib()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_kib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kib())
        return (self.peak - self.baseline) / 1024


# --- theta ------------------------------------------------------------------------------


def theta_server(cert: bytes, key: bytes, port_pipe: Connection) -> None:
    import trio

    from theta._quic import QuicConfig, QuicConnection, QuicServer, serve_quic

    async def handler(connection: QuicConnection) -> None:
        stream = await connection.accept_stream()
        total = 0
        while data := await stream.receive_some(CHUNK):
            total += len(data)
        await stream.send_all(str(total).encode())
        await stream.send_eof()
        await connection.terminated.wait()

    async def main() -> None:
        config = QuicConfig(certificate=cert, private_key=key)
        async with trio.open_nursery() as nursery:
            server: QuicServer = await nursery.start(serve_quic, handler, "127.0.0.1", 0, config)
            port_pipe.send(server.port)

    trio.run(main)


def theta_client(port: int, ca: bytes, size: int, result: Connection) -> None:
    import trio

    from theta._quic import QuicConfig, open_quic_connection

    async def main() -> None:
        chunk = os.urandom(CHUNK)
        config = QuicConfig(ca_certs=ca, server_name="localhost")
        async with open_quic_connection("127.0.0.1", port, config) as connection:
            sampler = _PeakSampler()
            started = time.perf_counter()
            stream = await connection.open_stream()
            for _ in range(size // CHUNK):
                await stream.send_all(chunk)
            await stream.send_eof()
            reply = b""
            while data := await stream.receive_some():
                reply += data
            elapsed = time.perf_counter() - started
            growth = sampler.stop()
            assert int(reply) == size
            result.send((size / elapsed / 1e6, growth))

    trio.run(main)


# --- aioquic asyncio ----------------------------------------------------------------------


def aioquic_server(cert: bytes, key: bytes, port_pipe: Connection) -> None:
    from aioquic.asyncio.server import serve
    from aioquic.quic.configuration import QuicConfiguration

    from theta._quic._certs import load_server_credentials

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(CHUNK):
            total += len(data)
        writer.write(str(total).encode())
        writer.write_eof()

    tasks: set[asyncio.Task[None]] = set()

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(handle(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def main() -> None:
        configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        chain, configuration.private_key = load_server_credentials(cert, key)
        configuration.certificate = chain[0]
        server = await serve(
            "127.0.0.1",
            0,
            configuration=configuration,
            stream_handler=on_stream,
        )
        port_pipe.send(server._transport.get_extra_info("sockname")[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


def aioquic_client(port: int, ca: bytes, size: int, result: Connection) -> None:
    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration

    async def main() -> None:
        chunk = os.urandom(CHUNK)
        configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
        configuration.verify_mode = ssl.CERT_REQUIRED
        configuration.cadata = ca
        configuration.server_name = "localhost"
        async with connect("127.0.0.1", port, configuration=configuration) as protocol:
            sampler = _PeakSampler()
            started = time.perf_counter()
            reader, writer = await protocol.create_stream()
            for _ in range(size // CHUNK):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            reply = await reader.read()
            elapsed = time.perf_counter() - started
            growth = sampler.stop()
            assert int(reply) == size
            result.send((size / elapsed / 1e6, growth))

    asyncio.run(main())


# --- harness ----------------------------------------------------------------------------

VARIANTS = {
    "theta (trio)": (theta_server, theta_client),
    "aioquic asyncio": (aioquic_server, aioquic_client),
}


def trial(name: str, cert: bytes, key: bytes, size: int) -> tuple[float, float]:
    server_fn, client_fn = VARIANTS[name]
    context = multiprocessing.get_context("spawn")
    port_receive, port_send = context.Pipe(duplex=False)
    server = context.Process(target=server_fn, args=(cert, key, port_send), daemon=True)
    server.start()
    try:
        port = port_receive.recv()
        result_receive, result_send = context.Pipe(duplex=False)
        client = context.Process(target=client_fn, args=(port, cert, size, result_send))
        client.start()
        if not result_receive.poll(120):
            raise RuntimeError(f"{name}: no result")
        outcome: tuple[float, float] = result_receive.recv()
        client.join(30)
        return outcome
    finally:
        server.terminate()
        server.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    from theta._quic import generate_self_signed_certificate

    certificate = generate_self_signed_certificate()
    cert, key = certificate.certificate_pem, certificate.private_key_pem
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for run in range(args.runs):
        for name in VARIANTS:
            outcome = trial(name, cert, key, args.mib << 20)
            results[name].append(outcome)
            print(
                f"run {run + 1} {name}: {outcome[0]:.1f} MB/s, +{outcome[1]:.1f} MiB RSS",
                file=sys.stderr,
            )
    print(f"\n{args.mib} MiB over one stream, 1200-byte datagrams, {args.runs} runs each\n")
    print("| variant | MB/s median (min-max) | sender RSS growth MiB median (min-max) |")
    print("|---|---|---|")
    medians = {}
    for name, outcomes in results.items():
        rates = [o[0] for o in outcomes]
        growths = [o[1] for o in outcomes]
        medians[name] = (statistics.median(rates), statistics.median(growths))
        print(
            f"| {name} | {medians[name][0]:.1f} ({min(rates):.1f}-{max(rates):.1f}) "
            f"| {medians[name][1]:.1f} ({min(growths):.1f}-{max(growths):.1f}) |"
        )
    theta, baseline = medians["theta (trio)"], medians["aioquic asyncio"]
    print(f"\nthroughput ratio theta/aioquic: {theta[0] / baseline[0]:.2f}x (target >= 1.2x)")
    print(
        f"RSS growth ratio theta/aioquic: {theta[1] / max(baseline[1], 0.1):.2f} (target <= 0.33)"
    )


if __name__ == "__main__":
    main()
