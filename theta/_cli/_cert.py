"""``theta cert``: write a self-signed development certificate and its key (PEM)."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from theta import generate_self_signed_certificate
from theta._cli._common import EXIT_OK, EXIT_USAGE, CommandFailed

__all__ = ["cert"]

_LOOPBACK = ("127.0.0.1", "::1")
_MAX_DAYS = 36500


def _write(path: str, data: bytes, mode: int, option: str) -> None:
    """Write ``data`` to ``path`` created with ``mode`` (the key is private: 0600)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as file:
            # An existing file keeps its mode through open(): narrow it before the
            # key goes in, not after.
            os.fchmod(file.fileno(), mode)
            file.write(data)
    except OSError as error:
        raise CommandFailed(f"cannot write {option} {path}: {error.strerror}", EXIT_USAGE) from None


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
    _write(args.key_out, generated.private_key_pem, 0o600, "--key-out")
    try:
        _write(args.cert_out, generated.certificate_pem, 0o644, "--cert-out")
    except CommandFailed:
        Path(args.key_out).unlink(missing_ok=True)  # no key without its certificate
        raise
    print(
        f"wrote a self-signed certificate for {name} (+ {', '.join(_LOOPBACK)}, valid"
        f" {args.days} days) to {Path(args.cert_out)} and its key to {Path(args.key_out)}",
        flush=True,
    )
    return EXIT_OK
