"""trio driver for QUIC (private): connections, streams and endpoints over aioquic.

The session layer depends only on this surface: :func:`open_quic_connection`,
:func:`serve_quic`, :class:`QuicConnection` (open/accept streams, close with a code,
stats), :class:`QuicStream` (a ``trio.abc.HalfCloseableStream``), :class:`QuicConfig` and
the exceptions. Nothing outside ``_engine`` imports the QUIC engine.
"""

from ._api import ConnectionHandler, QuicServer, open_quic_connection, serve_quic
from ._certs import (
    SelfSignedCertificate,
    generate_self_signed_certificate,
    load_certificates,
    load_private_key,
    load_server_credentials,
    pem_bytes,
)
from ._config import ALPN, QuicConfig, check_port
from ._connection import QuicConnection, truncate_utf8
from ._errors import (
    QUIC_INTERNAL_ERROR,
    ConnectionClosedByPeer,
    ConnectionRefused,
    HandshakeTimeout,
    IdleTimeout,
    NameResolutionTimeout,
    QuicConnectionError,
    StreamResetError,
    StreamStoppedError,
    TransportError,
)
from ._stats import ConnectionStats, EngineStats
from ._stream import QuicStream

__all__ = [
    "ALPN",
    "QUIC_INTERNAL_ERROR",
    "ConnectionClosedByPeer",
    "ConnectionHandler",
    "ConnectionRefused",
    "ConnectionStats",
    "EngineStats",
    "HandshakeTimeout",
    "IdleTimeout",
    "NameResolutionTimeout",
    "QuicConfig",
    "QuicConnection",
    "QuicConnectionError",
    "QuicServer",
    "QuicStream",
    "SelfSignedCertificate",
    "StreamResetError",
    "StreamStoppedError",
    "TransportError",
    "check_port",
    "generate_self_signed_certificate",
    "load_certificates",
    "load_private_key",
    "load_server_credentials",
    "open_quic_connection",
    "pem_bytes",
    "serve_quic",
    "truncate_utf8",
]
