"""From session configuration to the QUIC driver's."""

from __future__ import annotations

from theta._config import ClientConfig, ServerConfig
from theta._quic import QuicConfig

__all__ = ["client_quic_config", "server_quic_config"]


def client_quic_config(config: ClientConfig) -> QuicConfig:
    """The QUIC settings of a client session."""
    return QuicConfig(
        ca_certs=config.ca_certs,
        server_name=config.server_name,
        insecure_skip_verify_for_tests=config.insecure_skip_verify_for_tests,
        key_log_file=config.key_log_file,
        idle_timeout=config.idle_timeout,
        handshake_timeout=config.handshake_timeout,
        max_datagram_size=config.max_datagram_size,
    )


def server_quic_config(config: ServerConfig) -> QuicConfig:
    """The QUIC settings of a server."""
    return QuicConfig(
        certificate=config.certificate,
        private_key=config.private_key,
        key_log_file=config.key_log_file,
        idle_timeout=config.idle_timeout,
        handshake_timeout=config.handshake_timeout,
        max_datagram_size=config.max_datagram_size,
        max_connections=config.max_sessions,
        max_handshakes=config.max_handshakes,
        address_validation=config.address_validation,
    )
