"""ClientConfig and ServerConfig refuse, when built, every value that would fail sessions."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import theta
from theta import Role
from theta.core import FrameLimits

from .helpers import certificate, client_config, echo, server_config

_OTHER = theta.generate_self_signed_certificate()
_PEM_TEXT = _OTHER.certificate_pem.decode()

# Values either side refuses: (overrides, exception, message pattern).
_BOTH_REFUSE: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"manifest": {"A": 1}}, TypeError, "manifest entries must be str"),
    ({"manifest": {1: "x:f32"}}, TypeError, "manifest entries must be str"),
    ({"manifest": [("A", "x:f32")]}, TypeError, "manifest must be a mapping"),
    ({"manifest": {"A" * 65536: ""}}, ValueError, "component name"),
    ({"capabilities": 5}, TypeError, "capabilities must be a sequence of ints"),
    ({"capabilities": ("a",)}, TypeError, "capability 'a' is not an int"),
    ({"capabilities": (True,)}, TypeError, "capability True is not an int"),
    ({"capabilities": (-1,)}, ValueError, "capability -1 is not an unsigned 32-bit value"),
    ({"signing_key": "key"}, TypeError, "signing_key must be an Ed25519PrivateKey"),
    ({"handshake_timeout": "5"}, TypeError, "handshake_timeout must be a number of seconds"),
    ({"handshake_timeout": float("nan")}, ValueError, "handshake_timeout must be positive"),
    ({"heartbeat_timeout": 0}, ValueError, "heartbeat_timeout must be positive"),
    ({"handshake_timeout": float("inf")}, ValueError, "handshake_timeout must be finite"),
    ({"heartbeat_interval": float("inf")}, ValueError, "heartbeat_interval must be finite"),
    ({"heartbeat_timeout": float("inf")}, ValueError, "heartbeat_timeout must be finite"),
    ({"frame_limits": 1024}, TypeError, "frame_limits must be a FrameLimits"),
    (
        {"frame_limits": FrameLimits(replication=64)},
        ValueError,
        r"frame_limits\.replication must be above 84",
    ),
    ({"max_asset_size": -1}, ValueError, "max_asset_size must be non-negative"),
    ({"max_asset_size": 1.5}, TypeError, "max_asset_size must be an int"),
    ({"asset_chunk_size": 2**20 + 1}, ValueError, r"asset_chunk_size must be in 1\.\.1048576"),
    ({"max_buffered_asset_bytes": -5}, ValueError, "max_buffered_asset_bytes must be non-neg"),
    ({"receive_queue": 0}, ValueError, "receive_queue must be at least 1"),
    ({"receive_queue": 1.5}, TypeError, "receive_queue must be an int"),
    ({"receive_queue": True}, TypeError, "receive_queue must be an int"),
    ({"receive_queue_bytes": 0}, ValueError, "receive_queue_bytes must be at least 1"),
    ({"idle_timeout": -1}, ValueError, "idle_timeout must be positive"),
    ({"idle_timeout": 0}, ValueError, "idle_timeout must be positive"),
    ({"idle_timeout": float("inf")}, ValueError, "idle_timeout must be finite"),
    ({"max_datagram_size": 10}, ValueError, r"max_datagram_size must be in 1200\.\.65527"),
    ({"max_datagram_size": 65528}, ValueError, r"max_datagram_size must be in 1200\.\.65527"),
    ({"max_datagram_size": 1500.0}, TypeError, "max_datagram_size must be an int"),
    ({"key_log_file": 9}, TypeError, "key_log_file must be a path or None"),
]


@pytest.mark.parametrize(("overrides", "error", "match"), _BOTH_REFUSE)
def test_client_configuration_refuses(
    overrides: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        client_config(**overrides)


@pytest.mark.parametrize(("overrides", "error", "match"), _BOTH_REFUSE)
def test_server_configuration_refuses(
    overrides: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        server_config(**overrides)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"capabilities": range(65)}, ValueError, "capabilities must hold at most 64 values"),
        ({"auth_token": b"x" * 4097}, ValueError, "auth_token must be at most 4096 bytes"),
        ({"auth_token": "token"}, TypeError, "auth_token must be bytes-like"),
        ({"insecure_skip_verify_for_tests": "false"}, TypeError, "must be a bool"),
        ({"server_name": 5}, TypeError, "server_name must be a str or None"),
        ({"ca_certs": 5}, TypeError, "ca_certs must be PEM bytes or a file path"),
        ({"ca_certs": b"garbage"}, ValueError, "ca_certs: no usable PEM certificates"),
        ({"ca_certs": _PEM_TEXT}, TypeError, r"ca_certs holds PEM text as a str"),
        ({"ca_certs": _OTHER.private_key_pem}, ValueError, "ca_certs: no usable PEM"),
        (
            {"frame_limits": FrameLimits(control=1079)},
            ValueError,
            r"frame_limits\.control must be at least 1080 \(the largest SessionAcknowledge or",
        ),
    ],
)
def test_client_only_limits(overrides: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        client_config(**overrides)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"default_role": 2**40}, ValueError, "default_role must be in 0..4294967295"),
        ({"default_role": -1}, ValueError, "default_role must be in 0..4294967295"),
        ({"default_role": "admin"}, TypeError, "default_role must be an int"),
        ({"max_sessions": 0}, ValueError, "max_sessions must be at least 1"),
        ({"max_handshakes": 0}, ValueError, "max_handshakes must be at least 1"),
        ({"max_handshakes": -1}, ValueError, "max_handshakes must be at least 1"),
        ({"authenticator": 3}, TypeError, "authenticator must be callable"),
        ({"address_validation": "sometimes"}, ValueError, "address_validation must be one of"),
        (
            {"frame_limits": FrameLimits(control=4503)},
            ValueError,
            r"frame_limits\.control must be at least 4504 \(the largest SessionHello",
        ),
        ({"private_key": _OTHER.private_key_pem}, ValueError, "private_key does not match"),
        ({"certificate": b"garbage"}, ValueError, "certificate: no usable PEM certificates"),
        ({"private_key": b"garbage"}, ValueError, "private_key: no usable unencrypted PEM"),
        ({"certificate": 7}, TypeError, "certificate must be PEM bytes or a file path"),
        (
            {"certificate": b"garbage", "private_key": "key.pem"},
            ValueError,
            "certificate: no usable PEM certificates",
        ),
        (
            {"certificate": "cert.pem", "private_key": b"garbage"},
            ValueError,
            "private_key: no usable unencrypted PEM",
        ),
    ],
)
def test_server_only_limits(overrides: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        server_config(**overrides)


def test_limits_are_inclusive() -> None:
    client = client_config(
        capabilities=range(64),
        auth_token=b"x" * 4096,
        signing_key=Ed25519PrivateKey.generate(),
        frame_limits=FrameLimits(control=4504, replication=85),
        max_asset_size=0,
        max_buffered_asset_bytes=0,
        receive_queue=1,
        receive_queue_bytes=1,
        max_datagram_size=65527,
    )
    assert client.capabilities == tuple(range(64))
    server = server_config(
        capabilities=range(100),  # what a server supports is not sent: no limit
        default_role=0xFFFF_FFFF,
        max_sessions=1,
        max_handshakes=1,
        max_datagram_size=1200,
    )
    assert server.default_role == 0xFFFF_FFFF
    assert server_config(default_role=Role.REPLICATE).default_role is Role.REPLICATE


def test_bytes_like_tokens_and_real_numbers_are_converted() -> None:
    config = client_config(
        auth_token=bytearray(b"token"),
        handshake_timeout=Fraction(3, 2),
        heartbeat_interval=1,
        heartbeat_timeout=FloatSubclass(4.5),
        idle_timeout=Fraction(30),
    )
    assert config.auth_token == b"token"
    assert type(config.auth_token) is bytes  # a bytearray could change under the config
    assert (config.handshake_timeout, config.heartbeat_interval) == (1.5, 1.0)
    assert (config.heartbeat_timeout, config.idle_timeout) == (4.5, 30.0)
    assert all(
        type(value) is float
        for value in (config.handshake_timeout, config.heartbeat_timeout, config.idle_timeout)
    )
    assert client_config(auth_token=memoryview(b"ab")).auth_token == b"ab"


class FloatSubclass(float):
    """Like numpy.float64."""


def test_a_timeout_beyond_floats_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="heartbeat_timeout is out of range"):
        client_config(heartbeat_timeout=10**400)


def test_pem_files_are_read_when_a_session_starts(tmp_path: Path) -> None:
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "other-key.pem"
    cert_file.write_bytes(certificate().certificate_pem)
    key_file.write_bytes(_OTHER.private_key_pem)
    config = theta.ServerConfig(certificate=str(cert_file), private_key=key_file)
    assert (config.certificate, config.private_key) == (str(cert_file), key_file)
    assert client_config(ca_certs=cert_file).ca_certs == cert_file
    assert client_config(ca_certs=bytearray(_OTHER.certificate_pem)).ca_certs == (
        _OTHER.certificate_pem
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(ValueError, match="private_key does not match"):
                await nursery.start(theta.serve, echo, "127.0.0.1", 0, config)
            missing = client_config(ca_certs=tmp_path / "missing.pem")
            with pytest.raises(FileNotFoundError):
                async with theta.connect("127.0.0.1", 9, missing):
                    pass  # pragma: no cover
            unwritable = client_config(key_log_file=tmp_path / "no-such-dir" / "keys.log")
            with pytest.raises(OSError, match="cannot open key_log_file"):
                async with theta.connect("127.0.0.1", 9, unwritable):
                    pass  # pragma: no cover

    trio.run(main)
