"""``theta cert``: write a self-signed development certificate and its key (PEM)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
from pathlib import Path

from theta import generate_self_signed_certificate
from theta._cli._common import EXIT_OK, EXIT_USAGE, CommandFailed

__all__ = ["cert"]

_LOOPBACK = ("127.0.0.1", "::1")


def _write(path: str, data: bytes, mode: int, option: str) -> None:
    """Write ``data`` to ``path`` created with ``mode`` (the key is private: 0600)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(path, mode)
    except OSError as error:
        raise CommandFailed(f"cannot write {option} {path}: {error.strerror}", EXIT_USAGE) from None


def cert(args: argparse.Namespace) -> int:
    """Generate the certificate for ``--name`` plus the loopback IPs, then write both files."""
    name: str = args.name
    ips: tuple[str, ...] = _LOOPBACK
    with contextlib.suppress(ValueError):  # an IP address: certify it too
        ips = (str(ipaddress.ip_address(name)), *_LOOPBACK)
    if not name or any(c.isspace() for c in name):
        raise CommandFailed(f"invalid --name {name!r}", EXIT_USAGE)
    generated = generate_self_signed_certificate(
        dns_names=(name,), ip_addresses=tuple(dict.fromkeys(ips)), valid_days=args.days
    )
    _write(args.cert_out, generated.certificate_pem, 0o644, "--cert-out")
    _write(args.key_out, generated.private_key_pem, 0o600, "--key-out")
    print(
        f"wrote a self-signed certificate for {name} (+ {', '.join(_LOOPBACK)}, valid"
        f" {args.days} days) to {Path(args.cert_out)} and its key to {Path(args.key_out)}",
        flush=True,
    )
    return EXIT_OK
