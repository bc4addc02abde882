"""Self-signed development certificates: names, addresses and validity."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509

from theta._quic import generate_self_signed_certificate


def _names(pem: bytes) -> tuple[str, list[str], list[str]]:
    certificate = x509.load_pem_x509_certificate(pem)
    (common_name,) = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    alt = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [str(address) for address in alt.get_values_for_type(x509.IPAddress)]
    return str(common_name.value), alt.get_values_for_type(x509.DNSName), ips


def test_a_single_name_may_be_a_str() -> None:
    generated = generate_self_signed_certificate("example.com", "192.0.2.1")
    assert _names(generated.certificate_pem) == ("example.com", ["example.com"], ["192.0.2.1"])


def test_names_are_stored_in_ascii_and_addresses_alone_will_do() -> None:
    generated = generate_self_signed_certificate(["ünïcode.example", "*.example.org"], ())
    assert _names(generated.certificate_pem) == (
        "xn--ncode-cta3g.example",
        ["xn--ncode-cta3g.example", "*.example.org"],
        [],
    )
    generated = generate_self_signed_certificate((), ["::1"])
    assert _names(generated.certificate_pem) == ("::1", [], ["::1"])


def test_a_long_name_keeps_its_san_and_a_cut_common_name() -> None:
    name = ".".join(["a" * 63] * 3)
    common_name, dns, _ = _names(generate_self_signed_certificate(name).certificate_pem)
    assert (common_name, dns) == (name[:64], [name])


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"dns_names": "ex*ample..com"}, ValueError, "is not a DNS name"),
        ({"dns_names": "a b"}, ValueError, "is not a DNS name"),
        ({"dns_names": ""}, ValueError, "is not a DNS name"),
        ({"dns_names": "-leading.example"}, ValueError, "is not a DNS name"),
        ({"dns_names": "a" * 64 + ".example"}, ValueError, "is not a DNS name"),
        ({"dns_names": "127.0.0.1"}, ValueError, "is an IP address: pass it in ip_addresses"),
        ({"dns_names": "127.1"}, ValueError, "is not a DNS name"),
        ({"dns_names": (), "ip_addresses": ()}, ValueError, "at least one DNS name or IP"),
        ({"ip_addresses": "localhost"}, ValueError, "does not appear to be an IPv4 or IPv6"),
        ({"dns_names": [b"bytes"]}, TypeError, "names must be str"),
        ({"valid_days": 0}, ValueError, r"valid_days must be in 1\.\.36500"),
        ({"valid_days": 10**9}, ValueError, r"valid_days must be in 1\.\.36500"),
        ({"valid_days": 1.5}, TypeError, "valid_days must be an int"),
    ],
)
def test_what_cannot_be_certified_is_refused(
    arguments: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        generate_self_signed_certificate(**arguments)  # type: ignore[arg-type]


def test_the_default_certifies_localhost_and_both_loopbacks() -> None:
    common_name, dns, ips = _names(generate_self_signed_certificate().certificate_pem)
    assert (common_name, dns) == ("localhost", ["localhost"])
    assert [ipaddress.ip_address(ip).is_loopback for ip in ips] == [True, True]
