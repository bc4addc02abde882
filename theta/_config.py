"""Session configuration: frozen dataclasses with the wire spec's defaults."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from theta.core import (
    CAP_ZSTD,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    Authenticator,
    FrameLimits,
    Role,
    schema_hash,
)

__all__ = ["ClientConfig", "ServerConfig"]

PemSource = bytes | str | Path
"""PEM data as ``bytes``, or the path of a PEM file."""


def _frozen_manifest(manifest: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(manifest))


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
    """Largest frame payload accepted per channel (spec section 3)."""
    max_asset_size: int = 64 * 1024 * 1024
    """Largest asset accepted (``FRAME_TOO_LARGE`` beyond)."""
    asset_chunk_size: int = 64 * 1024
    """Data bytes per ``AssetChunk`` sent (capped so each frame fits the peer's default
    assets limit)."""
    max_buffered_asset_bytes: int = 256 * 1024 * 1024
    """Declared size of all unfinished incoming assets at once (``FRAME_TOO_LARGE``
    beyond): bounds what :meth:`AssetChannel.receive` holds in memory."""
    receive_queue: int = 64
    """Replication messages and asset events buffered for the application before the
    session stops reading (QUIC flow control then slows the peer)."""
    idle_timeout: float = 30.0
    """QUIC idle timeout, seconds."""
    max_datagram_size: int = 1200
    """UDP payload size; raise it only where the path MTU is known (e.g. loopback)."""
    key_log_file: str | Path | None = dataclasses.field(
        default_factory=lambda: os.environ.get("SSLKEYLOGFILE") or None
    )
    """Append TLS secrets here (SSLKEYLOGFILE format); defaults to ``$SSLKEYLOGFILE``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifest", _frozen_manifest(self.manifest))
        object.__setattr__(self, "capabilities", tuple(self.capabilities))
        for name in ("handshake_timeout", "heartbeat_interval", "heartbeat_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.heartbeat_interval >= self.heartbeat_timeout:
            raise ValueError("heartbeat_interval must be shorter than heartbeat_timeout")
        if not 1 <= self.asset_chunk_size <= 1024 * 1024:
            raise ValueError("asset_chunk_size must be in 1..1048576")
        if self.receive_queue < 1:
            raise ValueError("receive_queue must be at least 1")
        for capability in self.capabilities:
            if not 0 <= capability <= 0xFFFF_FFFF:
                raise ValueError(f"capability {capability!r} is not an unsigned 32-bit value")

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
    """

    ca_certs: PemSource | None = None
    server_name: str | None = None
    insecure_skip_verify_for_tests: bool = False
    auth_token: bytes = b""
    """Sent in ``SessionHello`` for the server's authenticator (at most 4096 bytes)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig(_SessionConfig):
    """How :func:`theta.serve` accepts sessions.

    ``authenticator(token, client_public_key, client_address)`` returns the client's role
    mask, or ``None`` to refuse (``AUTH_FAILED``); without one every client gets
    ``default_role``. It runs synchronously during the handshake: keep it fast.
    """

    certificate: PemSource
    """Certificate chain (leaf first), PEM bytes or path."""
    private_key: PemSource
    """The leaf's private key, PEM bytes or path (unencrypted)."""
    authenticator: Authenticator | None = None
    default_role: Role | int = Role.REPLICATE | Role.UPLOAD_ASSETS
    max_sessions: int = 1024
    """Connections alive at once; new ones beyond are refused by the transport."""
    max_handshakes: int = 256
    """Connections still handshaking at once."""
