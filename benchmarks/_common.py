"""Shared helpers of the loopback benchmarks: peers in subprocesses, interleaving,
statistics, RSS/CPU sampling, certificates, markdown tables and JSON output.

A benchmark script is both the orchestrator and its peers: ``python bench_x.py --peer ROLE
ARGS...`` runs one peer (a server prints ``port N`` once bound; a client prints
``result {json}`` when done). The orchestrator starts peers with :class:`Peer` and stops
exactly the processes it started, by PID.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import queue
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # aioquic is imported by the asyncio peers only
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.configuration import QuicConfiguration

HOST = "127.0.0.1"
ALPN = "theta/1"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
_PROFILE_ENV = "THETA_BENCH_PROFILE"
_STARTED: dict[int, subprocess.Popen[str]] = {}


# --- peers ------------------------------------------------------------------------------


def run_peer(roles: Mapping[str, Callable[[list[str]], None]]) -> bool:
    """If started as ``--peer ROLE ARGS...``, run that role and return ``True``."""
    if len(sys.argv) > 2 and sys.argv[1] == "--peer":
        role, argv = sys.argv[2], sys.argv[3:]
        if role in os.environ.get(_PROFILE_ENV, "").split(","):
            _profiled(role, lambda: roles[role](argv))
        else:
            roles[role](argv)
        return True
    return False


def _profiled(role: str, run: Callable[[], None]) -> None:
    """Run a peer under pyinstrument (``--profile ROLE``); the text report is written when
    it ends or is terminated, to ``profile-<script>-<role>-<pid>.txt``."""
    from pyinstrument import Profiler  # only needed with --profile

    profiler = Profiler(interval=0.001)
    out = Path(f"profile-{Path(sys.argv[0]).stem}-{role}-{os.getpid()}.txt")

    def write() -> None:
        profiler.stop()
        out.write_text(profiler.output_text(unicode=True, color=False))

    def terminated(*_: object) -> None:
        write()
        os._exit(0)

    signal.signal(signal.SIGTERM, terminated)
    profiler.start()
    try:
        run()
    finally:
        if profiler.is_running:
            write()


def say(kind: str, value: object = "") -> None:
    """A peer's report to the orchestrator: one line on stdout."""
    text = value if isinstance(value, str) else json.dumps(value)
    print(f"{kind} {text}".rstrip(), flush=True)


class Peer:
    """A peer subprocess (this script with ``--peer ROLE``); stopped by PID on exit."""

    def __init__(self, script: str, role: str, *args: object) -> None:
        self.role = role
        self.process = subprocess.Popen(
            [sys.executable, script, "--peer", role, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        _STARTED[self.process.pid] = self.process
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, kind: str, timeout: float) -> str:
        """The text of the next ``kind ...`` line (other lines are echoed to stderr)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"peer {self.role} exited ({self.process.wait()})")
            head, _, rest = line.partition(" ")
            if head == kind:
                return rest
            print(f"[{self.role}] {line}", file=sys.stderr)
        raise TimeoutError(f"peer {self.role}: no {kind!r} line within {timeout} s")

    def port(self, timeout: float = 30.0) -> int:
        return int(self.expect("port", timeout))

    def result(self, timeout: float, kind: str = "result") -> Any:
        """The JSON value of the next ``kind ...`` line."""
        return json.loads(self.expect(kind, timeout))

    def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self, grace: float = 5.0) -> None:
        """Terminate this process (SIGTERM, then SIGKILL after ``grace``) and reap it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _STARTED.pop(self.process.pid, None)

    def wait(self, timeout: float) -> None:
        """Let the process end by itself within ``timeout``, else stop it."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self.stop()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _reap() -> None:
    for process in list(_STARTED.values()):
        if process.poll() is None:
            process.kill()
            process.wait()


async def read_commands() -> AsyncIterator[str]:
    """(in a trio peer) An async iterator over the orchestrator's lines on stdin."""
    import trio

    stream = trio.lowlevel.FdStream(os.dup(0))
    buffer = b""
    async with stream:
        while chunk := await stream.receive_some(4096):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line.decode()


# --- aioquic baselines ------------------------------------------------------------------


async def serve_aioquic(
    cert: str,
    key: str,
    create_protocol: type[QuicConnectionProtocol] | None = None,
    *,
    max_datagram_size: int | None = None,
) -> None:
    """(in an asyncio peer) Serve aioquic on ``HOST`` with ``create_protocol`` (aioquic's
    default if ``None``), say the bound port and run until terminated."""
    import asyncio

    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.asyncio.server import serve
    from aioquic.quic.configuration import QuicConfiguration

    configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    if max_datagram_size is not None:
        configuration.max_datagram_size = max_datagram_size
    configuration.load_cert_chain(cert, key)
    server = await serve(
        HOST,
        0,
        configuration=configuration,
        create_protocol=create_protocol or QuicConnectionProtocol,
    )
    assert server._transport is not None  # no public accessor for the bound port
    say("port", str(server._transport.get_extra_info("sockname")[1]))
    await asyncio.Event().wait()


def aioquic_client_configuration(
    cert: str, *, max_datagram_size: int | None = None
) -> QuicConfiguration:
    """An aioquic client configuration for the baselines' servers (``ALPN``, localhost,
    trusting the certificate at ``cert``)."""
    from aioquic.quic.configuration import QuicConfiguration

    configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
    if max_datagram_size is not None:
        configuration.max_datagram_size = max_datagram_size
    configuration.load_verify_locations(cert)
    configuration.server_name = "localhost"
    return configuration


# --- certificates -----------------------------------------------------------------------


@contextlib.contextmanager
def certificate_files() -> Iterator[tuple[str, str]]:
    """A fresh self-signed certificate (localhost, 127.0.0.1) as (cert path, key path)."""
    import theta

    pair = theta.generate_self_signed_certificate()
    with tempfile.TemporaryDirectory(prefix="theta-bench-") as folder:
        cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert.write_bytes(pair.certificate_pem)
        key.write_bytes(pair.private_key_pem)
        yield str(cert), str(key)


# --- process figures --------------------------------------------------------------------


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from /proc/<pid>/statm."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped for the UDP socket(s) bound to 127.0.0.1:port (full
    receive buffer), from /proc/net/udp."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as table:
        return sum(int(row.split()[-1]) for row in table if row.split()[1] == local)


class PeakRss:
    """Samples this process's RSS every 5 ms in a thread; :meth:`stop` returns the growth
    (peak minus RSS at start), also trusting ``ru_maxrss`` if it rose meanwhile."""

    def __init__(self, interval: float = 0.005) -> None:
        self.start = rss_bytes()
        self._max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = self.start
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self._interval):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if max_after > self._max_before:  # the high-water mark was set during the run
            self.peak = max(self.peak, max_after)
        return self.peak - self.start


# --- statistics -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float
    n: int

    def show(self, fmt: str = ".1f", scale: float = 1.0) -> str:
        m, lo, hi = (self.median * scale, self.low * scale, self.high * scale)
        return f"{m:{fmt}} ({lo:{fmt}}–{hi:{fmt}})"


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        return Summary(math.nan, math.nan, math.nan, 0)
    return Summary(statistics.median(values), min(values), max(values), len(values))


def percentile(values: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def interleave(
    variants: Sequence[str], runs: int, trial: Callable[[str, int], dict[str, float]]
) -> dict[str, list[dict[str, float]]]:
    """Run ``trial(variant, run)`` as A B C A B C ...; the outcomes per variant (a trial
    that raised is reported on stderr and left out)."""
    outcomes: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for run in range(runs):
        for name in variants:
            try:
                outcome = trial(name, run)
            except Exception as error:  # a failed trial is reported, never fatal
                print(f"  run {run + 1}/{runs} {name}: FAILED {error!r}", file=sys.stderr)
                continue
            outcomes[name].append(outcome)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in outcome.items())
            print(f"  run {run + 1}/{runs} {name}: {shown}", file=sys.stderr, flush=True)
    return outcomes


def column(outcomes: Sequence[dict[str, float]], key: str) -> Summary:
    return summarize([o[key] for o in outcomes if key in o and not math.isnan(o[key])])


# --- output -----------------------------------------------------------------------------


def parser(description: str | None) -> argparse.ArgumentParser:
    """Options every script accepts (nox passes the same arguments to all of them)."""
    cli = argparse.ArgumentParser(description=(description or "").split("\n\n")[0])
    cli.add_argument("--runs", type=int, default=5, help="repetitions per variant (≥ 5)")
    cli.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    cli.add_argument(
        "--json",
        metavar="PATH",
        help="write results as JSON (to PATH/<script>.json if a directory)",
    )
    cli.add_argument(
        "--profile",
        metavar="ROLE",
        action="append",
        default=[],
        help="run peers of this role under pyinstrument (profile-*.txt in the current folder)",
    )
    return cli


def parse(cli: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, ignoring options meant for sibling scripts."""
    args, unknown = cli.parse_known_args()
    if unknown:
        print(f"{Path(sys.argv[0]).name}: ignoring {unknown}", file=sys.stderr)
    if args.profile:
        os.environ[_PROFILE_ENV] = ",".join(args.profile)
    if args.runs < 5:
        print(f"note: --runs {args.runs} is below 5 (quick look only)", file=sys.stderr)
    return args


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table under a ``###`` title, printed and returned."""
    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def write_json(path: str | None, script: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` (dataclasses become dicts) to ``path`` or ``path/<script>.json``."""
    if not path:
        return
    target = Path(path)
    if target.is_dir() or path.endswith("/"):
        target.mkdir(parents=True, exist_ok=True)
        target = target / f"{Path(script).stem}.json"

    def plain(value: object) -> object:
        return asdict(value) if isinstance(value, Summary) else str(value)

    record = {
        "script": Path(script).name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    target.write_text(json.dumps(record | payload, indent=2, default=plain) + "\n")
    print(f"wrote {target}", file=sys.stderr)
