"""theta's server against an independent client built from wire-v1.md (``spec_peer``).

The server side uses theta's public API only (``theta.serve``, ``ServerConfig``,
``generate_self_signed_certificate``); the client side imports nothing from theta and runs
on its own asyncio loop in a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import theta

from . import spec_peer
from .spec_peer import (
    CAP_ZSTD,
    ConnectionClosedByServer,
    ErrorCode,
    PeerOptions,
    PeerResult,
    SessionRejectedError,
)

MANIFEST = {"Velocity": "dx:f32,dy:f32,dz:f32", "Position": "x:f32,y:f32,z:f32"}
CERT = theta.generate_self_signed_certificate()


# --------------------------------------------------------------------------------------------
# Section 7 test vectors: the peer's own primitives, before it is trusted against theta
# --------------------------------------------------------------------------------------------


def test_siphash_and_schema_vectors() -> None:
    assert spec_peer.siphash24(bytes(range(16)), bytes(range(15))) == 0xA129CA6149BE45E5
    assert spec_peer.schema_hash({}) == 0xB2D0FC1D03A55BE2
    assert spec_peer.canonical_manifest(MANIFEST).hex() == (
        "0008506f736974696f6e00000011783a6633322c793a6633322c7a3a663332"
        "000856656c6f636974790000001464783a6633322c64793a6633322c647a3a663332"
    )
    assert spec_peer.schema_hash(MANIFEST) == 0x431E408540BE313B
    assert spec_peer.schema_hash({"Ünïcode": "ж:f64"}) == 0xC8088EADBB9944A5


def test_handshake_vector() -> None:
    client = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    server = Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)
    client_pub = spec_peer.raw_public_key(client)
    server_pub = spec_peer.raw_public_key(server)
    assert client_pub.hex() == "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
    assert server_pub.hex() == "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394"
    transcript = spec_peer.handshake_transcript(
        protocol_version=1,
        schema_hash=0x431E408540BE313B,
        client_nonce=bytes(range(24)),
        client_public_key=client_pub,
        client_capabilities=[2, 4, 5, 0x80000001],
        auth_token=b"token-123",
        server_nonce=bytes(range(0x64, 0x7C)),
        server_public_key=server_pub,
        session_id=0x0123456789ABCDEF,
        role=7,
        negotiated_capabilities=[2, 0x80000001],
    )
    assert hashlib.sha256(transcript).hexdigest() == (
        "65c5e9c66f1ea4021bd3672943c8cb9cab612ac28e870d9402f6d5ab5a275d09"
    )
    assert server.sign(spec_peer.server_signed_bytes(transcript)).hex() == (
        "7e072bfe3665faf3349a7830291f28e8c617e194d3ebae4ba861ba33a92843ec"
        "88001ec176ebfe543f8d38746e3e02a8b5b24f6eedf064be159a5ffd1601980a"
    )
    assert client.sign(spec_peer.client_signed_bytes(transcript)).hex() == (
        "b7a6becb34219bf12949b5b0f5882ef13b1b22abca9500f4c35e9be4692aba9d"
        "5957221d240e5698c92f6bf092aa7f8957e94196074e892880aa9317b0d32206"
    )
    assert spec_peer.is_ed25519_point(client_pub)
    assert not spec_peer.is_ed25519_point(spec_peer.first_non_point())


@pytest.mark.parametrize("omit_empty", [True, False])
def test_codec_roundtrip(omit_empty: bool) -> None:
    messages: list[spec_peer.Message] = [
        spec_peer.SessionHello(1, 2**64 - 1, bytes(24), (1, 2**32 - 1), b"", bytes(32)),
        spec_peer.SessionConfirm(bytes(range(64))),
        spec_peer.ChannelOpen(2),
        spec_peer.Heartbeat(1, 2, 3, 4, 5, 6, 7),
        spec_peer.SessionClose(13, "bye ж"),
        spec_peer.ReplicationMessage(9, 0, b"\x00payload", 0),
        spec_peer.AssetChunk(1, 0, 3, "a", b"abc"),
        spec_peer.AssetChunk(1, 3, 6, None, b""),
    ]
    for message in messages:
        frame = spec_peer.encode_frame(message, omit_empty=omit_empty)
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4
        assert frame[8:12] == b"THTA"
        assert spec_peer.decode_payload(frame[4:])[1] == message
    with pytest.raises(spec_peer.SpecDeviation, match="MALFORMED_FRAME"):
        spec_peer.decode_payload(spec_peer.encode_payload(messages[2])[:-3])


# --------------------------------------------------------------------------------------------
# Running theta's server and the peer
# --------------------------------------------------------------------------------------------


@dataclass
class ServerLog:
    sessions: int = 0
    replication: list[tuple[int, bytes]] = field(default_factory=list)
    assets: list[tuple[str, bytes]] = field(default_factory=list)
    negotiated: tuple[int, ...] | None = None
    peer_public_key: bytes | None = None
    session_id: int | None = None
    closed: theta.SessionClosed | None = None
    handler_error: BaseException | None = None
    echo_replication: bool = True
    done: trio.Event = field(default_factory=trio.Event)


def echo_handler(log: ServerLog) -> Callable[[theta.Session], Any]:
    async def handler(session: theta.Session) -> None:
        log.sessions += 1
        log.negotiated = tuple(session.negotiated_capabilities)
        log.peer_public_key = bytes(session.peer_public_key)
        log.session_id = session.session_id

        async def echo_assets() -> None:
            async for asset in session.assets:
                log.assets.append((asset.name, asset.data))
                await session.assets.send(asset.name, asset.data)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo_assets)
                async for message in session.replication:
                    log.replication.append((message.tick, message.payload))
                    if log.echo_replication:
                        await session.replication.send(message.payload, tick=message.tick)
            log.closed = await session.wait_closed()
        except Exception as exc:
            log.handler_error = exc
            raise
        finally:
            log.done.set()

    return handler


def server_config(**overrides: Any) -> theta.ServerConfig:
    return theta.ServerConfig(
        certificate=CERT.certificate_pem,
        private_key=CERT.private_key_pem,
        manifest=MANIFEST,
        **overrides,
    )


async def run_against_theta(
    options_for_port: Callable[[int], PeerOptions],
    config: theta.ServerConfig,
    log: ServerLog,
    *,
    wait_handler: bool = True,
) -> tuple[PeerResult | None, BaseException | None]:
    async with trio.open_nursery() as nursery:
        server: theta.Server = await nursery.start(
            theta.serve, echo_handler(log), "127.0.0.1", 0, config
        )
        options = options_for_port(server.port)
        with trio.fail_after(30):
            result, error = await trio.to_thread.run_sync(spec_peer.run_peer_capturing, options)
        if wait_handler:
            with trio.fail_after(5):
                await log.done.wait()
        nursery.cancel_scope.cancel()
    return result, error


def peer_options(port: int, **overrides: Any) -> PeerOptions:
    fields: dict[str, Any] = {"manifest": MANIFEST}
    fields.update(overrides)
    return PeerOptions(host="127.0.0.1", port=port, ca_pem=CERT.certificate_pem, **fields)


def theta_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name} {r.levelname}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("theta") and r.levelno >= logging.WARNING
    ]


def assert_clean_close(result: PeerResult, log: ServerLog) -> None:
    # Section 4.6: the QUIC connection ends with application code NO_ERROR.
    assert result.quic_close_code == ErrorCode.NO_ERROR, result
    assert result.quic_close_frame_type is None, "application CONNECTION_CLOSE expected"
    assert result.server_close is None or result.server_close.code == ErrorCode.NO_ERROR
    assert result.stream_events == []
    assert log.handler_error is None
    assert log.closed is not None
    assert log.closed.code == ErrorCode.NO_ERROR
    assert log.closed.by_peer


# --------------------------------------------------------------------------------------------
# Interop: the happy paths
# --------------------------------------------------------------------------------------------


async def test_replication_and_assets_echo(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    messages = [(tick, os.urandom(tick * 37 % 1500)) for tick in range(1, 101)]
    messages.append((2**64 - 1, os.urandom(200_000)))
    assets = [("big.bin", os.urandom(300_000)), ("empty", b""), ("ж-name", b"x" * 65536)]
    log = ServerLog()
    result, error = await run_against_theta(
        lambda port: peer_options(
            port, replication=messages, assets=assets, min_server_heartbeats=3
        ),
        server_config(),
        log,
    )
    assert error is None, repr(error)
    assert result is not None
    assert result.alpn == "theta/1"
    ack = result.acknowledge
    assert ack is not None
    assert ack.role == theta.Role.REPLICATE | theta.Role.UPLOAD_ASSETS  # default_role 3
    assert ack.capabilities == ()  # the peer requested nothing
    assert log.session_id == ack.session_id
    assert result.hello is not None
    assert log.peer_public_key == result.hello.public_key
    # byte-exact echoes, in order, on both ends
    assert log.replication == messages
    assert result.replication_payloads == messages
    assert all(m.flags == 0 for m in result.replication_echoes)
    assert log.assets == assets
    assert [(name, data) for _, name, data in result.assets_echoed] == assets
    # heartbeats (section 4.4): theta's sequence 1, 2, 3, ... and echoes of ours
    beats = result.heartbeats_received
    assert [b.sequence for b in beats] == list(range(1, len(beats) + 1))
    assert len(beats) >= 3
    assert any(b.echo_sequence != 0 for b in beats)
    assert_clean_close(result, log)
    assert theta_warnings(caplog) == []


async def test_zstd_and_capability_negotiation(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    messages = [(tick, (b"position=%d;" % tick) * 400) for tick in range(1, 21)]
    log = ServerLog()
    result, error = await run_against_theta(
        lambda port: peer_options(
            port,
            capabilities=(CAP_ZSTD, 7, 2, 9, 2),
            replication=messages,
            compress_replication=True,
        ),
        server_config(capabilities=(2, 3, 7, CAP_ZSTD), default_role=0x10007),
        log,
    )
    assert error is None, repr(error)
    assert result is not None
    assert result.acknowledge is not None
    # section 4.1: set intersection, no duplicates, sorted ascending
    assert result.acknowledge.capabilities == (2, 7, CAP_ZSTD)
    assert result.acknowledge.role == 0x10007
    assert log.negotiated == (2, 7, CAP_ZSTD)
    assert log.replication == messages
    assert result.replication_payloads == messages
    assert_clean_close(result, log)
    assert theta_warnings(caplog) == []


async def test_limits_are_inclusive_and_authenticator_role() -> None:
    seen: list[tuple[bytes, bytes]] = []

    def authenticator(token: bytes, key: bytes, address: tuple[str, int] | None) -> int | None:
        seen.append((token, key))
        return 0x20001

    log = ServerLog()
    token = os.urandom(4096)
    result, error = await run_against_theta(
        lambda port: peer_options(
            port,
            capabilities=tuple(range(100, 164)),
            auth_token=token,
            replication=[(1, b"x")],
        ),
        server_config(authenticator=authenticator),
        log,
    )
    assert error is None, repr(error)
    assert result is not None
    assert result.acknowledge is not None
    assert result.acknowledge.role == 0x20001
    assert result.hello is not None
    assert seen == [(token, result.hello.public_key)]
    assert_clean_close(result, log)


# --------------------------------------------------------------------------------------------
# Interop: what theta refuses, and with which code
# --------------------------------------------------------------------------------------------


async def test_bad_confirm_signature_is_refused() -> None:
    log = ServerLog()
    result, error = await run_against_theta(
        lambda port: peer_options(port, corrupt_confirm_signature=True, replication=[(1, b"x")]),
        server_config(),
        log,
        wait_handler=False,
    )
    # Section 4.1 does not name the code for a bad client signature; HANDSHAKE_FAILED is the
    # code the section uses for every other signature/transcript failure.
    assert isinstance(error, ConnectionClosedByServer), repr(error)
    assert error.is_application_close
    assert error.error_code == ErrorCode.HANDSHAKE_FAILED
    assert result is not None
    assert result.server_close is None or result.server_close.code == ErrorCode.HANDSHAKE_FAILED
    # section 2: nothing reached the application
    assert log.sessions == 0


SERVER_HASH = spec_peer.schema_hash(MANIFEST)


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        pytest.param({"protocol_version": 2}, ErrorCode.VERSION_MISMATCH, id="version"),
        pytest.param({"schema_hash_override": 1}, ErrorCode.SCHEMA_MISMATCH, id="schema"),
        pytest.param(
            {"protocol_version": 0, "schema_hash_override": 1, "nonce": bytes(3)},
            ErrorCode.VERSION_MISMATCH,
            id="first-rule-wins",
        ),
        pytest.param({"nonce": os.urandom(23)}, ErrorCode.HANDSHAKE_FAILED, id="nonce-23"),
        pytest.param({"nonce": os.urandom(25)}, ErrorCode.HANDSHAKE_FAILED, id="nonce-25"),
        pytest.param(
            {"public_key_override": bytes(31)}, ErrorCode.HANDSHAKE_FAILED, id="key-length"
        ),
        pytest.param(
            {"public_key_override": spec_peer.first_non_point()},
            ErrorCode.HANDSHAKE_FAILED,
            id="key-not-a-point",
        ),
        pytest.param(
            {"capabilities": tuple(range(65))}, ErrorCode.MALFORMED_FRAME, id="65-capabilities"
        ),
        pytest.param({"auth_token": bytes(4097)}, ErrorCode.MALFORMED_FRAME, id="token-4097"),
        pytest.param({"auth_token": b"wrong"}, ErrorCode.AUTH_FAILED, id="auth-refused"),
    ],
)
async def test_hello_rejected(overrides: dict[str, Any], code: ErrorCode) -> None:
    def authenticator(token: bytes, key: bytes, address: tuple[str, int] | None) -> int | None:
        return None if token == b"wrong" else 3

    log = ServerLog()
    result, error = await run_against_theta(
        lambda port: peer_options(port, **overrides),
        server_config(authenticator=authenticator),
        log,
        wait_handler=False,
    )
    assert isinstance(error, SessionRejectedError), repr(error)
    reject = error.reject
    assert (reject.code, reject.protocol_version, reject.schema_hash) == (
        code,
        1,
        SERVER_HASH,
    ), reject
    assert reject.reason
    # "any failure answers SessionReject with the code, then closes the connection with the
    # same code"
    assert error.close is not None
    assert error.close.is_application_close
    assert error.close.error_code == code
    assert result is not None
    assert result.acknowledge is None
    assert log.sessions == 0


async def test_role_without_upload_assets_is_permission_denied() -> None:
    log = ServerLog()
    result, error = await run_against_theta(
        lambda port: peer_options(port, assets=[("nope", b"data")]),
        server_config(default_role=theta.Role.REPLICATE),
        log,
    )
    assert isinstance(error, ConnectionClosedByServer), repr(error)
    assert error.is_application_close
    assert error.error_code == ErrorCode.PERMISSION_DENIED
    assert result is not None
    assert result.acknowledge is not None
    assert result.acknowledge.role == theta.Role.REPLICATE
    assert log.assets == []


# section -> (scenario, expected QUIC application error code, server config overrides)
VIOLATIONS: list[tuple[str, str, ErrorCode, dict[str, Any]]] = [
    ("2", "no-hello", ErrorCode.HANDSHAKE_TIMEOUT, {"handshake_timeout": 1.0}),
    ("4.1", "no-confirm", ErrorCode.HANDSHAKE_TIMEOUT, {"handshake_timeout": 1.0}),
    ("2", "channel-open-first", ErrorCode.PROTOCOL_VIOLATION, {}),
    ("4.1", "heartbeat-before-confirm", ErrorCode.PROTOCOL_VIOLATION, {}),
    ("3", "zero-length", ErrorCode.MALFORMED_FRAME, {}),
    ("3", "control-too-large", ErrorCode.FRAME_TOO_LARGE, {}),
    ("3", "replication-too-large", ErrorCode.FRAME_TOO_LARGE, {}),
    ("3", "assets-too-large", ErrorCode.FRAME_TOO_LARGE, {}),
    ("3", "garbage-payload", ErrorCode.MALFORMED_FRAME, {}),
    ("3", "bad-identifier", ErrorCode.MALFORMED_FRAME, {}),
    ("3", "unknown-union-type", ErrorCode.MALFORMED_FRAME, {}),
    ("3", "absent-body", ErrorCode.MALFORMED_FRAME, {}),
    ("3", "fin-inside-frame", ErrorCode.MALFORMED_FRAME, {}),
    ("3", "vector-past-end-by-one", ErrorCode.MALFORMED_FRAME, {}),
    ("3", "vector-length-huge", ErrorCode.MALFORMED_FRAME, {}),
    ("3", "string-past-end", ErrorCode.MALFORMED_FRAME, {}),
    ("3", "root-past-end", ErrorCode.MALFORMED_FRAME, {}),
    ("3", "body-past-end", ErrorCode.MALFORMED_FRAME, {}),
    ("3", "vtable-past-end", ErrorCode.MALFORMED_FRAME, {}),
    ("4.5", "channel-open-3", ErrorCode.PROTOCOL_VIOLATION, {}),
    ("2", "second-replication-stream", ErrorCode.PROTOCOL_VIOLATION, {}),
    ("2", "hello-on-later-stream", ErrorCode.PROTOCOL_VIOLATION, {}),
    ("2", "unidirectional-stream", ErrorCode.PROTOCOL_VIOLATION, {}),
    ("2", "heartbeat-on-replication", ErrorCode.PROTOCOL_VIOLATION, {}),
    ("2", "replication-on-control", ErrorCode.PROTOCOL_VIOLATION, {}),
    ("2", "channel-open-on-control", ErrorCode.PROTOCOL_VIOLATION, {}),
    ("4", "second-confirm", ErrorCode.PROTOCOL_VIOLATION, {}),
    ("4.4", "heartbeat-repeat", ErrorCode.PROTOCOL_VIOLATION, {}),
    ("4.4", "no-heartbeats", ErrorCode.HEARTBEAT_TIMEOUT, {"heartbeat_timeout": 1.0}),
    ("4.5", "compressed-without-capability", ErrorCode.PROTOCOL_VIOLATION, {}),
    ("4.5", "asset-gap", ErrorCode.MALFORMED_FRAME, {}),
    ("4.5", "asset-first-without-name", ErrorCode.MALFORMED_FRAME, {}),
    ("4.5", "asset-past-total", ErrorCode.MALFORMED_FRAME, {}),
    ("4.5", "asset-total-changes", ErrorCode.MALFORMED_FRAME, {}),
    ("4.5", "asset-too-big", ErrorCode.FRAME_TOO_LARGE, {}),
    ("4.5", "asset-unfinished-at-fin", ErrorCode.MALFORMED_FRAME, {}),
]


@pytest.mark.parametrize(
    ("scenario", "code", "config"),
    [pytest.param(s, c, cfg, id=f"{sec}-{s}") for sec, s, c, cfg in VIOLATIONS],
)
async def test_violation_closes_with_spec_code(
    scenario: str, code: ErrorCode, config: dict[str, Any]
) -> None:
    log = ServerLog()
    result, error = await run_against_theta(
        lambda port: peer_options(port, scenario=scenario),
        server_config(**config),
        log,
        wait_handler=False,
    )
    # Section 4.6: "close the QUIC connection at once with an application CONNECTION_CLOSE
    # whose error code is the spec code"; a SessionClose first is optional but must agree.
    assert isinstance(error, ConnectionClosedByServer), repr(error)
    assert (error.is_application_close, error.error_code) == (True, code), (
        error,
        error.reason,
    )
    assert error.reason, "the reason phrase says what went wrong"
    assert result is not None
    assert result.server_close is None or result.server_close.code == code
    assert log.replication == []
    assert log.assets == []


async def test_zstd_size_mismatch_is_malformed() -> None:
    log = ServerLog()
    result, error = await run_against_theta(
        lambda port: peer_options(port, scenario="zstd-size-mismatch", capabilities=(CAP_ZSTD,)),
        server_config(),
        log,
        wait_handler=False,
    )
    assert isinstance(error, ConnectionClosedByServer), repr(error)
    assert (error.is_application_close, error.error_code) == (True, ErrorCode.MALFORMED_FRAME)
    assert result is not None
    assert result.acknowledge is not None
    assert result.acknowledge.capabilities == (CAP_ZSTD,)


async def test_heartbeats_are_sent_on_their_own_interval() -> None:
    # The peer sends a heartbeat every 2 s; theta must still send every 500 ms (section 4.4
    # "each side sends a Heartbeat on the control stream every interval").
    log = ServerLog()
    result, error = await run_against_theta(
        lambda port: peer_options(port, heartbeat_interval=2.0, min_server_heartbeats=4),
        server_config(),
        log,
    )
    assert error is None, repr(error)
    assert result is not None
    arrivals = result.heartbeat_arrivals
    assert len(arrivals) >= 4
    assert arrivals[3] - arrivals[0] < 1.9, arrivals
    first = result.heartbeats_received[0]
    assert first.sequence == 1
    later = result.heartbeats_received[1:4]
    # only our heartbeat 1 has been sent by then; theta echoes it with a growing hold time
    assert [b.echo_sequence for b in later] == [1, 1, 1]
    delays = [b.echo_delay_us for b in later]
    assert delays == sorted(delays)
    assert delays[-1] > 500_000


async def test_reserved_flag_bits_are_ignored() -> None:
    # Section 4.5: "When bit 0 is clear ... receivers ignore [uncompressed_size]. Other flag
    # bits are reserved: senders set them to 0, receivers ignore them."
    messages = [(1, b"reserved"), (2, b"bits")]
    log = ServerLog()
    result, error = await run_against_theta(
        lambda port: peer_options(
            port,
            replication=messages,
            replication_flags=0xFFFFFFFE,
            replication_uncompressed_size=12345,
        ),
        server_config(),
        log,
    )
    assert error is None, repr(error)
    assert result is not None
    assert log.replication == messages
    assert result.replication_payloads == messages
    assert_clean_close(result, log)


def payload_for_frame_size(size: int) -> bytes:
    """A replication payload whose frame payload (FlatBuffer) is exactly ``size`` bytes."""
    n = size - 64
    while len(spec_peer.encode_payload(spec_peer.ReplicationMessage(1, 0, bytes(n), 0))) < size:
        n += 1
    assert len(spec_peer.encode_payload(spec_peer.ReplicationMessage(1, 0, bytes(n), 0))) == size
    return os.urandom(n)


async def test_frame_of_exactly_the_limit_is_legal() -> None:
    # Section 3: "a payload of exactly the limit is legal".
    # theta receives it; it is not echoed because theta's sender reserves a fixed worst-case
    # frame overhead (a local ValueError for payloads over 1048492 bytes), which the spec
    # leaves to the implementation.
    payload = payload_for_frame_size(spec_peer.REPLICATION_LIMIT)
    log = ServerLog(echo_replication=False)
    result, error = await run_against_theta(
        lambda port: peer_options(port, replication=[(1, payload)], expect_replication_echo=False),
        server_config(),
        log,
    )
    assert error is None, repr(error)
    assert log.replication == [(1, payload)]
    assert result is not None
    assert_clean_close(result, log)


def test_peer_rejects_a_forged_acknowledge() -> None:
    """The peer's section 4.1 checks, on the section 7 handshake vector."""
    client = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    server = Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)
    peer = spec_peer.SpecPeer(PeerOptions("127.0.0.1", 1, b"", signing_key=client))
    hello = spec_peer.SessionHello(
        1,
        0x431E408540BE313B,
        bytes(range(24)),
        (2, 4, 5, 0x80000001),
        b"token-123",
        spec_peer.raw_public_key(client),
    )
    signature = bytes.fromhex(
        "7e072bfe3665faf3349a7830291f28e8c617e194d3ebae4ba861ba33a92843ec"
        "88001ec176ebfe543f8d38746e3e02a8b5b24f6eedf064be159a5ffd1601980a"
    )
    ack = spec_peer.SessionAcknowledge(
        1,
        0x431E408540BE313B,
        bytes(range(0x64, 0x7C)),
        0x0123456789ABCDEF,
        7,
        (2, 0x80000001),
        spec_peer.raw_public_key(server),
        signature,
    )
    confirm = peer._check_acknowledge(hello, ack)
    assert confirm.signature.hex().startswith("b7a6becb34219bf1")
    forged = [
        replace(ack, signature=bytes([signature[0] ^ 1]) + signature[1:]),
        replace(ack, role=3),
        replace(ack, capabilities=(0x80000001, 2)),
        replace(ack, capabilities=(2, 3)),
        replace(ack, session_id=0),
        replace(ack, nonce=bytes(23)),
        replace(ack, schema_hash=1),
    ]
    for bad in forged:
        with pytest.raises(spec_peer.SpecDeviation, match="HANDSHAKE_FAILED"):
            peer._check_acknowledge(hello, bad)


@pytest.mark.parametrize("omit_empty", [True, False], ids=["absent", "empty"])
async def test_empty_vectors_absent_or_present(omit_empty: bool) -> None:
    # Section 4.1 transcript: "u32 len || auth_token (len bytes; 0 when absent)"; the peer
    # sends empty capabilities/auth_token either as absent fields or as empty vectors.
    log = ServerLog()
    result, error = await run_against_theta(
        lambda port: peer_options(port, omit_empty=omit_empty, replication=[(0, b"")]),
        server_config(),
        log,
    )
    assert error is None, repr(error)
    assert result is not None
    assert log.replication == [(0, b"")]
    assert result.replication_payloads == [(0, b"")]
    assert_clean_close(result, log)
