"""Sans-IO handshake state machines (wire spec sections 4.1 and 4.2).

Theory of operation: the machines exchange message dataclasses (the codec makes bytes, the
driver moves them) and never read a clock; methods that need time take ``now`` in seconds.

* Client: ``start(now)`` returns the ``SessionHello`` and arms the deadline; ``receive()`` of
  the answer returns the ``SessionConfirm`` to send (the client is then done) or raises
  :class:`HandshakeRejected` / :class:`HandshakeFailed`.
* Server: built when the connection is accepted (which arms the deadline); ``receive()`` of
  the hello returns the ``SessionAcknowledge``, or a ``SessionReject`` to send before closing
  with :attr:`~ServerHandshake.error_code`; ``receive()`` of the confirm verifies it.
* Both: ``get_timer()`` is the running deadline; ``handle_timer(now)`` and ``receive(..., now)``
  raise :class:`HandshakeTimeout` once ``now`` reaches it. Every :class:`ProtocolError` raised
  leaves the machine FAILED; a call that makes no sense in the current state raises
  :class:`LocalProtocolError`.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import secrets
from collections.abc import Callable, Iterable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ._errors import (
    ErrorCode,
    HandshakeFailed,
    HandshakeRejected,
    HandshakeTimeout,
    LocalProtocolError,
    ProtocolError,
    ProtocolViolation,
)
from ._messages import (
    PROTOCOL_VERSION,
    Message,
    Role,
    SessionAcknowledge,
    SessionConfirm,
    SessionHello,
    SessionReject,
)
from ._transcript import (
    NONCE_LENGTH,
    SIGNATURE_LENGTH,
    client_signature_message,
    handshake_transcript,
    is_valid_ed25519_public_key,
    negotiate_capabilities,
    server_signature_message,
    signature_is_valid,
)

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "MAX_AUTH_TOKEN_LENGTH",
    "MAX_CAPABILITIES",
    "NONCE_LENGTH",
    "Authenticator",
    "ClientHandshake",
    "ClientState",
    "ServerHandshake",
    "ServerState",
    "client_signature_message",
    "handshake_transcript",
    "is_valid_ed25519_public_key",
    "negotiate_capabilities",
    "server_signature_message",
]

MAX_CAPABILITIES = 64
"""Most capabilities a ``SessionHello`` may carry (inclusive)."""
MAX_AUTH_TOKEN_LENGTH = 4096
"""Longest ``auth_token`` a ``SessionHello`` may carry, in bytes (inclusive)."""
DEFAULT_HANDSHAKE_TIMEOUT = 5.0

Authenticator = Callable[[bytes, bytes, tuple[str, int] | None], int | None]
"""``(auth_token, peer_public_key, peer_address) -> role mask``, or ``None`` to refuse."""

_U16, _U32, _U64 = 1 << 16, 1 << 32, 1 << 64
_REJECT_CODES = frozenset(int(c) for c in ErrorCode if c is not ErrorCode.NO_ERROR)


def _uint(value: int, bound: int, what: str) -> int:
    if not 0 <= value < bound:
        raise ValueError(f"{what} out of range: {value!r}")
    return value


class _Handshake(abc.ABC):
    """What both sides share: own key, randomness, deadline, the outcome."""

    def __init__(
        self,
        signing_key: Ed25519PrivateKey | None,
        timeout: float,
        random_bytes: Callable[[int], bytes],
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self._key = Ed25519PrivateKey.generate() if signing_key is None else signing_key
        self._public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._timeout = timeout
        self._random_bytes = random_bytes
        self._deadline: float | None = None
        self._hello: SessionHello | None = None
        self._ack: SessionAcknowledge | None = None
        self._transcript = b""
        self.error_code: ErrorCode | None = None
        """The code to close the connection with, once the handshake failed or was refused."""

    @abc.abstractmethod
    def _enter_failed(self) -> None: ...

    @property
    @abc.abstractmethod
    def is_established(self) -> bool:
        """Whether the handshake completed successfully for this side."""

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        """Enter FAILED with ``exc`` as the outcome; return it for raising."""
        self._deadline = None
        self.error_code = exc.code
        self._enter_failed()
        return exc

    def _result(self) -> tuple[SessionHello, SessionAcknowledge]:
        if not self.is_established or self._hello is None or self._ack is None:
            raise LocalProtocolError("the handshake has not completed")
        return self._hello, self._ack

    @property
    def public_key(self) -> bytes:
        """This side's raw 32-byte Ed25519 public key."""
        return self._public_key

    @property
    def session_id(self) -> int:
        """The session id the server chose (after success)."""
        return self._result()[1].session_id

    @property
    def role(self) -> Role:
        """The role mask the server assigned (after success); may hold application bits."""
        return Role(self._result()[1].role)

    @property
    def negotiated_capabilities(self) -> tuple[int, ...]:
        """The negotiated capabilities, sorted ascending (after success)."""
        return self._result()[1].capabilities

    @property
    def client_nonce(self) -> bytes:
        """The client's nonce (after success)."""
        return self._result()[0].nonce

    @property
    def server_nonce(self) -> bytes:
        """The server's nonce (after success)."""
        return self._result()[1].nonce

    def get_timer(self) -> float | None:
        """The handshake deadline while one is running, else ``None``."""
        return self._deadline

    def handle_timer(self, now: float) -> None:
        """Raise :class:`HandshakeTimeout` if ``now`` reached the deadline, else do nothing."""
        if self._deadline is not None and now >= self._deadline:
            raise self._fail(HandshakeTimeout("handshake did not complete in time"))


class ClientState(enum.Enum):
    """States of :class:`ClientHandshake`."""

    IDLE = enum.auto()
    AWAIT_RESPONSE = enum.auto()
    ESTABLISHED = enum.auto()
    REJECTED = enum.auto()
    FAILED = enum.auto()


class ClientHandshake(_Handshake):
    """The client side: ``start()``, then ``receive()`` the server's answer.

    ``random_bytes`` (source of the client nonce) exists for tests only.
    """

    def __init__(
        self,
        *,
        schema_hash: int,
        capabilities: Sequence[int],
        auth_token: bytes = b"",
        signing_key: Ed25519PrivateKey | None = None,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        protocol_version: int = PROTOCOL_VERSION,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        super().__init__(signing_key, timeout, random_bytes)
        self._schema_hash = _uint(schema_hash, _U64, "schema_hash")
        self._protocol_version = _uint(protocol_version, _U16, "protocol_version")
        self._capabilities = tuple(_uint(c, _U32, "capability") for c in capabilities)
        if len(self._capabilities) > MAX_CAPABILITIES:
            raise ValueError(f"at most {MAX_CAPABILITIES} capabilities may be requested")
        if len(auth_token) > MAX_AUTH_TOKEN_LENGTH:
            raise ValueError(f"auth_token is longer than {MAX_AUTH_TOKEN_LENGTH} bytes")
        self._auth_token = bytes(auth_token)
        self.state = ClientState.IDLE
        self.reject: SessionReject | None = None
        """The server's ``SessionReject`` as received, once rejected."""

    def _enter_failed(self) -> None:
        self.state = ClientState.FAILED

    @property
    def is_established(self) -> bool:
        """Whether the acknowledgement verified (the confirm was produced)."""
        return self.state is ClientState.ESTABLISHED

    @property
    def peer_public_key(self) -> bytes:
        """The server's raw Ed25519 public key (after success)."""
        return self._result()[1].public_key

    def start(self, now: float) -> SessionHello:
        """Return the ``SessionHello`` to send and arm the deadline at ``now + timeout``."""
        if self.state is not ClientState.IDLE:
            raise LocalProtocolError(f"start() called in state {self.state.name}")
        self._hello = SessionHello(
            protocol_version=self._protocol_version,
            schema_hash=self._schema_hash,
            nonce=self._random_bytes(NONCE_LENGTH),
            capabilities=self._capabilities,
            auth_token=self._auth_token,
            public_key=self._public_key,
        )
        self._deadline = now + self._timeout
        self.state = ClientState.AWAIT_RESPONSE
        return self._hello

    def receive(self, message: Message, now: float) -> SessionConfirm:
        """Verify the server's answer and return the ``SessionConfirm`` to send.

        Raises :class:`HandshakeRejected` for a ``SessionReject``, :class:`HandshakeFailed`
        when a check fails, :class:`ProtocolViolation` for any other message and
        :class:`HandshakeTimeout` when ``now`` is at or past the deadline. A reject code that
        names no error (unknown, or ``NO_ERROR``) is reported as ``PROTOCOL_VIOLATION`` with
        the number in the reason; :attr:`reject` keeps the message as received.
        """
        if self.state is not ClientState.AWAIT_RESPONSE:
            raise LocalProtocolError(f"receive() called in state {self.state.name}")
        self.handle_timer(now)
        if isinstance(message, SessionReject):
            raise self._rejected(message)
        if not isinstance(message, SessionAcknowledge):
            name = type(message).__name__
            raise self._fail(ProtocolViolation(f"expected SessionAcknowledge, got {name}"))
        problem = self._check_ack(message)
        if problem is not None:
            raise self._fail(HandshakeFailed(problem))
        self._ack, self._deadline = message, None
        self.state = ClientState.ESTABLISHED
        return SessionConfirm(signature=self._key.sign(client_signature_message(self._transcript)))

    def _rejected(self, reject: SessionReject) -> HandshakeRejected:
        self.reject, self._deadline = reject, None
        self.state = ClientState.REJECTED
        code, reason = ErrorCode.PROTOCOL_VIOLATION, f"(code {reject.code}) {reject.reason}"
        if reject.code in _REJECT_CODES:
            code, reason = ErrorCode(reject.code), reject.reason
        self.error_code = code
        return HandshakeRejected(
            reason,
            code,
            server_protocol_version=reject.protocol_version,
            server_schema_hash=reject.schema_hash,
        )

    def _check_ack(self, ack: SessionAcknowledge) -> str | None:
        """The first problem with ``ack`` (spec section 4.1), or ``None``."""
        if ack.protocol_version != self._protocol_version:
            return f"protocol version echo {ack.protocol_version} != {self._protocol_version}"
        if ack.schema_hash != self._schema_hash:
            return f"schema hash echo {ack.schema_hash:#x} != {self._schema_hash:#x}"
        if len(ack.nonce) != NONCE_LENGTH:
            return f"server nonce is {len(ack.nonce)} bytes, not {NONCE_LENGTH}"
        if not is_valid_ed25519_public_key(ack.public_key):
            return "server public key is not 32 bytes encoding an Ed25519 point"
        if len(ack.signature) != SIGNATURE_LENGTH:
            return f"server signature is {len(ack.signature)} bytes, not {SIGNATURE_LENGTH}"
        if not set(ack.capabilities) <= set(self._capabilities):
            return "negotiated capabilities include some that were not requested"
        if list(ack.capabilities) != sorted(set(ack.capabilities)):
            return "negotiated capabilities are not sorted ascending without duplicates"
        if ack.session_id == 0:
            return "session id is 0"
        assert self._hello is not None
        self._transcript = handshake_transcript(self._hello, ack)
        if not signature_is_valid(
            ack.public_key, ack.signature, server_signature_message(self._transcript)
        ):
            return "server signature does not verify"
        return None


class ServerState(enum.Enum):
    """States of :class:`ServerHandshake`."""

    AWAIT_HELLO = enum.auto()
    AWAIT_CONFIRM = enum.auto()
    ESTABLISHED = enum.auto()
    REJECTED = enum.auto()
    FAILED = enum.auto()


class ServerHandshake(_Handshake):
    """The server side for one connection accepted at ``now``.

    ``authenticator(auth_token, client_public_key, peer_address)`` returns the client's role
    mask, or ``None`` to refuse (``AUTH_FAILED``); without one every client gets
    ``default_role``. If the authenticator raises, the exception propagates and the machine
    is FAILED with :attr:`error_code` ``INTERNAL_ERROR``. ``random_bytes`` (source of the
    server nonce and session id) exists for tests only.
    """

    def __init__(
        self,
        *,
        schema_hash: int,
        capabilities: Iterable[int],
        now: float,
        signing_key: Ed25519PrivateKey | None = None,
        authenticator: Authenticator | None = None,
        default_role: int = Role.REPLICATE | Role.UPLOAD_ASSETS,
        peer_address: tuple[str, int] | None = None,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        protocol_version: int = PROTOCOL_VERSION,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        super().__init__(signing_key, timeout, random_bytes)
        self._schema_hash = _uint(schema_hash, _U64, "schema_hash")
        self._protocol_version = _uint(protocol_version, _U16, "protocol_version")
        self._supported = frozenset(_uint(c, _U32, "capability") for c in capabilities)
        self._authenticator = authenticator
        self._default_role = _uint(int(default_role), _U32, "default_role")
        self._peer_address = peer_address
        self._deadline = now + timeout
        self.state = ServerState.AWAIT_HELLO

    def _enter_failed(self) -> None:
        self.state = ServerState.FAILED

    @property
    def is_established(self) -> bool:
        """Whether the client's ``SessionConfirm`` verified."""
        return self.state is ServerState.ESTABLISHED

    @property
    def peer_public_key(self) -> bytes:
        """The client's raw Ed25519 public key (after success)."""
        return self._result()[0].public_key

    def receive(self, message: Message, now: float) -> SessionAcknowledge | SessionReject | None:
        """Process a client message; return the answer to a ``SessionHello``, or ``None``
        once the ``SessionConfirm`` verified.

        A refused hello returns a ``SessionReject`` and sets :attr:`error_code`. Raises
        :class:`HandshakeFailed` for a bad confirm, :class:`ProtocolViolation` for any other
        message and :class:`HandshakeTimeout` at or past the deadline;
        :class:`LocalProtocolError` once the handshake is over (established or not).
        """
        if self.state not in (ServerState.AWAIT_HELLO, ServerState.AWAIT_CONFIRM):
            raise LocalProtocolError(f"receive() called in state {self.state.name}")
        self.handle_timer(now)
        if self.state is ServerState.AWAIT_HELLO and isinstance(message, SessionHello):
            return self._on_hello(message)
        if self.state is ServerState.AWAIT_CONFIRM and isinstance(message, SessionConfirm):
            assert self._hello is not None
            signed = client_signature_message(self._transcript)
            if not signature_is_valid(self._hello.public_key, message.signature, signed):
                raise self._fail(HandshakeFailed("client signature does not verify"))
            self._deadline = None
            self.state = ServerState.ESTABLISHED
            return None
        name, state = type(message).__name__, self.state.name
        raise self._fail(ProtocolViolation(f"unexpected {name} in state {state}"))

    def _on_hello(self, hello: SessionHello) -> SessionAcknowledge | SessionReject:
        refusal = self._check_hello(hello)
        if refusal is None:
            role = self._authenticate(hello)
            if role is not None:
                return self._accept(hello, role)
            refusal = (ErrorCode.AUTH_FAILED, "authentication failed")
        code, reason = refusal
        self._deadline, self.error_code = None, code
        self.state = ServerState.REJECTED
        return SessionReject(
            code=code,
            reason=reason,
            protocol_version=self._protocol_version,
            schema_hash=self._schema_hash,
        )

    def _check_hello(self, hello: SessionHello) -> tuple[ErrorCode, str] | None:
        """The first SessionHello rule, in spec order, that ``hello`` breaks, or ``None``."""
        if hello.protocol_version != self._protocol_version:
            return ErrorCode.VERSION_MISMATCH, f"protocol version {hello.protocol_version}"
        if hello.schema_hash != self._schema_hash:
            return ErrorCode.SCHEMA_MISMATCH, f"schema hash {hello.schema_hash:#018x}"
        if len(hello.nonce) != NONCE_LENGTH:
            return ErrorCode.HANDSHAKE_FAILED, f"client nonce must be {NONCE_LENGTH} bytes"
        if not is_valid_ed25519_public_key(hello.public_key):
            return ErrorCode.HANDSHAKE_FAILED, "client public key is not an Ed25519 point"
        if len(hello.capabilities) > MAX_CAPABILITIES:
            return ErrorCode.MALFORMED_FRAME, f"more than {MAX_CAPABILITIES} capabilities"
        if len(hello.auth_token) > MAX_AUTH_TOKEN_LENGTH:
            return ErrorCode.MALFORMED_FRAME, f"auth token over {MAX_AUTH_TOKEN_LENGTH} bytes"
        return None

    def _authenticate(self, hello: SessionHello) -> int | None:
        if self._authenticator is None:
            return self._default_role
        try:
            role = self._authenticator(hello.auth_token, hello.public_key, self._peer_address)
            if role is not None and not 0 <= role < _U32:
                raise LocalProtocolError(f"authenticator returned role {role!r} (not a u32)")
        except BaseException:
            self._deadline, self.error_code = None, ErrorCode.INTERNAL_ERROR
            self._enter_failed()
            raise
        return None if role is None else int(role)

    def _accept(self, hello: SessionHello, role: int) -> SessionAcknowledge:
        session_id = 0
        nonce = self._random_bytes(NONCE_LENGTH)
        while session_id == 0:
            session_id = int.from_bytes(self._random_bytes(8), "big")
        unsigned = SessionAcknowledge(
            protocol_version=self._protocol_version,
            schema_hash=self._schema_hash,
            nonce=nonce,
            session_id=session_id,
            role=role,
            capabilities=negotiate_capabilities(hello.capabilities, self._supported),
            public_key=self._public_key,
            signature=b"",
        )
        self._transcript = handshake_transcript(hello, unsigned)
        signature = self._key.sign(server_signature_message(self._transcript))
        self._hello, self._ack = hello, dataclasses.replace(unsigned, signature=signature)
        self.state = ServerState.AWAIT_CONFIRM
        return self._ack
