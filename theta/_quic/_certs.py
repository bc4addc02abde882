"""TLS credentials: loading and checking PEM sources, and self-signed certificates for
tests and development."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._config import PemSource

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def read_pem(name: str, source: object) -> bytes:
    """The PEM bytes of ``source`` (bytes-like, or the path of a file as ``str`` or
    ``Path``). ``TypeError`` names ``name`` for anything else, including PEM text passed
    as a ``str`` (a ``str`` is a path); ``OSError`` if the file cannot be read."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        raise TypeError(f"{name} holds PEM text as a str: pass it as bytes (a str is a path)")
    if not isinstance(source, str | Path):
        raise TypeError(f"{name} must be PEM bytes or a file path, not {source!r}")
    return Path(source).read_bytes()


def load_certificates(name: str, source: PemSource) -> list[x509.Certificate]:
    """Every certificate of a PEM source, in order; ``ValueError`` naming ``name`` if it
    holds none or one does not parse."""
    try:
        certificates = x509.load_pem_x509_certificates(read_pem(name, source))
    except ValueError:
        raise ValueError(f"{name}: no usable PEM certificates in it") from None
    return certificates


def load_server_credentials(
    certificate: PemSource, private_key: PemSource
) -> tuple[list[x509.Certificate], Any]:
    """The certificate chain (leaf first) and the leaf's private key. ``ValueError``
    naming the field if either does not parse or the key is not the leaf's (TLS would
    then fail every handshake with no word on the server's side)."""
    chain = load_certificates("certificate", certificate)
    try:
        key = serialization.load_pem_private_key(
            read_pem("private_key", private_key), password=None
        )
    except (ValueError, TypeError):  # TypeError: an encrypted key
        raise ValueError("private_key: no usable unencrypted PEM private key in it") from None
    if key.public_key().public_bytes(*_SPKI) != chain[0].public_key().public_bytes(*_SPKI):
        raise ValueError("private_key does not match the certificate (its first entry)")
    return chain, key


@dataclasses.dataclass(frozen=True, slots=True)
class SelfSignedCertificate:
    """A certificate and its private key, both PEM-encoded.

    Use ``certificate_pem`` as the server certificate *and* as the client's ``ca_certs``.
    """

    certificate_pem: bytes
    private_key_pem: bytes


def generate_self_signed_certificate(
    dns_names: tuple[str, ...] = ("localhost",),
    ip_addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
    *,
    valid_days: int = 7,
) -> SelfSignedCertificate:
    """Generate an ECDSA P-256 self-signed leaf: ``CA=False``, the given DNS and IP SANs,
    no extended key usage (the shape strict TLS stacks and both QUIC engines accept)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
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
