"""Session configuration: frozen dataclasses with the wire spec's defaults."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from theta._asset_channel import DEFAULT_MAX_BUFFERED_ASSET_BYTES
from theta._quic import (
    QuicConfig,
    load_certificates,
    load_private_key,
    load_server_credentials,
    pem_bytes,
)
from theta.core import (
    CAP_ZSTD,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_MAX_ASSET_SIZE,
    PROTOCOL_VERSION,
    REPLICATION_FRAME_OVERHEAD,
    Authenticator,
    FrameLimits,
    Message,
    Role,
    SessionAcknowledge,
    SessionClose,
    SessionHello,
    canonical_manifest,
    encode_frame,
    schema_hash,
)
from theta.core._handshake import MAX_AUTH_TOKEN_LENGTH, MAX_CAPABILITIES

__all__ = ["ClientConfig", "ServerConfig"]

PemSource = bytes | str | Path
"""PEM data as ``bytes``, or the path of a PEM file."""


def _frozen_manifest(manifest: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(manifest))


def _check_int(
    name: str, value: object, minimum: int | None = None, maximum: int | None = None
) -> None:
    """``value`` must be an ``int`` (not a ``bool``) in ``minimum..maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {value!r}")
    if minimum is None:
        return
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in {minimum}..{maximum}, not {value!r}")
    if value < minimum:
        qualifier = "non-negative" if minimum == 0 else f"at least {minimum}"
        raise ValueError(f"{name} must be {qualifier}, not {value!r}")


def _check_seconds(name: str, value: object) -> None:
    """``value`` must be a positive, finite number of seconds (any real number but a
    bool): an infinite timeout would let a silent peer hold its place for ever."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{name} is out of range: {value!r}") from None
    if not seconds > 0:  # also refuses NaN
        raise ValueError(f"{name} must be positive")
    if not math.isfinite(seconds):
        raise ValueError(f"{name} must be finite")


def _payload_size(message: Message) -> int:
    return len(encode_frame(message)) - 4  # less the length prefix


_MOST_CAPABILITIES = tuple(range(2**32 - MAX_CAPABILITIES, 2**32))

# The payload of the largest legal SessionHello (64 capabilities, a 4096-byte token): the
# smallest control frame limit with which every handshake can succeed.
_LARGEST_HELLO = _payload_size(
    SessionHello(
        protocol_version=PROTOCOL_VERSION,
        schema_hash=2**64 - 1,
        nonce=bytes(24),
        capabilities=_MOST_CAPABILITIES,
        auth_token=bytes(MAX_AUTH_TOKEN_LENGTH),
        public_key=bytes(32),
    )
)

MAX_CLOSE_REASON = 1024
"""Bytes of UTF-8 a ``SessionClose`` reason is cut to when theta sends one."""

# The smallest control frame limit a client can take a theta server's frames with: the
# largest legal SessionAcknowledge (the 64 capabilities a client may request, all
# granted) or SessionClose (a reason of MAX_CLOSE_REASON bytes), whichever is larger.
_SMALLEST_CLIENT_CONTROL_LIMIT = max(
    _payload_size(
        SessionAcknowledge(
            protocol_version=PROTOCOL_VERSION,
            schema_hash=2**64 - 1,
            nonce=bytes(24),
            session_id=2**64 - 1,
            role=2**32 - 1,
            capabilities=_MOST_CAPABILITIES,
            public_key=bytes(32),
            signature=bytes(64),
        )
    ),
    _payload_size(SessionClose(0xFFFF, "x" * MAX_CLOSE_REASON)),
)


def _pem_now(config: object, name: str) -> bytes | None:
    """Check the PEM field ``name``: PEM bytes (stored as ``bytes`` and returned, to be
    parsed now) or the path of a file (read when a session starts: ``None``)."""
    data = pem_bytes(name, getattr(config, name))
    if data is not None:
        object.__setattr__(config, name, data)
    return data


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _SessionConfig:
    manifest: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """The application's component manifest (name → descriptor); its schema hash must
    match the peer's."""
    capabilities: tuple[int, ...] = (CAP_ZSTD,)
    """Client: capabilities requested, in order. Server: capabilities supported."""
    signing_key: Ed25519PrivateKey | None = None
    """This side's Ed25519 identity. When ``None``: a client uses a fresh key per
    session; a server generates one key when :func:`theta.serve` starts and signs every
    session of that server with it."""
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    frame_limits: FrameLimits = dataclasses.field(default_factory=FrameLimits)
    """Largest frame payload accepted per channel (spec section 3). Replication payloads
    sent are bounded by the replication limit less ``REPLICATION_FRAME_OVERHEAD`` (84 bytes)."""
    max_asset_size: int = DEFAULT_MAX_ASSET_SIZE
    """Largest asset accepted (``FRAME_TOO_LARGE`` beyond)."""
    asset_chunk_size: int = 64 * 1024
    """Data bytes per ``AssetChunk`` sent (capped so each frame fits the spec's default
    assets limit and this side's own ``frame_limits.assets``: a peer with a lower limit
    needs this set below it)."""
    max_buffered_asset_bytes: int = DEFAULT_MAX_BUFFERED_ASSET_BYTES
    """Declared size of all unfinished incoming assets at once, their names' UTF-8 bytes
    included (``FRAME_TOO_LARGE`` beyond): bounds what :meth:`AssetChannel.receive` holds
    in memory. Sends keep this side's unfinished assets within it too (and within the
    default), assuming the peer's is set alike."""
    receive_queue: int = 64
    """Replication messages and asset events buffered for the application before the
    session stops reading (QUIC flow control then slows the peer)."""
    receive_queue_bytes: int = 2 * 1024 * 1024
    """Bytes of replication payloads (decompressed) and of asset data and names buffered
    per channel for the application before the session stops reading, whichever of the
    two limits comes first; a message larger than this is still taken, alone."""
    idle_timeout: float = 30.0
    """QUIC idle timeout, seconds."""
    max_datagram_size: int = 1200
    """UDP payload size, 1200..65527; raise it only where the path MTU is known (e.g.
    loopback)."""
    key_log_file: str | Path | None = dataclasses.field(
        default_factory=lambda: os.environ.get("SSLKEYLOGFILE") or None
    )
    """Append TLS secrets here (SSLKEYLOGFILE format); defaults to ``$SSLKEYLOGFILE``."""

    def __post_init__(self) -> None:
        if not isinstance(self.manifest, Mapping):
            raise TypeError(f"manifest must be a mapping of str to str, not {self.manifest!r}")
        object.__setattr__(self, "manifest", _frozen_manifest(self.manifest))
        canonical_manifest(self.manifest)  # str → str entries, each within the wire's bounds
        capabilities: object = self.capabilities
        if isinstance(capabilities, str | bytes) or not hasattr(capabilities, "__iter__"):
            raise TypeError(f"capabilities must be a sequence of ints, not {capabilities!r}")
        object.__setattr__(self, "capabilities", tuple(self.capabilities))
        for capability in self.capabilities:
            if isinstance(capability, bool) or not isinstance(capability, int):
                raise TypeError(f"capability {capability!r} is not an int")
            if not 0 <= capability <= 0xFFFF_FFFF:
                raise ValueError(f"capability {capability!r} is not an unsigned 32-bit value")
        if self.signing_key is not None and not isinstance(self.signing_key, Ed25519PrivateKey):
            raise TypeError(
                f"signing_key must be an Ed25519PrivateKey or None, not {self.signing_key!r}"
            )
        for name in ("handshake_timeout", "heartbeat_interval", "heartbeat_timeout"):
            _check_seconds(name, getattr(self, name))
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.heartbeat_interval >= self.heartbeat_timeout:
            raise ValueError("heartbeat_interval must be shorter than heartbeat_timeout")
        if not isinstance(self.frame_limits, FrameLimits):
            raise TypeError(f"frame_limits must be a FrameLimits, not {self.frame_limits!r}")
        if self.frame_limits.replication <= REPLICATION_FRAME_OVERHEAD:
            raise ValueError(
                f"frame_limits.replication must be above {REPLICATION_FRAME_OVERHEAD} (the"
                " frame bytes around a replication payload), not"
                f" {self.frame_limits.replication}"
            )
        _check_int("max_asset_size", self.max_asset_size, 0)
        _check_int("asset_chunk_size", self.asset_chunk_size, 1, 1024 * 1024)
        _check_int("max_buffered_asset_bytes", self.max_buffered_asset_bytes, 0)
        _check_int("receive_queue", self.receive_queue, 1)
        _check_int("receive_queue_bytes", self.receive_queue_bytes, 1)
        _check_seconds("idle_timeout", self.idle_timeout)
        object.__setattr__(self, "idle_timeout", float(self.idle_timeout))
        _check_int("max_datagram_size", self.max_datagram_size)
        if not isinstance(self.key_log_file, str | Path | None):
            raise TypeError(f"key_log_file must be a path or None, not {self.key_log_file!r}")
        # The QUIC layer's own bounds (e.g. max_datagram_size), checked now rather than by
        # every connect() or serve().
        QuicConfig(
            idle_timeout=self.idle_timeout,
            handshake_timeout=self.handshake_timeout,
            max_datagram_size=self.max_datagram_size,
        )

    @property
    def schema_hash(self) -> int:
        """The schema hash of :attr:`manifest` (spec section 4.3)."""
        return schema_hash(self.manifest)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig(_SessionConfig):
    """How :func:`theta.connect` connects and authenticates.

    The server certificate is verified against ``ca_certs`` (PEM bytes or a file) or the
    system roots, and against ``server_name`` (default: the host connected to).
    ``insecure_skip_verify_for_tests`` disables verification and logs a warning.

    A value no session could use (wrong type, out of the wire's range) raises ``TypeError``
    or ``ValueError`` naming the field when the configuration is built.
    """

    ca_certs: PemSource | None = None
    """Trust anchors: PEM bytes (parsed when the configuration is built) or the path of a
    PEM file (``str`` or ``Path``, read when a session starts); ``None``: the system's."""
    server_name: str | None = None
    insecure_skip_verify_for_tests: bool = False
    auth_token: bytes = b""
    """Sent in ``SessionHello`` for the server's authenticator (at most 4096 bytes)."""

    def __post_init__(self) -> None:
        _SessionConfig.__post_init__(self)
        if not isinstance(self.insecure_skip_verify_for_tests, bool):
            raise TypeError(
                "insecure_skip_verify_for_tests must be a bool,"
                f" not {self.insecure_skip_verify_for_tests!r}"
            )
        if not isinstance(self.server_name, str | None):
            raise TypeError(f"server_name must be a str or None, not {self.server_name!r}")
        if self.ca_certs is not None and (ca_certs := _pem_now(self, "ca_certs")) is not None:
            load_certificates("ca_certs", ca_certs)
        if len(self.capabilities) > MAX_CAPABILITIES:
            raise ValueError(
                f"capabilities must hold at most {MAX_CAPABILITIES} values,"
                f" not {len(self.capabilities)}"
            )
        if self.frame_limits.control < _SMALLEST_CLIENT_CONTROL_LIMIT:
            raise ValueError(
                f"frame_limits.control must be at least {_SMALLEST_CLIENT_CONTROL_LIMIT} (the"
                " largest SessionAcknowledge or SessionClose a theta server sends), not"
                f" {self.frame_limits.control}"
            )
        if not isinstance(self.auth_token, bytes | bytearray | memoryview):
            raise TypeError(f"auth_token must be bytes-like, not {type(self.auth_token).__name__}")
        object.__setattr__(self, "auth_token", bytes(self.auth_token))
        if len(self.auth_token) > MAX_AUTH_TOKEN_LENGTH:
            raise ValueError(
                f"auth_token must be at most {MAX_AUTH_TOKEN_LENGTH} bytes,"
                f" not {len(self.auth_token)}"
            )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig(_SessionConfig):
    """How :func:`theta.serve` accepts sessions.

    ``authenticator(token, client_public_key, client_address)`` returns the client's role
    mask, or ``None`` to refuse (``AUTH_FAILED``); without one every client gets
    ``default_role``. It runs synchronously during the handshake: keep it fast.

    A value no session could use (wrong type, out of the wire's range) raises ``TypeError``
    or ``ValueError`` naming the field when the configuration is built.
    """

    certificate: PemSource
    """Certificate chain (leaf first): PEM bytes, or the path of a PEM file (``str`` or
    ``Path``, read when :func:`theta.serve` starts)."""
    private_key: PemSource
    """The leaf's private key (unencrypted), PEM bytes or a path. Given as bytes, both are
    checked when the configuration is built (from files, when ``serve`` starts):
    ``ValueError`` if either does not parse or the key is not the leaf's."""
    authenticator: Authenticator | None = None
    default_role: Role | int = Role.REPLICATE | Role.UPLOAD_ASSETS
    """The role mask (unsigned 32-bit) of every client when there is no authenticator."""
    max_sessions: int = 1024
    """Connections alive at once. Beyond it the transport drops new clients' Initials
    without a reply (no state, no crypto): such a client keeps retrying and gets in when a
    place frees up, or fails with ``ServerUnreachable`` at its handshake timeout. No
    ``SERVER_BUSY`` is sent, which would take a full QUIC handshake per refusal."""
    max_handshakes: int = 256
    """Connections still handshaking at once (the same silent drop beyond it)."""
    address_validation: str = "under_load"
    """When a new client must first prove its address with a QUIC Retry round trip, before
    the server keeps any state or does any cryptography for it: ``"always"``, ``"never"``,
    or ``"under_load"`` (once half of ``max_handshakes`` are in progress), so that
    Initials with forged source addresses cannot take the remaining handshake places."""

    def __post_init__(self) -> None:
        _SessionConfig.__post_init__(self)
        if self.authenticator is not None and not callable(self.authenticator):
            raise TypeError(f"authenticator must be callable, not {self.authenticator!r}")
        certificate, private_key = _pem_now(self, "certificate"), _pem_now(self, "private_key")
        if certificate is not None and private_key is not None:
            load_server_credentials(certificate, private_key)
        elif certificate is not None:  # the key is a file: matched when serve starts
            load_certificates("certificate", certificate)
        elif private_key is not None:
            load_private_key(private_key)
        _check_int("default_role", self.default_role, 0, 0xFFFF_FFFF)
        if self.frame_limits.control < _LARGEST_HELLO:
            raise ValueError(
                f"frame_limits.control must be at least {_LARGEST_HELLO} (the largest"
                f" SessionHello a client may send), not {self.frame_limits.control}"
            )
        _check_int("max_sessions", self.max_sessions, 1)
        _check_int("max_handshakes", self.max_handshakes, 1)
        QuicConfig(address_validation=self.address_validation)  # the QUIC layer checks it
