"""Transport diagnostics of a session: one immutable snapshot type."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class TransportDiagnostics:
    """A snapshot of a session's transport health.

    Times are in seconds; an RTT or jitter figure is ``None`` until the first heartbeat
    round trip. The RTT figures come from heartbeats (application level, spec section
    4.4); ``quic_*`` figures come from the QUIC engine's loss recovery.
    ``compression_ratio`` (uncompressed ÷ sent replication payload bytes) is ``None``
    unless zstd was negotiated and something was compressed.
    """

    uptime: float
    rtt_latest: float | None
    rtt_smoothed: float | None
    rtt_min: float | None
    rtt_p50: float | None
    rtt_p90: float | None
    rtt_p99: float | None
    jitter: float | None
    peer_rtt: float | None
    peer_jitter: float | None
    heartbeats_sent: int
    heartbeats_received: int
    datagrams_sent: int
    datagrams_received: int
    bytes_sent: int
    bytes_received: int
    quic_smoothed_rtt: float
    quic_lost_packets: int
    quic_congestion_window: int
    compression_ratio: float | None
