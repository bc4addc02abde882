"""The ``theta`` command line: ``echo-server``, ``echo-client``, ``cert`` and ``demo``.

The options, the ``listening on HOST:PORT`` line and the exit codes are a contract other
implementations' test suites drive; change them only on purpose.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

from theta import __version__
from theta._cli._common import (
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    asset_size,
    capability,
    configure_logging,
    describe,
    endpoint,
    fail,
    message_count,
    peer_endpoint,
    positive_count,
    positive_rate,
    positive_seconds,
)
from theta.core import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
)

__all__ = ["main"]

Command = Callable[[argparse.Namespace], int]


def _echo_server(args: argparse.Namespace) -> int:
    from theta._cli._echo import echo_server

    return echo_server(args)


def _echo_client(args: argparse.Namespace) -> int:
    from theta._cli._echo import echo_client

    return echo_client(args)


def _cert(args: argparse.Namespace) -> int:
    from theta._cli._cert import cert

    return cert(args)


def _demo(args: argparse.Namespace) -> int:
    from theta._cli._demo import demo

    return demo(args)


def _add_session_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--capability",
        type=capability,
        action="append",
        metavar="N",
        help="add a capability (decimal or 0x hex; repeatable); 0x80000001 (zstd) is always"
        " included",
    )
    parser.add_argument(
        "--manifest",
        metavar="FILE.json",
        help="component manifest, a JSON object {name: descriptor} (default: empty); its"
        " schema hash must match the peer's",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=positive_seconds,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="S",
        help="seconds to establish a session (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging on stderr, including aioquic's",
    )
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="theta",
        description="Theta Network Protocol over QUIC: tools and demo.",
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"theta {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, run: Command, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            parents=[common],
            help=summary,
            description=summary,
            epilog=EXIT_CODES_HELP,
            formatter_class=formatter,
        )
        sub.set_defaults(run=run)
        return sub

    server = add(
        "echo-server",
        _echo_server,
        "Serve sessions that echo every replication message and asset back. Prints"
        " 'listening on HOST:PORT' once bound.",
    )
    server.add_argument(
        "--listen",
        type=endpoint,
        required=True,
        metavar="HOST:PORT",
        help="UDP address to bind; port 0 picks a free one; IPv6 as [::1]:0",
    )
    server.add_argument("--cert", required=True, metavar="CERT", help="certificate chain (PEM)")
    server.add_argument("--key", required=True, metavar="KEY", help="its private key (PEM)")
    _add_session_options(server)
    server.add_argument(
        "--heartbeat-interval",
        type=positive_seconds,
        metavar="S",
        default=DEFAULT_HEARTBEAT_INTERVAL,
        help="default: %(default)s",
    )
    server.add_argument(
        "--heartbeat-timeout",
        type=positive_seconds,
        metavar="S",
        default=DEFAULT_HEARTBEAT_TIMEOUT,
        help="default: %(default)s",
    )

    client = add(
        "echo-client",
        _echo_client,
        "Send N replication messages (distinct ticks, random payloads) and one random asset"
        " to an echo server; exit 0 when every echo came back intact.",
    )
    client.add_argument(
        "--connect",
        type=peer_endpoint,
        required=True,
        metavar="HOST:PORT",
        help="the server's UDP address; IPv6 as [::1]:4433",
    )
    client.add_argument(
        "--ca", required=True, metavar="CA", help="PEM certificate(s) to verify the server against"
    )
    client.add_argument(
        "--server-name", metavar="NAME", help="name to verify the certificate for (default: HOST)"
    )
    _add_session_options(client)
    client.add_argument(
        "--messages",
        type=message_count,
        default=10,
        metavar="N",
        help="replication messages to echo (default: %(default)s)",
    )
    client.add_argument(
        "--asset-size",
        type=asset_size,
        default=65536,
        metavar="BYTES",
        help="size of the asset to echo; 0 sends an empty asset (default: %(default)s)",
    )
    client.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        metavar="S",
        help="seconds to wait for every echo once connected (default: %(default)s)",
    )

    cert = add(
        "cert", _cert, "Write a self-signed certificate for NAME (+ 127.0.0.1 and ::1) and its key."
    )
    cert.add_argument("--name", required=True, help="DNS name (or IP address) to certify")
    cert.add_argument("--cert-out", required=True, metavar="FILE", help="certificate (PEM)")
    cert.add_argument(
        "--key-out", required=True, metavar="FILE", help="private key (PEM, created mode 0600)"
    )
    cert.add_argument(
        "--days", type=positive_count, default=7, help="validity (default: %(default)s)"
    )

    demo = add(
        "demo",
        _demo,
        "Run a server and a client on loopback with replication and asset traffic and a live"
        " diagnostics table, then print a summary.",
    )
    demo.add_argument(
        "--duration",
        type=positive_seconds,
        default=10.0,
        metavar="S",
        help="seconds to run (default: %(default)s)",
    )
    demo.add_argument(
        "--rate",
        type=positive_rate,
        default=60.0,
        metavar="N",
        help="replication messages per second (default: %(default)s)",
    )
    demo.add_argument(
        "--asset-size",
        type=asset_size,
        default=256 * 1024,
        metavar="BYTES",
        help="size of each asset (default: %(default)s)",
    )
    demo.add_argument(
        "--asset-interval",
        type=positive_seconds,
        default=2.0,
        metavar="S",
        help="seconds between assets (default: %(default)s)",
    )
    return parser


_DEFAULT_LEVELS = {"echo-server": logging.INFO}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``theta`` command line; return the exit status."""
    try:
        args = build_parser().parse_args(argv)
        configure_logging(
            verbose=args.verbose, level=_DEFAULT_LEVELS.get(args.command, logging.WARNING)
        )
        run: Command = args.run
        return run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as error:  # outside trio: invalid settings, unwritable files...
        code, message = describe(error)
        return fail(args.command, code, message)
