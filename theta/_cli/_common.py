"""What every command shares: argument types, logging, exit codes and the trio runner."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from theta import (
    CAP_ZSTD,
    HandshakeFailed,
    HandshakeRejected,
    HandshakeTimeout,
    ServerUnreachable,
    SessionClosed,
    TransportError,
)
from theta._groups import leaves
from theta.core import DEFAULT_MAX_ASSET_SIZE

__all__ = [
    "EXIT_CODES_HELP",
    "EXIT_FAILURE",
    "EXIT_HANDSHAKE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TRANSPORT",
    "EXIT_USAGE",
    "CommandFailed",
    "Endpoint",
    "asset_size",
    "capabilities",
    "capability",
    "configure_logging",
    "endpoint",
    "fail",
    "load_manifest",
    "message_count",
    "read_pem",
    "run",
    "session_config",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_HANDSHAKE = 3
EXIT_TRANSPORT = 4
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit status:
  0    success
  1    echo mismatch or other failure
  2    usage error (bad option, unreadable or invalid file)
  3    handshake rejected, failed (e.g. bad signature) or timed out
  4    connection or transport error (no answer, TLS/QUIC failure, session lost)
  130  interrupted (Ctrl-C); 143 on SIGTERM

Every command appends TLS secrets to $SSLKEYLOGFILE when it is set (for Wireshark)."""

_MAX_U32 = 0xFFFF_FFFF
_TLS_ALERT = 0x100  # QUIC's CRYPTO_ERROR range: 0x100 + the TLS alert
_TLS_ALERTS = {
    10: "unexpected_message",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    50: "decode_error",
    51: "decrypt_error: the server's key may not match its certificate",
    70: "protocol_version",
    80: "internal_error",
    109: "missing_extension",
    112: "unrecognized_name",
    116: "certificate_required",
    120: "no_application_protocol: the peer does not speak theta/1",
}
MAX_MESSAGES = 1_000_000  # echo-client builds its messages (≤ 512 B each) up front


class CommandFailed(Exception):
    """A failure the command explains itself: a one-line ``message`` and an exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# -- argument types --------------------------------------------------------------------


class Endpoint:
    """A ``HOST:PORT`` argument; ``text`` prints it back as given (``[::1]:0`` stays bracketed)."""

    def __init__(self, host: str, port: int, *, bracketed: bool) -> None:
        self.host = host
        self.port = port
        self.bracketed = bracketed

    def text(self, port: int | None = None) -> str:
        """``HOST:PORT`` with the host as given, and ``port`` instead if given."""
        host = f"[{self.host}]" if self.bracketed else self.host
        return f"{host}:{self.port if port is None else port}"


def peer_endpoint(text: str) -> Endpoint:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT`` with a port to connect to, 1..65535 (an
    argparse type)."""
    return _endpoint(text, lowest_port=1)


def endpoint(text: str) -> Endpoint:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT``, port 0..65535 (an argparse type)."""
    return _endpoint(text, lowest_port=0)


def _digits(text: str) -> bool:
    """At most 18 ASCII decimal digits (``str.isdigit`` also takes e.g. superscripts, and
    ``int`` refuses more than 4,300 digits)."""
    return len(text) <= 18 and text.isascii() and text.isdigit()


def _endpoint(text: str, *, lowest_port: int) -> Endpoint:
    host, sep, port_text = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not sep or not host or (":" in host and not bracketed):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or [IPV6]:PORT, got {text!r}")
    if not _digits(port_text) or not lowest_port <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port in {text!r} ({lowest_port}..65535)")
    return Endpoint(host, int(port_text), bracketed=bracketed)


def capability(text: str) -> int:
    """Parse a 32-bit capability, decimal or ``0x`` hexadecimal (an argparse type)."""
    try:
        value = int(text, 0)
    except ValueError:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid capability {text!r}") from None
    if not 0 <= value <= _MAX_U32:
        raise argparse.ArgumentTypeError(f"capability {text!r} is not an unsigned 32-bit value")
    return value


def capabilities(extra: list[int] | None) -> tuple[int, ...]:
    """zstd (``0x80000001``) followed by ``extra``, without duplicates."""
    return tuple(dict.fromkeys([CAP_ZSTD, *(extra or ())]))


def _positive_finite(text: str, invalid: str, not_positive: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{invalid} {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{not_positive}, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """A positive number of seconds (an argparse type)."""
    return _positive_finite(text, "invalid number of seconds", "seconds must be positive")


def positive_rate(text: str) -> float:
    """A positive rate per second (an argparse type)."""
    return _positive_finite(text, "invalid rate", "a rate must be positive")


def positive_count(text: str) -> int:
    """A positive integer (an argparse type)."""
    value = count(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def count(text: str) -> int:
    """A non-negative integer (an argparse type)."""
    if not _digits(text):
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def asset_size(text: str) -> int:
    """An asset size in bytes, 0 up to what a peer accepts by default (an argparse type)."""
    value = count(text)
    if value > DEFAULT_MAX_ASSET_SIZE:
        raise argparse.ArgumentTypeError(
            f"at most {DEFAULT_MAX_ASSET_SIZE} bytes (a peer's default limit), got {text!r}"
        )
    return value


def message_count(text: str) -> int:
    """A number of echoed messages, bounded so that they fit in memory (an argparse type)."""
    value = count(text)
    if value > MAX_MESSAGES:
        raise argparse.ArgumentTypeError(f"at most {MAX_MESSAGES} messages, got {text!r}")
    return value


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    names = [name for name, _ in pairs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate component name {duplicates[0]!r}")
    return dict(pairs)


def load_manifest(path: str | None) -> dict[str, str]:
    """Read a ``--manifest`` file: a JSON object {component name: descriptor string}."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_bytes(), object_pairs_hook=_unique_pairs)
    except OSError as error:
        raise CommandFailed(
            f"cannot read --manifest {path}: {error.strerror}", EXIT_USAGE
        ) from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, duplicate names
        message = str(error).splitlines()[0]
        raise CommandFailed(f"invalid --manifest {path}: {message}", EXIT_USAGE) from None
    if not isinstance(data, dict):
        raise CommandFailed(
            f"invalid --manifest {path}: expected a JSON object"
            " {component name: descriptor string}",
            EXIT_USAGE,
        )
    for name, descriptor in data.items():
        if not name or not isinstance(descriptor, str):
            raise CommandFailed(
                f"invalid --manifest {path}: component {name!r} needs a non-empty name"
                " and a string descriptor",
                EXIT_USAGE,
            )
        if len(name.encode("utf-8", "surrogatepass")) > 0xFFFF:
            raise CommandFailed(f"invalid --manifest {path}: component name too long", EXIT_USAGE)
    return data


_T = TypeVar("_T")

# Configuration fields set from options, and the options that set them.
_OPTIONS = {
    "capabilities": "--capability (plus zstd)",
    "handshake_timeout": "--handshake-timeout",
    "heartbeat_interval": "--heartbeat-interval",
    "heartbeat_timeout": "--heartbeat-timeout",
    "ca_certs": "--ca",
    "certificate": "--cert",
    "private_key": "--key",
}
_FIELDS = re.compile(r"\b(" + "|".join(_OPTIONS) + r")\b")


def session_config(build: Callable[[], _T]) -> _T:
    """``build()`` a session configuration; a value it refuses (``ValueError``) is a usage
    error, told with option names rather than field names."""
    try:
        config = build()
    except ValueError as error:
        message = _FIELDS.sub(lambda match: _OPTIONS[match[1]], str(error))
        raise CommandFailed(message, EXIT_USAGE) from None
    key_log = getattr(config, "key_log_file", None)
    if key_log is not None:  # from $SSLKEYLOGFILE: a local problem, not a connection's
        try:
            Path(key_log).open("a").close()
        except OSError as error:
            raise CommandFailed(
                f"cannot write the TLS key log {key_log} (SSLKEYLOGFILE): {error.strerror}",
                EXIT_USAGE,
            ) from None
    return config


def read_pem(path: str, option: str) -> bytes:
    """The bytes of a PEM file named by ``option``; a usage error if unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CommandFailed(f"cannot read {option} {path}: {error.strerror}", EXIT_USAGE) from None
    if b"-----BEGIN " not in data:
        raise CommandFailed(f"{option} {path} is not a PEM file", EXIT_USAGE)
    return data


# -- logging and running ---------------------------------------------------------------


def configure_logging(*, verbose: bool, level: int) -> None:
    """Log to stderr: ``level`` by default, everything with ``--verbose``. aioquic's
    ``quic`` logger (INFO lines per connection event, a WARNING repeating each error we
    report ourselves) is quiet unless verbose, so a failure is one line."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("quic").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe(error: BaseException) -> tuple[int, str]:
    """The exit code and one-line message for an exception that ended a command."""
    found = [leaf for leaf in leaves(error) if not isinstance(leaf, trio.Cancelled)] or [error]
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in found):
        return EXIT_INTERRUPTED, "interrupted"
    error = found[0]
    code, message = EXIT_FAILURE, f"{type(error).__name__}: {error}"
    if isinstance(error, CommandFailed):
        code, message = error.code, error.message
    elif isinstance(error, HandshakeRejected):
        code, message = EXIT_HANDSHAKE, f"handshake {error}"
    elif isinstance(error, HandshakeTimeout):
        # Unreachable (nothing answered, nothing listens): a connection error. A
        # handshake that timed out once the server had answered: a handshake error.
        unreachable = isinstance(error, ServerUnreachable)
        code = EXIT_TRANSPORT if unreachable else EXIT_HANDSHAKE
        message = f"{'server unreachable' if unreachable else 'handshake timed out'}: {error}"
    elif isinstance(error, HandshakeFailed):
        code, message = EXIT_HANDSHAKE, f"handshake failed: {error.code.name}: {error.reason}"
    elif isinstance(error, TransportError):
        code, message = EXIT_TRANSPORT, f"QUIC/TLS error {error.code:#x}: {error.reason}"
        if _TLS_ALERT <= error.code < _TLS_ALERT + 0x100:  # RFC 9001, section 4.8
            alert = _TLS_ALERTS.get(error.code - _TLS_ALERT, f"alert {error.code - _TLS_ALERT}")
            message = f"{message} (TLS {alert})"
    elif isinstance(error, SessionClosed):
        code, message = EXIT_TRANSPORT, str(error)
    elif isinstance(error, PermissionError) and error.errno is None:  # a role, not a file
        code, message = EXIT_FAILURE, f"not permitted: {error}"
    elif isinstance(error, socket.gaierror):
        code, message = EXIT_TRANSPORT, f"cannot resolve the host name: {error.strerror or error}"
    elif isinstance(error, trio.BrokenResourceError | OSError):
        code, message = EXIT_TRANSPORT, f"connection error: {error}"
    return code, _one_line(message) or type(error).__name__


def fail(command: str, code: int, message: str) -> int:
    """Print ``theta COMMAND: error: MESSAGE`` to stderr; return ``code``."""
    print(f"theta {command}: error: {message}", file=sys.stderr, flush=True)
    return code


async def _until_signal(
    body: Callable[[], Awaitable[int]],
) -> int:
    """Run ``body``; SIGINT/SIGTERM cancel it (cleanly) and give 128 + the signal number."""
    caught: list[int] = []
    result = EXIT_OK
    async with trio.open_nursery() as nursery:

        async def watch(*, task_status: trio.TaskStatus[None]) -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()
                async for signum in signals:
                    caught.append(signum)
                    nursery.cancel_scope.cancel()
                    return

        await nursery.start(watch)
        result = await body()
        nursery.cancel_scope.cancel()
    return 128 + caught[0] if caught else result


def run(command: str, body: Callable[[], Awaitable[int]]) -> int:
    """Run a command's trio ``body``; map whatever ends it to an exit code and one line."""
    try:
        return trio.run(_until_signal, body)
    except BaseException as error:
        if not isinstance(error, Exception | KeyboardInterrupt | BaseExceptionGroup):
            raise  # SystemExit and friends
        code, message = describe(error)
        if code == EXIT_INTERRUPTED:
            return code
        logging.getLogger("theta.cli").debug("%s failed", command, exc_info=error)
        return fail(command, code, message)
