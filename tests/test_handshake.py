"""The handshake state machines (spec sections 4.1, 4.2, 5, 6 and the section 7 vectors)."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from theta.core import (
    Channel,
    ChannelOpen,
    ErrorCode,
    FrameDecoder,
    HandshakeFailed,
    HandshakeRejected,
    HandshakeTimeout,
    Heartbeat,
    LocalProtocolError,
    ProtocolViolation,
    Role,
    SessionAcknowledge,
    SessionConfirm,
    SessionHello,
    SessionReject,
    _handshake,
    encode_frame,
)
from theta.core._handshake import (
    ClientHandshake,
    ClientState,
    ServerHandshake,
    ServerState,
    client_signature_message,
    handshake_transcript,
    is_valid_ed25519_public_key,
    negotiate_capabilities,
    server_signature_message,
)
from theta.core._transcript import _jacobi

# --- spec section 7 handshake vector -------------------------------------------------------

CLIENT_KEY = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
SERVER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)
SCHEMA = 0x431E408540BE313B
CLIENT_NONCE = bytes(range(0x18))
SERVER_NONCE = bytes(range(0x64, 0x7C))
CLIENT_CAPS = (2, 4, 5, 0x80000001)
SERVER_CAPS = (1, 2, 3, 0x80000001)
TOKEN = b"token-123"
SESSION_ID = 0x0123456789ABCDEF
ROLE = 7
NEGOTIATED = (2, 0x80000001)
CLIENT_PUBLIC = bytes.fromhex("8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c")
SERVER_PUBLIC = bytes.fromhex("8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394")
TRANSCRIPT_SHA256 = bytes.fromhex(
    "65c5e9c66f1ea4021bd3672943c8cb9cab612ac28e870d9402f6d5ab5a275d09"
)
SERVER_SIGNATURE = bytes.fromhex(
    "7e072bfe3665faf3349a7830291f28e8c617e194d3ebae4ba861ba33a92843ec"
    "88001ec176ebfe543f8d38746e3e02a8b5b24f6eedf064be159a5ffd1601980a"
)
CLIENT_SIGNATURE = bytes.fromhex(
    "b7a6becb34219bf12949b5b0f5882ef13b1b22abca9500f4c35e9be4692aba9d"
    "5957221d240e5698c92f6bf092aa7f8957e94196074e892880aa9317b0d32206"
)

VECTOR_HELLO = SessionHello(
    protocol_version=1,
    schema_hash=SCHEMA,
    nonce=CLIENT_NONCE,
    capabilities=CLIENT_CAPS,
    auth_token=TOKEN,
    public_key=CLIENT_PUBLIC,
)
VECTOR_ACK = SessionAcknowledge(
    protocol_version=1,
    schema_hash=SCHEMA,
    nonce=SERVER_NONCE,
    session_id=SESSION_ID,
    role=ROLE,
    capabilities=NEGOTIATED,
    public_key=SERVER_PUBLIC,
    signature=SERVER_SIGNATURE,
)

OTHER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x03" * 32)
OTHER_PUBLIC = OTHER_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
# Neither is a valid encoding: y = 2 has no x; y = p (not reduced); x = 0 with the sign bit set.
INVALID_POINTS = (
    (2).to_bytes(32, "little"),
    (2**255 - 19).to_bytes(32, "little"),
    ((1 << 255) | 1).to_bytes(32, "little"),
)


def scripted(*outputs: bytes) -> Callable[[int], bytes]:
    """A ``random_bytes`` replacement returning ``outputs`` in order (lengths must match)."""
    queue: Iterator[bytes] = iter(outputs)

    def random_bytes(n: int) -> bytes:
        data = next(queue)
        assert len(data) == n, f"asked for {n} bytes, scripted {len(data)}"
        return data

    return random_bytes


def make_client(**overrides: Any) -> ClientHandshake:
    kwargs: dict[str, Any] = {
        "schema_hash": SCHEMA,
        "capabilities": CLIENT_CAPS,
        "auth_token": TOKEN,
        "signing_key": CLIENT_KEY,
        "random_bytes": scripted(CLIENT_NONCE),
    }
    return ClientHandshake(**(kwargs | overrides))


def make_server(**overrides: Any) -> ServerHandshake:
    kwargs: dict[str, Any] = {
        "schema_hash": SCHEMA,
        "capabilities": SERVER_CAPS,
        "signing_key": SERVER_KEY,
        "authenticator": lambda token, key, address: ROLE,
        "now": 0.0,
        "random_bytes": scripted(SERVER_NONCE, SESSION_ID.to_bytes(8, "big")),
    }
    return ServerHandshake(**(kwargs | overrides))


def sign_ack(ack: SessionAcknowledge, hello: SessionHello = VECTOR_HELLO) -> SessionAcknowledge:
    """``ack`` with a correct server signature over its transcript with ``hello``."""
    message = server_signature_message(handshake_transcript(hello, ack))
    return dataclasses.replace(ack, signature=SERVER_KEY.sign(message))


def _raw(**changes: Any) -> SessionAcknowledge:
    """The vector acknowledgement with ``changes`` and its original signature."""
    return dataclasses.replace(VECTOR_ACK, **changes)


def awaiting_confirm() -> ServerHandshake:
    server = make_server()
    assert server.receive(VECTOR_HELLO, 1.0) == VECTOR_ACK
    return server


def started_client(now: float = 0.0) -> ClientHandshake:
    client = make_client()
    assert client.start(now) == VECTOR_HELLO
    return client


# --- vectors ---------------------------------------------------------------------------------


def test_vector_keys_transcript_and_signatures() -> None:
    assert CLIENT_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) == CLIENT_PUBLIC
    assert SERVER_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) == SERVER_PUBLIC
    transcript = handshake_transcript(VECTOR_HELLO, VECTOR_ACK)
    assert transcript.startswith(b"theta/1 handshake\x00\x00\x01")
    assert hashlib.sha256(transcript).digest() == TRANSCRIPT_SHA256
    server_message = server_signature_message(transcript)
    client_message = client_signature_message(transcript)
    assert server_message == b"theta/1 server\x00" + TRANSCRIPT_SHA256
    assert client_message == b"theta/1 client\x00" + TRANSCRIPT_SHA256
    assert SERVER_KEY.sign(server_message) == SERVER_SIGNATURE
    assert CLIENT_KEY.sign(client_message) == CLIENT_SIGNATURE


def test_transcript_layout() -> None:
    transcript = handshake_transcript(VECTOR_HELLO, VECTOR_ACK)
    expected = b"".join(
        (
            b"theta/1 handshake\x00",
            (1).to_bytes(2, "big"),
            SCHEMA.to_bytes(8, "big"),
            CLIENT_NONCE,
            CLIENT_PUBLIC,
            (4).to_bytes(4, "big"),
            *(c.to_bytes(4, "big") for c in CLIENT_CAPS),
            len(TOKEN).to_bytes(4, "big"),
            TOKEN,
            SERVER_NONCE,
            SERVER_PUBLIC,
            SESSION_ID.to_bytes(8, "big"),
            ROLE.to_bytes(4, "big"),
            (2).to_bytes(4, "big"),
            *(c.to_bytes(4, "big") for c in NEGOTIATED),
        )
    )
    assert transcript == expected
    no_token = handshake_transcript(dataclasses.replace(VECTOR_HELLO, auth_token=b""), VECTOR_ACK)
    assert b"\x00\x00\x00\x00" + SERVER_NONCE in no_token


@pytest.mark.parametrize(
    ("hello", "ack"),
    [
        (dataclasses.replace(VECTOR_HELLO, nonce=bytes(23)), VECTOR_ACK),
        (dataclasses.replace(VECTOR_HELLO, public_key=bytes(33)), VECTOR_ACK),
        (VECTOR_HELLO, _raw(nonce=bytes(25))),
        (VECTOR_HELLO, dataclasses.replace(VECTOR_ACK, role=1 << 32)),
        (VECTOR_HELLO, dataclasses.replace(VECTOR_ACK, capabilities=(-1,))),
    ],
)
def test_transcript_refuses_fields_that_do_not_fit(
    hello: SessionHello, ack: SessionAcknowledge
) -> None:
    with pytest.raises(ValueError, match=r"must be|out of range"):
        handshake_transcript(hello, ack)


def test_full_handshake_reproduces_vectors() -> None:
    seen: list[tuple[bytes, bytes, tuple[str, int] | None]] = []

    def authenticator(token: bytes, key: bytes, address: tuple[str, int] | None) -> int:
        seen.append((token, key, address))
        return ROLE

    client = make_client()
    server = make_server(authenticator=authenticator, peer_address=("192.0.2.7", 4433))
    hello = client.start(0.0)
    assert hello == VECTOR_HELLO
    ack = server.receive(hello, 0.1)
    assert ack == VECTOR_ACK
    assert seen == [(TOKEN, CLIENT_PUBLIC, ("192.0.2.7", 4433))]
    assert server.get_timer() is not None
    confirm = client.receive(ack, 0.2)
    assert confirm == SessionConfirm(signature=CLIENT_SIGNATURE)
    assert client.state is ClientState.ESTABLISHED
    assert server.receive(confirm, 0.3) is None
    assert server.state is ServerState.ESTABLISHED
    for side in (client, server):
        assert side.is_established
        assert side.session_id == SESSION_ID
        assert side.role == Role.REPLICATE | Role.UPLOAD_ASSETS | Role.ADMIN
        assert side.negotiated_capabilities == NEGOTIATED
        assert side.client_nonce == CLIENT_NONCE
        assert side.server_nonce == SERVER_NONCE
        assert side.get_timer() is None
        assert side.error_code is None
    assert client.public_key == server.peer_public_key == CLIENT_PUBLIC
    assert server.public_key == client.peer_public_key == SERVER_PUBLIC


def test_full_handshake_over_bytes() -> None:
    """Client and server shuttle encoded frames, delivered one byte at a time."""
    client = ClientHandshake(schema_hash=SCHEMA, capabilities=CLIENT_CAPS, auth_token=TOKEN)
    server = ServerHandshake(schema_hash=SCHEMA, capabilities=SERVER_CAPS, now=0.0)
    to_server = FrameDecoder(None)  # the server's first stream is not identified yet
    to_client = FrameDecoder(Channel.CONTROL)

    def deliver(decoder: FrameDecoder, data: bytes) -> list[object]:
        return [m for i in range(len(data)) for m in decoder.feed(data[i : i + 1])]

    [hello] = deliver(to_server, encode_frame(client.start(0.0)))
    assert to_server.channel is Channel.CONTROL
    assert isinstance(hello, SessionHello)
    ack = server.receive(hello, 0.1)
    assert isinstance(ack, SessionAcknowledge)
    [received_ack] = deliver(to_client, encode_frame(ack))
    assert isinstance(received_ack, SessionAcknowledge)
    confirm = client.receive(received_ack, 0.2)
    [received_confirm] = deliver(to_server, encode_frame(confirm))
    assert isinstance(received_confirm, SessionConfirm)
    assert server.receive(received_confirm, 0.3) is None
    assert client.is_established
    assert server.is_established
    assert client.session_id == server.session_id != 0
    assert client.role == server.role == Role.REPLICATE | Role.UPLOAD_ASSETS
    assert client.negotiated_capabilities == server.negotiated_capabilities == NEGOTIATED
    assert client.peer_public_key == server.public_key
    assert server.peer_public_key == client.public_key
    assert len(client.server_nonce) == len(server.client_nonce) == 24


def test_reject_over_bytes() -> None:
    client = ClientHandshake(schema_hash=SCHEMA, capabilities=())
    server = ServerHandshake(schema_hash=SCHEMA + 1, capabilities=(), now=0.0)
    [hello] = FrameDecoder(None).feed(encode_frame(client.start(0.0)))
    assert isinstance(hello, SessionHello)
    reject = server.receive(hello, 0.1)
    assert isinstance(reject, SessionReject)
    [received] = FrameDecoder(Channel.CONTROL).feed(encode_frame(reject))
    assert isinstance(received, SessionReject)
    with pytest.raises(HandshakeRejected) as info:
        client.receive(received, 0.2)
    assert info.value.code is ErrorCode.SCHEMA_MISMATCH
    assert info.value.server_schema_hash == SCHEMA + 1


# --- capabilities ----------------------------------------------------------------------------


def test_capability_negotiation_filters_unsupported() -> None:
    assert negotiate_capabilities([2, 4, 5], {1, 2, 3}) == (2,)
    client = ClientHandshake(schema_hash=SCHEMA, capabilities=[2, 4, 5])
    server = ServerHandshake(schema_hash=SCHEMA, capabilities={1, 2, 3}, now=0.0)
    ack = server.receive(client.start(0.0), 0.0)
    assert isinstance(ack, SessionAcknowledge)
    assert ack.capabilities == (2,)
    client.receive(ack, 0.0)
    assert client.negotiated_capabilities == (2,)


@pytest.mark.parametrize(
    ("requested", "supported", "negotiated"),
    [
        ([0x80000001, 7, 2, 7, 2], [2, 7, 0x80000001, 9], (2, 7, 0x80000001)),
        ([], [1, 2], ()),
        ([1, 2], [], ()),
        ([5, 4, 3], [3, 4, 5], (3, 4, 5)),
    ],
)
def test_negotiation_is_sorted_without_duplicates(
    requested: list[int], supported: list[int], negotiated: tuple[int, ...]
) -> None:
    assert negotiate_capabilities(requested, supported) == negotiated


# --- server rules ------------------------------------------------------------------------------


def _hello(**changes: Any) -> SessionHello:
    return dataclasses.replace(VECTOR_HELLO, **changes)


SERVER_RULES = [
    pytest.param(_hello(protocol_version=2), ErrorCode.VERSION_MISMATCH, id="version"),
    pytest.param(_hello(protocol_version=0), ErrorCode.VERSION_MISMATCH, id="version-0"),
    pytest.param(_hello(schema_hash=SCHEMA ^ 1), ErrorCode.SCHEMA_MISMATCH, id="schema"),
    pytest.param(_hello(nonce=bytes(23)), ErrorCode.HANDSHAKE_FAILED, id="nonce-23"),
    pytest.param(_hello(nonce=bytes(25)), ErrorCode.HANDSHAKE_FAILED, id="nonce-25"),
    pytest.param(_hello(nonce=b""), ErrorCode.HANDSHAKE_FAILED, id="nonce-empty"),
    pytest.param(_hello(public_key=CLIENT_PUBLIC[:31]), ErrorCode.HANDSHAKE_FAILED, id="key-31"),
    pytest.param(_hello(public_key=CLIENT_PUBLIC + b"\0"), ErrorCode.HANDSHAKE_FAILED, id="key-33"),
    *(
        pytest.param(_hello(public_key=point), ErrorCode.HANDSHAKE_FAILED, id=f"bad-point-{i}")
        for i, point in enumerate(INVALID_POINTS)
    ),
    pytest.param(_hello(capabilities=tuple(range(65))), ErrorCode.MALFORMED_FRAME, id="65-caps"),
    pytest.param(_hello(auth_token=bytes(4097)), ErrorCode.MALFORMED_FRAME, id="4097-token"),
    pytest.param(_hello(auth_token=b"wrong"), ErrorCode.AUTH_FAILED, id="auth-refused"),
]


def token_authenticator(token: bytes, key: bytes, address: tuple[str, int] | None) -> int | None:
    return ROLE if token in (TOKEN, bytes(4096)) else None


@pytest.mark.parametrize(("hello", "code"), SERVER_RULES)
def test_server_rejects_bad_hello(hello: SessionHello, code: ErrorCode) -> None:
    server = make_server(authenticator=token_authenticator, protocol_version=1)
    reject = server.receive(hello, 1.0)
    assert isinstance(reject, SessionReject)
    assert reject.code == code
    assert reject.reason
    assert (reject.protocol_version, reject.schema_hash) == (1, SCHEMA)
    assert server.state is ServerState.REJECTED
    assert server.error_code is code
    assert server.get_timer() is None
    with pytest.raises(LocalProtocolError):
        server.receive(VECTOR_HELLO, 1.0)
    with pytest.raises(LocalProtocolError):
        _ = server.session_id


def test_server_reject_carries_its_own_version_and_schema() -> None:
    server = make_server(protocol_version=3, schema_hash=0xFEED)
    reject = server.receive(VECTOR_HELLO, 0.0)
    assert isinstance(reject, SessionReject)
    assert reject.code == ErrorCode.VERSION_MISMATCH
    assert (reject.protocol_version, reject.schema_hash) == (3, 0xFEED)


def test_server_accepts_inclusive_limits() -> None:
    hello = _hello(capabilities=tuple(range(64)), auth_token=bytes(4096))
    server = make_server(authenticator=token_authenticator)
    ack = server.receive(hello, 0.0)
    assert isinstance(ack, SessionAcknowledge)
    assert ack.capabilities == (1, 2, 3)


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        (
            {"protocol_version": 9, "schema_hash": 1, "nonce": b"", "auth_token": b"x" * 5000},
            ErrorCode.VERSION_MISMATCH,
        ),
        ({"schema_hash": 1, "public_key": INVALID_POINTS[0]}, ErrorCode.SCHEMA_MISMATCH),
        (
            {"nonce": bytes(3), "capabilities": tuple(range(100)), "auth_token": b"bad"},
            ErrorCode.HANDSHAKE_FAILED,
        ),
        ({"public_key": bytes(5), "auth_token": bytes(4097)}, ErrorCode.HANDSHAKE_FAILED),
        ({"capabilities": tuple(range(65)), "auth_token": b"bad"}, ErrorCode.MALFORMED_FRAME),
        ({"auth_token": bytes(4097)}, ErrorCode.MALFORMED_FRAME),
    ],
)
def test_first_failing_rule_decides(changes: dict[str, Any], code: ErrorCode) -> None:
    calls: list[bytes] = []

    def authenticator(token: bytes, key: bytes, address: tuple[str, int] | None) -> None:
        calls.append(token)

    server = make_server(authenticator=authenticator)
    reject = server.receive(_hello(**changes), 0.0)
    assert isinstance(reject, SessionReject)
    assert reject.code == code
    assert calls == []  # the authenticator only sees hellos that pass every other rule


def test_default_role_without_authenticator() -> None:
    ack = make_server(authenticator=None).receive(VECTOR_HELLO, 0.0)
    assert isinstance(ack, SessionAcknowledge)
    assert ack.role == Role.REPLICATE | Role.UPLOAD_ASSETS
    ack = make_server(authenticator=None, default_role=Role.NONE).receive(VECTOR_HELLO, 0.0)
    assert isinstance(ack, SessionAcknowledge)
    assert ack.role == 0


def test_application_role_bits_survive() -> None:
    server = make_server(authenticator=lambda token, key, address: 0xFFFF0001)
    ack = server.receive(VECTOR_HELLO, 0.0)
    assert isinstance(ack, SessionAcknowledge)
    client = started_client()
    server.receive(client.receive(ack, 0.0), 0.0)
    assert server.role == client.role == 0xFFFF0001
    assert Role.REPLICATE in client.role


def test_authenticator_exception_propagates() -> None:
    def authenticator(token: bytes, key: bytes, address: tuple[str, int] | None) -> int:
        raise KeyError("database down")

    server = make_server(authenticator=authenticator)
    with pytest.raises(KeyError):
        server.receive(VECTOR_HELLO, 0.0)
    assert server.state is ServerState.FAILED
    assert server.error_code is ErrorCode.INTERNAL_ERROR
    assert server.get_timer() is None


@pytest.mark.parametrize("role", [-1, 1 << 32])
def test_authenticator_role_out_of_range(role: int) -> None:
    server = make_server(authenticator=lambda token, key, address: role)
    with pytest.raises(LocalProtocolError, match="role"):
        server.receive(VECTOR_HELLO, 0.0)
    assert server.state is ServerState.FAILED


def test_session_id_is_never_zero() -> None:
    server = make_server(random_bytes=scripted(SERVER_NONCE, bytes(8), bytes(8), b"\0" * 7 + b"\1"))
    ack = server.receive(VECTOR_HELLO, 0.0)
    assert isinstance(ack, SessionAcknowledge)
    assert ack.session_id == 1


@pytest.mark.parametrize(
    "signature",
    [b"", CLIENT_SIGNATURE[:63], CLIENT_SIGNATURE + b"\0", bytes(64), SERVER_SIGNATURE],
)
def test_server_rejects_bad_client_signature(signature: bytes) -> None:
    server = awaiting_confirm()
    with pytest.raises(HandshakeFailed) as info:
        server.receive(SessionConfirm(signature=signature), 1.0)
    assert info.value.code is ErrorCode.HANDSHAKE_FAILED
    assert server.state is ServerState.FAILED
    assert server.error_code is ErrorCode.HANDSHAKE_FAILED
    assert server.get_timer() is None


# --- client checks -----------------------------------------------------------------------------


def _ack(**changes: Any) -> SessionAcknowledge:
    """The vector acknowledgement with ``changes``, correctly re-signed."""
    return sign_ack(dataclasses.replace(VECTOR_ACK, **changes))


CLIENT_CHECKS = [
    pytest.param(_ack(protocol_version=2), "version", id="version-echo"),
    pytest.param(_ack(schema_hash=SCHEMA + 1), "schema", id="schema-echo"),
    pytest.param(_raw(nonce=bytes(23)), "nonce", id="nonce-23"),
    pytest.param(_raw(nonce=bytes(25)), "nonce", id="nonce-25"),
    pytest.param(_raw(public_key=SERVER_PUBLIC[:31]), "public key", id="key-31"),
    pytest.param(_raw(public_key=SERVER_PUBLIC + b"\0"), "public key", id="key-33"),
    pytest.param(_ack(public_key=INVALID_POINTS[0]), "public key", id="bad-point"),
    pytest.param(
        _raw(signature=SERVER_SIGNATURE[:63]),
        "signature",
        id="signature-63",
    ),
    pytest.param(
        _raw(signature=SERVER_SIGNATURE + b"\0"),
        "signature",
        id="signature-65",
    ),
    pytest.param(_ack(capabilities=(2, 3)), "not requested", id="not-subset"),
    pytest.param(_ack(capabilities=(1,)), "not requested", id="unrequested-only"),
    pytest.param(_ack(capabilities=(0x80000001, 2)), "sorted", id="unsorted"),
    pytest.param(_ack(capabilities=(2, 2)), "sorted", id="duplicates"),
    pytest.param(_ack(session_id=0), "session id", id="session-id-0"),
    pytest.param(_raw(signature=bytes(64)), "does not verify", id="zero-sig"),
    pytest.param(_raw(signature=CLIENT_SIGNATURE), "does not verify", id="other"),
]


def test_resigned_ack_helper_is_valid() -> None:
    assert _ack() == VECTOR_ACK
    assert started_client().receive(_ack(capabilities=(4,)), 0.0).signature


@pytest.mark.parametrize(("ack", "match"), CLIENT_CHECKS)
def test_client_rejects_bad_acknowledge(ack: SessionAcknowledge, match: str) -> None:
    client = started_client()
    with pytest.raises(HandshakeFailed, match=match) as info:
        client.receive(ack, 1.0)
    assert info.value.code is ErrorCode.HANDSHAKE_FAILED
    assert client.state is ClientState.FAILED
    assert client.error_code is ErrorCode.HANDSHAKE_FAILED
    assert client.get_timer() is None
    with pytest.raises(LocalProtocolError):
        client.receive(VECTOR_ACK, 1.0)


def test_client_reports_reject() -> None:
    client = started_client()
    reject = SessionReject(
        code=ErrorCode.SCHEMA_MISMATCH, reason="schema differs", protocol_version=1, schema_hash=42
    )
    with pytest.raises(HandshakeRejected) as info:
        client.receive(reject, 1.0)
    error = info.value
    assert error.code is ErrorCode.SCHEMA_MISMATCH
    assert error.reason == "schema differs"
    assert error.server_protocol_version == 1
    assert error.server_schema_hash == 42
    assert client.state is ClientState.REJECTED
    assert client.error_code is ErrorCode.SCHEMA_MISMATCH
    assert client.reject == reject
    assert client.get_timer() is None
    with pytest.raises(LocalProtocolError):
        client.receive(VECTOR_ACK, 1.0)


@pytest.mark.parametrize("code", [0, 14, 999, 0xFFFF])
def test_client_reject_with_code_naming_no_error(code: int) -> None:
    client = started_client()
    reject = SessionReject(code=code, reason="go away", protocol_version=2, schema_hash=7)
    with pytest.raises(HandshakeRejected) as info:
        client.receive(reject, 1.0)
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert str(code) in info.value.reason
    assert "go away" in info.value.reason
    assert info.value.server_protocol_version == 2
    assert client.reject == reject
    assert client.state is ClientState.REJECTED


# --- every transcript field is bound by both signatures ----------------------------------------


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


TRANSCRIPT_TAMPERING: dict[str, Callable[[SessionHello, SessionAcknowledge], tuple[Any, Any]]] = {
    "protocol_version": lambda h, a: (dataclasses.replace(h, protocol_version=2), a),
    "schema_hash": lambda h, a: (dataclasses.replace(h, schema_hash=SCHEMA ^ 1 << 63), a),
    "client_nonce": lambda h, a: (dataclasses.replace(h, nonce=_flip(h.nonce)), a),
    "client_public_key": lambda h, a: (dataclasses.replace(h, public_key=OTHER_PUBLIC), a),
    "client_capabilities": lambda h, a: (dataclasses.replace(h, capabilities=(5, 4, 2)), a),
    "auth_token": lambda h, a: (dataclasses.replace(h, auth_token=b""), a),
    "server_nonce": lambda h, a: (h, dataclasses.replace(a, nonce=_flip(a.nonce))),
    "server_public_key": lambda h, a: (h, dataclasses.replace(a, public_key=OTHER_PUBLIC)),
    "session_id": lambda h, a: (h, dataclasses.replace(a, session_id=SESSION_ID + 1)),
    "role": lambda h, a: (h, dataclasses.replace(a, role=3)),
    "negotiated_capabilities": lambda h, a: (h, dataclasses.replace(a, capabilities=(2,))),
}


@pytest.mark.parametrize("field", sorted(TRANSCRIPT_TAMPERING))
def test_server_signature_binds_field(field: str) -> None:
    hello, ack = TRANSCRIPT_TAMPERING[field](VECTOR_HELLO, VECTOR_ACK)
    transcript = handshake_transcript(hello, ack)
    assert transcript != handshake_transcript(VECTOR_HELLO, VECTOR_ACK)
    forged = dataclasses.replace(
        VECTOR_ACK, signature=SERVER_KEY.sign(server_signature_message(transcript))
    )
    client = started_client()
    with pytest.raises(HandshakeFailed, match="signature"):
        client.receive(forged, 1.0)


@pytest.mark.parametrize("field", sorted(TRANSCRIPT_TAMPERING))
def test_client_signature_binds_field(field: str) -> None:
    hello, ack = TRANSCRIPT_TAMPERING[field](VECTOR_HELLO, VECTOR_ACK)
    signature = CLIENT_KEY.sign(client_signature_message(handshake_transcript(hello, ack)))
    server = awaiting_confirm()
    with pytest.raises(HandshakeFailed, match="signature"):
        server.receive(SessionConfirm(signature=signature), 1.0)


HELLO_IN_TRANSIT: dict[str, dict[str, Any]] = {
    "client_nonce": {"nonce": _flip(CLIENT_NONCE)},
    "client_public_key": {"public_key": OTHER_PUBLIC},
    "client_capabilities": {"capabilities": (4, 2, 5, 0x80000001)},
    "auth_token": {"auth_token": b"token-124"},
}
ACK_IN_TRANSIT: dict[str, dict[str, Any]] = {
    "server_nonce": {"nonce": _flip(SERVER_NONCE)},
    "server_public_key": {"public_key": OTHER_PUBLIC},
    "session_id": {"session_id": SESSION_ID ^ 1},
    "role": {"role": 0xFFFFFFFF},
    "negotiated_capabilities": {"capabilities": (2,)},
}


@pytest.mark.parametrize("field", sorted(HELLO_IN_TRANSIT))
def test_hello_tampered_in_transit(field: str) -> None:
    client = started_client()
    server = make_server()
    ack = server.receive(_hello(**HELLO_IN_TRANSIT[field]), 1.0)
    assert isinstance(ack, SessionAcknowledge)
    with pytest.raises(HandshakeFailed, match="signature"):
        client.receive(ack, 1.0)


@pytest.mark.parametrize("field", sorted(ACK_IN_TRANSIT))
def test_acknowledge_tampered_in_transit(field: str) -> None:
    client = started_client()
    with pytest.raises(HandshakeFailed, match="signature"):
        client.receive(dataclasses.replace(VECTOR_ACK, **ACK_IN_TRANSIT[field]), 1.0)


def test_confirm_for_another_handshake_is_rejected() -> None:
    """A confirm replayed from a previous handshake (other server nonce) does not verify."""
    server = make_server(random_bytes=scripted(bytes(24), SESSION_ID.to_bytes(8, "big")))
    ack = server.receive(VECTOR_HELLO, 0.0)
    assert isinstance(ack, SessionAcknowledge)
    with pytest.raises(HandshakeFailed):
        server.receive(SessionConfirm(signature=CLIENT_SIGNATURE), 0.0)


# --- timeouts ----------------------------------------------------------------------------------


def test_client_timeout() -> None:
    client = make_client(timeout=2.0)
    assert client.get_timer() is None
    client.handle_timer(100.0)  # not started: nothing to time out
    client.start(10.0)
    assert client.get_timer() == 12.0
    client.handle_timer(11.999)
    assert client.get_timer() == 12.0
    with pytest.raises(HandshakeTimeout) as info:
        client.handle_timer(12.0)
    assert info.value.code is ErrorCode.HANDSHAKE_TIMEOUT
    assert client.state is ClientState.FAILED
    assert client.error_code is ErrorCode.HANDSHAKE_TIMEOUT
    assert client.get_timer() is None
    client.handle_timer(20.0)  # no timer any more


def test_client_answer_after_deadline_times_out() -> None:
    client = started_client(now=0.0)
    with pytest.raises(HandshakeTimeout):
        client.receive(VECTOR_ACK, 5.0)
    assert client.state is ClientState.FAILED


def test_client_timer_stops_once_established() -> None:
    client = started_client(now=0.0)
    assert client.get_timer() == 5.0
    client.receive(VECTOR_ACK, 4.9)
    assert client.get_timer() is None
    client.handle_timer(1000.0)
    assert client.is_established


def test_server_timeout_without_hello() -> None:
    server = make_server(now=100.0, timeout=1.5)
    assert server.get_timer() == 101.5
    server.handle_timer(101.0)
    with pytest.raises(HandshakeTimeout) as info:
        server.handle_timer(102.0)
    assert info.value.code is ErrorCode.HANDSHAKE_TIMEOUT
    assert server.state is ServerState.FAILED
    assert server.error_code is ErrorCode.HANDSHAKE_TIMEOUT
    with pytest.raises(LocalProtocolError):
        server.receive(VECTOR_HELLO, 102.0)


def test_server_deadline_covers_missing_confirm() -> None:
    server = make_server(now=0.0)
    server.receive(VECTOR_HELLO, 4.0)
    assert server.get_timer() == 5.0  # unchanged by the hello: one deadline from accept
    server.handle_timer(4.99)
    with pytest.raises(HandshakeTimeout):
        server.handle_timer(5.0)
    assert server.state is ServerState.FAILED


def test_server_confirm_after_deadline_times_out() -> None:
    server = awaiting_confirm()
    with pytest.raises(HandshakeTimeout):
        server.receive(SessionConfirm(signature=CLIENT_SIGNATURE), 5.0)
    assert server.state is ServerState.FAILED


def test_server_timer_stops_once_established() -> None:
    server = awaiting_confirm()
    server.receive(SessionConfirm(signature=CLIENT_SIGNATURE), 4.99)
    assert server.get_timer() is None
    server.handle_timer(1000.0)
    assert server.is_established


# --- misuse and unexpected messages ------------------------------------------------------------


def test_client_wrong_state_calls() -> None:
    client = make_client()
    with pytest.raises(LocalProtocolError):
        client.receive(VECTOR_ACK, 0.0)
    with pytest.raises(LocalProtocolError):
        _ = client.session_id
    client.start(0.0)
    with pytest.raises(LocalProtocolError):
        client.start(0.0)
    with pytest.raises(LocalProtocolError):
        _ = client.peer_public_key
    client.receive(VECTOR_ACK, 0.0)
    with pytest.raises(LocalProtocolError):
        client.receive(VECTOR_ACK, 0.0)
    with pytest.raises(LocalProtocolError):
        client.start(0.0)
    assert client.is_established


def test_server_wrong_state_calls() -> None:
    server = make_server()
    with pytest.raises(LocalProtocolError):
        _ = server.peer_public_key
    server.receive(VECTOR_HELLO, 0.0)
    with pytest.raises(LocalProtocolError):
        _ = server.session_id  # not before the confirm verified
    server.receive(SessionConfirm(signature=CLIENT_SIGNATURE), 0.0)
    with pytest.raises(LocalProtocolError):
        server.receive(SessionConfirm(signature=CLIENT_SIGNATURE), 0.0)


@pytest.mark.parametrize(
    "message",
    [
        Heartbeat(sequence=1, sent_at_us=0),
        ChannelOpen(channel=1),
        SessionConfirm(signature=CLIENT_SIGNATURE),
        VECTOR_HELLO,
    ],
)
def test_client_unexpected_message(message: Any) -> None:
    client = started_client()
    with pytest.raises(ProtocolViolation) as info:
        client.receive(message, 0.0)
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert client.state is ClientState.FAILED


@pytest.mark.parametrize(
    ("before_hello", "message"),
    [
        (True, SessionConfirm(signature=CLIENT_SIGNATURE)),
        (True, Heartbeat(sequence=1, sent_at_us=0)),
        (True, VECTOR_ACK),
        (False, Heartbeat(sequence=1, sent_at_us=0)),
        (False, VECTOR_HELLO),
        (False, ChannelOpen(channel=2)),
    ],
)
def test_server_unexpected_message(before_hello: bool, message: Any) -> None:
    server = make_server() if before_hello else awaiting_confirm()
    with pytest.raises(ProtocolViolation) as info:
        server.receive(message, 1.0)
    assert info.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert server.state is ServerState.FAILED
    assert server.error_code is ErrorCode.PROTOCOL_VIOLATION


@pytest.mark.parametrize(
    "overrides",
    [
        {"capabilities": range(65)},
        {"capabilities": [1 << 32]},
        {"auth_token": bytes(4097)},
        {"schema_hash": 1 << 64},
        {"protocol_version": -1},
        {"timeout": 0.0},
    ],
)
def test_client_constructor_refuses_bad_arguments(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case names a different field
        make_client(**overrides)


def test_defaults_use_fresh_randomness_and_keys() -> None:
    clients = [ClientHandshake(schema_hash=0, capabilities=()) for _ in range(2)]
    hellos = [c.start(0.0) for c in clients]
    assert hellos[0].nonce != hellos[1].nonce
    assert hellos[0].public_key != hellos[1].public_key
    assert all(len(h.nonce) == 24 and is_valid_ed25519_public_key(h.public_key) for h in hellos)


# --- Ed25519 point decoding ----------------------------------------------------------------------


def _rfc8032_decodes(encoded: bytes) -> bool:
    """RFC 8032 5.1.3 step by step (square root candidate and its fix-up), as an oracle."""
    p = 2**255 - 19
    d = -121665 * pow(121666, -1, p) % p
    y = int.from_bytes(encoded, "little") & ((1 << 255) - 1)
    x_0 = encoded[31] >> 7
    if y >= p:
        return False
    u, v = (y * y - 1) % p, (d * y * y + 1) % p
    x = u * pow(v, 3, p) * pow(u * pow(v, 7, p), (p - 5) // 8, p) % p
    if v * x * x % p == (-u) % p:
        x = x * pow(2, (p - 1) // 4, p) % p
    elif v * x * x % p != u:
        return False
    return not (x == 0 and x_0 == 1)


def test_point_validation_matches_rfc8032_procedure() -> None:
    rng = random.Random(8032)
    samples = [rng.randbytes(32) for _ in range(300)]
    samples += [(y | s << 255).to_bytes(32, "little") for y in (0, 1, 2**255 - 20) for s in (0, 1)]
    samples += [
        ((2**255 - 19 + k) | s << 255).to_bytes(32, "little") for k in range(19) for s in (0, 1)
    ]
    samples += list(INVALID_POINTS)
    verdicts = [is_valid_ed25519_public_key(s) for s in samples]
    assert verdicts == [_rfc8032_decodes(s) for s in samples]
    assert 100 < sum(verdicts) < 250  # about half of random encodings are points


@pytest.mark.parametrize("prime", [3, 5, 7, 11, 13, 10007, 2**127 - 1, 2**255 - 19])
def test_jacobi_symbol_matches_eulers_criterion(prime: int) -> None:
    rng = random.Random(prime)
    values = [0, 1, 2, prime - 1, prime, prime + 2] + [rng.randrange(3 * prime) for _ in range(200)]
    for a in values:
        euler = pow(a, (prime - 1) // 2, prime)
        assert _jacobi(a, prime) == (-1 if euler == prime - 1 else euler), a


def test_generated_public_keys_are_valid_points() -> None:
    for _ in range(50):
        key = Ed25519PrivateKey.generate().public_key()
        assert is_valid_ed25519_public_key(key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    assert not is_valid_ed25519_public_key(CLIENT_PUBLIC[:31])
    assert not any(is_valid_ed25519_public_key(p) for p in INVALID_POINTS)


# --- sans-IO -------------------------------------------------------------------------------------


def test_module_is_sans_io() -> None:
    tree = ast.parse(inspect.getsource(_handshake))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert imported.isdisjoint({"trio", "anyio", "asyncio", "socket", "time", "os", "random"})
