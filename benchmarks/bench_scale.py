"""Scale: N concurrent theta sessions heartbeating every 500 ms against one server.

Per trial: a fresh server process and its idle RSS; client processes (up to 250 sessions
each) open the sessions in batches of 20 (handshake timeout 30 s, as the ramp shares 2
cores) and report ready; after a 2 s settle the steady window of ``--duration`` seconds
starts. Over the window: the server's CPU as % of one core (/proc/<pid>/stat), its RSS per
session ((larger RSS of window start and end − idle RSS) / N), heartbeat RTTs (each session's
``diagnostics().rtt_latest`` whenever a new heartbeat arrived, polled every 500 ms,
pooled), sessions lost (closed unexpectedly) and datagrams the kernel dropped at the
server's socket (receive buffer full; /proc/net/udp). Sizes interleave.
Run: ``python benchmarks/bench_scale.py [--runs 5] [--duration 20] [--quick] [--json PATH]``.
"""

from __future__ import annotations

import time

from _common import (
    HOST,
    Peer,
    certificate_files,
    column,
    cpu_seconds,
    interleave,
    met,
    parse,
    parser,
    percentile,
    read_commands,
    rss_bytes,
    run_peer,
    say,
    table,
    udp_drops,
    write_json,
)

INTERVAL = 0.5
BATCH = 20
PER_PROCESS = 250  # one process holding 500 sessions inflated the RTTs ~40× here
SETTLE = 2.0
HANDSHAKE_TIMEOUT = 30.0  # the ramp competes for 2 cores: measure steady state, not ramp


def server(argv: list[str]) -> None:
    import trio

    import theta

    async def handler(session: theta.Session) -> None:
        await session.wait_closed()

    async def main() -> None:
        config = theta.ServerConfig(
            certificate=argv[0],
            private_key=argv[1],
            heartbeat_interval=INTERVAL,
            handshake_timeout=HANDSHAKE_TIMEOUT,
            max_sessions=4096,
        )
        async with trio.open_nursery() as nursery:
            running = await nursery.start(theta.serve, handler, HOST, 0, config)
            say("port", str(running.port))
            async for line in read_commands():
                if line == "count":
                    say("count", str(len(running.sessions)))
            nursery.cancel_scope.cancel()

    trio.run(main)


def clients(argv: list[str]) -> None:
    import trio

    import theta

    port, cert, count = int(argv[0]), argv[1], int(argv[2])
    config = theta.ClientConfig(
        ca_certs=cert,
        server_name="localhost",
        heartbeat_interval=INTERVAL,
        handshake_timeout=HANDSHAKE_TIMEOUT,
    )
    sessions: list[theta.Session] = []
    failures = {"connect": 0, "after": 0}
    stop = trio.Event()

    async def hold(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        try:
            async with theta.connect(HOST, port, config) as session:
                sessions.append(session)
                started = True
                task_status.started()
                await stop.wait()
        except Exception:
            if not started:
                raise
            failures["after"] += 1

    async def sample(until: trio.Event) -> list[float]:
        seen = [s.diagnostics().heartbeats_received for s in sessions]
        rtts: list[float] = []
        while not until.is_set():
            with trio.move_on_after(INTERVAL):
                await until.wait()
            for index, session in enumerate(sessions):
                snapshot = session.diagnostics()
                if snapshot.heartbeats_received != seen[index] and snapshot.rtt_latest:
                    rtts.append(snapshot.rtt_latest)
                seen[index] = snapshot.heartbeats_received
        return rtts

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def start_one() -> None:
                try:
                    await nursery.start(hold)
                except Exception:
                    failures["connect"] += 1

            for first in range(0, count, BATCH):
                async with trio.open_nursery() as batch:
                    for _ in range(min(BATCH, count - first)):
                        batch.start_soon(start_one)
            say("ready", {"established": len(sessions), "failed": failures["connect"]})
            commands = read_commands()
            await anext(commands)  # "go"
            reported = trio.Event()
            rtts: list[float] = []

            async def collect() -> None:
                rtts.extend(await sample(reported))

            async with trio.open_nursery() as window:
                window.start_soon(collect)
                await anext(commands)  # "report"
                reported.set()
            lost = sum(1 for s in sessions if s.closed is not None) + failures["after"]
            say("result", {"lost": lost, "rtts": [round(r * 1e6) for r in rtts]})
            await anext(commands)  # "stop"
            stop.set()

    trio.run(main)


ROLES = {"server": server, "clients": clients}


def trial(n: int, duration: float, cert: str, key: str) -> dict[str, float]:
    with Peer(__file__, "server", cert, key) as srv:
        port = srv.port()
        time.sleep(1.0)
        idle = rss_bytes(srv.pid)
        parts = -(-n // PER_PROCESS)
        shares = [n // parts + (i < n % parts) for i in range(parts)]
        fleet = [Peer(__file__, "clients", port, cert, share) for share in shares]
        try:
            ready = [c.result(timeout=60 + n * 0.1, kind="ready") for c in fleet]
            time.sleep(SETTLE)
            for c in fleet:
                c.tell("go")
            rss, drops_before = rss_bytes(srv.pid), udp_drops(port)
            cpu, client_cpu = cpu_seconds(srv.pid), sum(cpu_seconds(c.pid) for c in fleet)
            started = time.monotonic()
            time.sleep(duration)
            window = time.monotonic() - started
            cpu = cpu_seconds(srv.pid) - cpu
            client_cpu = sum(cpu_seconds(c.pid) for c in fleet) - client_cpu
            rss = max(rss, rss_bytes(srv.pid))  # sessions lost in the window free little
            drops_window = udp_drops(port) - drops_before
            srv.tell("count")
            on_server = int(srv.expect("count", 10))
            for c in fleet:
                c.tell("report")
            reports = [c.result(timeout=30) for c in fleet]
            for c in fleet:
                c.tell("stop")
            for c in fleet:
                c.wait(15)
        finally:
            for c in fleet:
                c.stop()
    rtts = [r / 1e3 for report in reports for r in report["rtts"]]
    return {
        "established": sum(r["established"] for r in ready),
        "failed": sum(r["failed"] for r in ready),
        "lost": sum(r["lost"] for r in reports),
        "on_server": on_server,
        "drops_ramp": drops_before,
        "drops_window": drops_window,
        "cpu_pct": cpu / window * 100,
        "clients_cpu_pct": client_cpu / window * 100,
        "kib_per_session": (rss - idle) / n / 1024,
        "idle_mib": idle / 2**20,
        "rtt_p50_ms": percentile(rtts, 50),
        "rtt_p99_ms": percentile(rtts, 99),
        "rtt_samples": len(rtts),
    }


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--duration", type=float, default=20.0, help="steady window, s")
    cli.add_argument("--sessions", default="100,500,1000", help="comma-separated sizes")
    args = parse(cli)
    sizes = [20, 100] if args.quick else [int(n) for n in args.sessions.split(",")]
    duration = min(args.duration, 5.0) if args.quick else args.duration

    with certificate_files() as (cert, key):
        outcomes = interleave(
            [str(n) for n in sizes],
            args.runs,
            lambda name, run: trial(int(name), duration, cert, key),
        )

    rows = []
    for n in sizes:
        runs = outcomes[str(n)]
        cpu, kib = column(runs, "cpu_pct"), column(runs, "kib_per_session")
        lost, failed = sum(r["lost"] for r in runs), sum(r["failed"] for r in runs)
        target = "—"
        if n == 1000:
            ok = cpu.median <= 50 and kib.median <= 250 and lost + failed == 0
            target = f"≤ 50% CPU, ≤ 250 KiB, 0 lost: {met(ok)}"
        rows.append(
            [
                n,
                cpu.show(),
                column(runs, "clients_cpu_pct").show(".0f"),
                kib.show(".0f"),
                column(runs, "rtt_p50_ms").show(".2f"),
                column(runs, "rtt_p99_ms").show(".2f"),
                f"{lost:.0f} / {failed:.0f}",
                column(runs, "drops_ramp").show(".0f")
                + " / "
                + column(runs, "drops_window").show(".0f"),
                target,
            ]
        )
    headers = ["sessions", "server CPU % of a core", "clients CPU %", "server KiB/session"]
    headers += ["heartbeat RTT p50 ms", "RTT p99 ms", "lost / never established (all runs)"]
    headers += ["server UDP drops: ramp / window", "target"]
    title = f"Scale: heartbeats every {INTERVAL * 1e3:.0f} ms, {duration:g} s window"
    text = table(f"{title}, {args.runs} interleaved runs (median (min–max))", headers, rows)
    payload = {"table": text, "duration": duration, "runs": args.runs, "outcomes": outcomes}
    write_json(args.json, __file__, payload)


if __name__ == "__main__" and not run_peer(ROLES):
    main()
