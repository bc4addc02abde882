"""``theta cert``: write a self-signed development certificate and its key (PEM)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import tempfile
from pathlib import Path

from theta import generate_self_signed_certificate
from theta._cli._common import EXIT_OK, EXIT_USAGE, CommandFailed

__all__ = ["cert"]

_LOOPBACK = ("127.0.0.1", "::1")
_MAX_DAYS = 36500


def _write_temporary(path: str, data: bytes, mode: int, option: str) -> str:
    """Write ``data`` to a new file with ``mode`` beside ``path``; return its name."""
    try:
        fd, temporary = tempfile.mkstemp(dir=Path(path).parent, prefix=".theta-cert-")
    except OSError as error:
        raise CommandFailed(f"cannot write {option} {path}: {error.strerror}", EXIT_USAGE) from None
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)  # mkstemp made it 0600: the key stays so
            file.write(data)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise CommandFailed(f"cannot write {option} {path}: {error.strerror}", EXIT_USAGE) from None
    return temporary


def _write_pair(files: list[tuple[str, bytes, int, str]]) -> None:
    """Write every ``(path, data, mode, option)`` or none: each goes to a temporary file
    beside its target (through a symbolic link, beside the file it names) first; the
    targets are replaced only once all are written, and one that cannot be replaced
    puts back those replaced before it."""
    written: list[tuple[str, str, str]] = []
    replaced: list[tuple[str, bytes | None]] = []  # target, its former bytes (None: new)
    try:
        for path, data, mode, option in files:
            target = os.path.realpath(path)
            if os.path.isdir(target):
                raise CommandFailed(f"cannot write {option} {path}: a directory", EXIT_USAGE)
            written.append((_write_temporary(target, data, mode, option), target, option))
        for temporary, target, option in written:
            try:
                former = Path(target).read_bytes() if os.path.lexists(target) else None
                os.replace(temporary, target)
            except OSError as error:
                for done, content in reversed(replaced):
                    _put_back(done, content)
                raise CommandFailed(
                    f"cannot write {option} {target}: {error.strerror}", EXIT_USAGE
                ) from None
            replaced.append((target, former))
    finally:
        for temporary, _, _ in written:
            Path(temporary).unlink(missing_ok=True)


def _put_back(target: str, content: bytes | None) -> None:
    """Best effort: ``target`` as it was (``None``: it did not exist)."""
    with contextlib.suppress(OSError):
        if content is None:
            os.unlink(target)
        else:
            Path(target).write_bytes(content)


def cert(args: argparse.Namespace) -> int:
    """Generate the certificate for ``--name`` plus the loopback IPs, then write both files."""
    name: str = args.name
    try:
        ips: tuple[str, ...] = (str(ipaddress.ip_address(name)),)  # an IP address: certify it
        dns_names: tuple[str, ...] = ()
    except ValueError:
        ips, dns_names = (), (name,)
    if args.days > _MAX_DAYS:
        raise CommandFailed(f"invalid --days {args.days}: at most {_MAX_DAYS}", EXIT_USAGE)
    if Path(args.cert_out).resolve() == Path(args.key_out).resolve():
        raise CommandFailed("--cert-out and --key-out name the same file", EXIT_USAGE)
    try:
        generated = generate_self_signed_certificate(
            dns_names, tuple(dict.fromkeys((*ips, *_LOOPBACK))), valid_days=args.days
        )
    except ValueError as error:
        raise CommandFailed(f"invalid --name: {error}", EXIT_USAGE) from None
    _write_pair(
        [
            (args.cert_out, generated.certificate_pem, 0o644, "--cert-out"),
            (args.key_out, generated.private_key_pem, 0o600, "--key-out"),
        ]
    )
    print(
        f"wrote a self-signed certificate for {name} (+ {', '.join(_LOOPBACK)}, valid"
        f" {args.days} days) to {Path(args.cert_out)} and its key to {Path(args.key_out)}",
        flush=True,
    )
    return EXIT_OK
