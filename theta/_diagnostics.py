"""Transport diagnostics of a session: an immutable snapshot type and the iterator that
watches a session's snapshots."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from theta._session import Session


@dataclasses.dataclass(frozen=True, slots=True)
class TransportDiagnostics:
    """A snapshot of a session's transport health.

    Times are in seconds; ``uptime`` runs from establishment until the session's end was
    decided (then it stays); an RTT or jitter figure is ``None`` until the first heartbeat
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


class DiagnosticsWatch:
    """The async iterator behind :meth:`Session.watch_diagnostics`."""

    def __init__(self, session: Session, interval: float) -> None:
        if not interval > 0:
            raise ValueError("interval must be positive")
        self._session = session
        self._interval = interval
        self._next_at: float | None = None

    def __aiter__(self) -> DiagnosticsWatch:
        return self

    async def __anext__(self) -> TransportDiagnostics:
        if self._next_at is not None:
            with trio.move_on_at(self._next_at):
                await self._session.wait_closed()
        else:
            await trio.lowlevel.checkpoint()
        if self._session.closed is not None:
            raise StopAsyncIteration
        self._next_at = trio.current_time() + self._interval
        return self._session.diagnostics()
