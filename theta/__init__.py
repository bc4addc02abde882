"""theta — the Theta Network Protocol over QUIC, for trio.

``async with theta.connect(host, port, config) as session:`` opens a session;
``await theta.serve(handler, host, port, config)`` accepts them. The sans-IO protocol core
lives in :mod:`theta.core`, which imports no trio: the trio layer's names below are loaded
on first use, so ``import theta.core`` stays I/O-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from theta.core import (
    CAP_ZSTD,
    PROTOCOL_VERSION,
    Asset,
    AssetProgress,
    Authenticator,
    ErrorCode,
    FrameLimits,
    HandshakeFailed,
    HandshakeRejected,
    HandshakeTimeout,
    ProtocolError,
    ReplicationMessage,
    Role,
)

if TYPE_CHECKING:
    from theta._asset_channel import AssetChannel
    from theta._client import connect
    from theta._config import ClientConfig, ServerConfig
    from theta._diagnostics import DiagnosticsWatch, TransportDiagnostics
    from theta._errors import ServerUnreachable, SessionClosed
    from theta._quic import SelfSignedCertificate, TransportError, generate_self_signed_certificate
    from theta._replication_channel import ReplicationChannel
    from theta._server import Server, SessionHandler, serve
    from theta._session import Session

__version__ = "0.1.0"

_LAZY = {
    "AssetChannel": "theta._asset_channel",
    "connect": "theta._client",
    "ClientConfig": "theta._config",
    "ServerConfig": "theta._config",
    "DiagnosticsWatch": "theta._diagnostics",
    "TransportDiagnostics": "theta._diagnostics",
    "SessionClosed": "theta._errors",
    "ServerUnreachable": "theta._errors",
    "TransportError": "theta._quic",
    "SelfSignedCertificate": "theta._quic",
    "generate_self_signed_certificate": "theta._quic",
    "ReplicationChannel": "theta._replication_channel",
    "Server": "theta._server",
    "SessionHandler": "theta._server",
    "serve": "theta._server",
    "Session": "theta._session",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'theta' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY} - {"TYPE_CHECKING", "annotations", "importlib"})


__all__ = [
    "CAP_ZSTD",
    "PROTOCOL_VERSION",
    "Asset",
    "AssetChannel",
    "AssetProgress",
    "Authenticator",
    "ClientConfig",
    "DiagnosticsWatch",
    "ErrorCode",
    "FrameLimits",
    "HandshakeFailed",
    "HandshakeRejected",
    "HandshakeTimeout",
    "ProtocolError",
    "ReplicationChannel",
    "ReplicationMessage",
    "Role",
    "SelfSignedCertificate",
    "Server",
    "ServerConfig",
    "ServerUnreachable",
    "Session",
    "SessionClosed",
    "SessionHandler",
    "TransportDiagnostics",
    "TransportError",
    "__version__",
    "connect",
    "generate_self_signed_certificate",
    "serve",
]
