"""TLS credentials: loading and checking PEM sources, and self-signed certificates for
tests and development."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._config import PemSource

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def pem_bytes(name: str, source: object) -> bytes | None:
    """``source`` as ``bytes`` if it is PEM data (bytes-like), ``None`` if it is the path
    of a file (``str`` or ``Path``). ``TypeError`` names ``name`` for anything else,
    including PEM text passed as a ``str`` (a ``str`` is a path)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        raise TypeError(f"{name} holds PEM text as a str: pass it as bytes (a str is a path)")
    if not isinstance(source, str | Path):
        raise TypeError(f"{name} must be PEM bytes or a file path, not {source!r}")
    return None


def read_pem(name: str, source: object) -> bytes:
    """The PEM bytes of ``source`` (see :func:`pem_bytes`), reading a file if it names
    one; ``OSError`` if the file cannot be read."""
    data = pem_bytes(name, source)
    if data is not None:
        return data
    assert isinstance(source, str | Path)  # pem_bytes refused anything else
    return Path(source).read_bytes()


def load_certificates(name: str, source: PemSource) -> list[x509.Certificate]:
    """Every certificate of a PEM source, in order; ``ValueError`` naming ``name`` if it
    holds none or one does not parse."""
    try:
        certificates = x509.load_pem_x509_certificates(read_pem(name, source))
    except ValueError:
        raise ValueError(f"{name}: no usable PEM certificates in it") from None
    return certificates


def load_private_key(source: PemSource) -> Any:
    """An unencrypted PEM private key; ``ValueError`` naming ``private_key`` otherwise."""
    try:
        return serialization.load_pem_private_key(read_pem("private_key", source), password=None)
    except (ValueError, TypeError):  # TypeError: an encrypted key
        raise ValueError("private_key: no usable unencrypted PEM private key in it") from None


def load_server_credentials(
    certificate: PemSource, private_key: PemSource
) -> tuple[list[x509.Certificate], Any]:
    """The certificate chain (leaf first) and the leaf's private key. ``ValueError``
    naming the field if either does not parse or the key is not the leaf's (TLS would
    then fail every handshake with no word on the server's side)."""
    chain = load_certificates("certificate", certificate)
    key = load_private_key(private_key)
    if key.public_key().public_bytes(*_SPKI) != chain[0].public_key().public_bytes(*_SPKI):
        raise ValueError("private_key does not match the certificate (its first entry)")
    return chain, key


_MAX_VALID_DAYS = 36500
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _names(names: str | Sequence[str]) -> list[str]:
    if isinstance(names, str):
        return [names]
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"names must be str, not {names!r}")
    return list(names)


def _dns_name(name: str) -> str:
    """``name`` in ASCII form, or ``ValueError`` if it is not a DNS name."""
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{name!r} is not a DNS name") from None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"{name!r} is an IP address: pass it in ip_addresses")
    labels = ascii_name.removeprefix("*.").split(".")
    if (
        len(ascii_name) > 253
        or not all(_DNS_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()  # a top-level label is never all-numeric (RFC 3696)
    ):
        raise ValueError(f"{name!r} is not a DNS name")
    return ascii_name


@dataclasses.dataclass(frozen=True, slots=True)
class SelfSignedCertificate:
    """A certificate and its private key, both PEM-encoded.

    Use ``certificate_pem`` as the server certificate *and* as the client's ``ca_certs``.
    """

    certificate_pem: bytes
    private_key_pem: bytes


def generate_self_signed_certificate(
    dns_names: str | Sequence[str] = ("localhost",),
    ip_addresses: str | Sequence[str] = ("127.0.0.1", "::1"),
    *,
    valid_days: int = 7,
) -> SelfSignedCertificate:
    """Generate an ECDSA P-256 self-signed leaf: ``CA=False``, the given DNS and IP SANs,
    no extended key usage (the shape strict TLS stacks and both QUIC engines accept).

    A single name may be passed as a ``str``; internationalized names are stored in their
    ASCII (IDNA) form. ``ValueError`` for a name that is not a DNS name (a leading ``*.``
    wildcard is allowed) or not an IP address, for no name at all, and for ``valid_days``
    outside 1..36500."""
    dns = [_dns_name(name) for name in _names(dns_names)]
    ips = [ipaddress.ip_address(address) for address in _names(ip_addresses)]
    if not dns and not ips:
        raise ValueError("a certificate needs at least one DNS name or IP address")
    if isinstance(valid_days, bool) or not isinstance(valid_days, int):
        raise TypeError(f"valid_days must be an int, not {valid_days!r}")
    if not 1 <= valid_days <= _MAX_VALID_DAYS:
        raise ValueError(f"valid_days must be in 1..{_MAX_VALID_DAYS}, not {valid_days}")
    common_name = dns[0] if dns else str(ips[0])
    key = ec.generate_private_key(ec.SECP256R1())
    # A common name is limited to 64 characters; the SANs are what clients verify.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    alt_names += [x509.IPAddress(address) for address in ips]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return SelfSignedCertificate(
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
