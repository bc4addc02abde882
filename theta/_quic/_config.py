"""Configuration of the QUIC driver (engine-neutral: no aioquic import here)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

#: The only ALPN protocol a Theta v1 peer offers or accepts (wire spec, section 1).
ALPN = "theta/1"

#: QUIC version 1 (RFC 9000).
QUIC_VERSION_1 = 0x00000001

#: Bounds of ``max_datagram_size``: every QUIC path carries 1200-byte datagrams (RFC 9000,
#: section 14); 65527 is the largest ``max_udp_payload_size`` a peer may announce.
MIN_DATAGRAM_SIZE, MAX_DATAGRAM_SIZE = 1200, 65527

#: When a server validates client addresses with Retry (``QuicConfig.address_validation``).
ADDRESS_VALIDATION = ("always", "under_load", "never")

PemSource = bytes | str | Path
"""PEM data as ``bytes``, or the path of a PEM file as ``str`` or ``Path``."""


def check_port(port: object, *, allow_zero: bool) -> None:
    """Refuse a ``port`` that is not an ``int`` (``TypeError``) or not a UDP port
    (``ValueError``): 1..65535, or 0..65535 with ``allow_zero`` (0: any free port).

    ``getaddrinfo`` would silently take a port above 65535 modulo 65536.
    """
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, not {port!r}")
    lowest = 0 if allow_zero else 1
    if not lowest <= port <= 0xFFFF:
        raise ValueError(f"port must be in {lowest}..65535, not {port}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QuicConfig:
    """Everything the driver needs to know to run one endpoint (client or server).

    Client trust: by default the server certificate is verified against the system roots
    (``ca_certs=None``) or against ``ca_certs`` (PEM bytes or a file path), and its name
    against ``server_name`` (defaults to the host passed to ``open_quic_connection``).
    ``insecure_skip_verify_for_tests`` turns verification off; it logs a warning every time a
    configuration is built with it, and exists for tests only.
    """

    # --- TLS ---
    certificate: PemSource | None = None
    """Server: certificate chain (leaf first), PEM bytes or path."""
    private_key: PemSource | None = None
    """Server: private key of the leaf, PEM bytes or path (unencrypted)."""
    ca_certs: PemSource | None = None
    """Client: trust anchors, PEM bytes or path; ``None`` means the system roots."""
    server_name: str | None = None
    """Client: name to verify the certificate against (and send as SNI)."""
    insecure_skip_verify_for_tests: bool = False
    """Client: do not verify the server certificate. Tests only; logged as a warning."""
    key_log_file: str | Path | None = None
    """Append TLS secrets here in SSLKEYLOGFILE format (for Wireshark)."""

    # --- transport ---
    idle_timeout: float = 30.0
    """QUIC ``max_idle_timeout`` in seconds."""
    handshake_timeout: float = 10.0
    """Give up a handshake that has not completed after this many seconds."""
    max_datagram_size: int = 1200
    """Largest UDP payload sent, 1200..65527; 1200 is safe on any path (aioquic has no PMTU
    discovery)."""
    initial_rtt: float = 0.1
    """RTT assumed before the first sample, in seconds."""
    max_data: int = 16 * 1024 * 1024
    """Initial connection-level receive credit (the engine raises it as data is read)."""
    stream_receive_window: int = 1024 * 1024
    """Per-stream receive credit beyond what the application has read: bounds the
    unread bytes buffered per stream, whatever the peer does."""
    max_concurrent_peer_streams: int = 16
    """Streams of each direction type the peer may have open at once (MAX_STREAMS); a
    bidirectional one holds its place until the application has closed or reset it,
    accepted or not. With ``stream_receive_window`` it bounds the unread bytes a peer can
    make us buffer per connection: at most ``max_concurrent_peer_streams *
    stream_receive_window``."""
    stream_send_high_water: int = 1024 * 1024
    """``send_all`` blocks while a stream has more unacknowledged bytes than this."""
    congestion_control: str = "reno"
    """Congestion controller name understood by the engine ("reno" or "cubic")."""

    # --- endpoint ---
    socket_buffer_size: int = 4 * 1024 * 1024
    """Requested SO_RCVBUF/SO_SNDBUF; the kernel may grant less (no error)."""
    max_connections: int = 1024
    """Server: connections alive at once, handshaking or not."""
    max_handshakes: int = 256
    """Server: connections still handshaking at once."""
    address_validation: str = "under_load"
    """Server: when a new client must first prove its address with a Retry round trip
    (RFC 9000, section 8.1) before the server keeps any state or does any cryptography
    for it: ``"always"``, ``"never"``, or ``"under_load"``: once half of
    ``max_handshakes`` are in progress. Initials with forged source addresses then
    cannot take the remaining handshake places; each validated client pays one round
    trip more."""

    def __post_init__(self) -> None:
        if not MIN_DATAGRAM_SIZE <= self.max_datagram_size <= MAX_DATAGRAM_SIZE:
            raise ValueError(
                f"max_datagram_size must be in {MIN_DATAGRAM_SIZE}..{MAX_DATAGRAM_SIZE},"
                f" not {self.max_datagram_size!r}"
            )
        for name in ("idle_timeout", "handshake_timeout", "initial_rtt"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"{name} must be positive")
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")
        if self.address_validation not in ADDRESS_VALIDATION:
            raise ValueError(
                f"address_validation must be one of {', '.join(map(repr, ADDRESS_VALIDATION))},"
                f" not {self.address_validation!r}"
            )
        if self.max_concurrent_peer_streams < 1:
            raise ValueError("max_concurrent_peer_streams must be at least 1")
        for name in ("stream_receive_window", "stream_send_high_water", "max_data"):
            if getattr(self, name) < 1024:
                raise ValueError(f"{name} must be at least 1024")
