"""Statistics snapshots of a QUIC connection (engine-neutral)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class EngineStats:
    """Loss-recovery and congestion figures read from the QUIC engine (seconds, bytes).

    ``min_rtt`` is 0.0 until the first RTT sample. ``lost_packets`` counts packets the
    engine declared lost; ``probe_timeouts`` counts loss-detection/probe timer firings.
    """

    smoothed_rtt: float
    min_rtt: float
    latest_rtt: float
    rtt_variance: float
    congestion_window: int
    bytes_in_flight: int
    lost_packets: int
    probe_timeouts: int


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionStats:
    """Counters of one connection: UDP traffic counted by the driver, plus engine figures."""

    datagrams_sent: int
    bytes_sent: int
    datagrams_received: int
    bytes_received: int
    engine: EngineStats
