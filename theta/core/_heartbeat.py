"""Heartbeat scheduling, liveness and round-trip measurement (wire spec section 4.4).

Theory of operation
-------------------
A :class:`HeartbeatTracker` is a sans-IO state machine, one per session, driven by the
session's control-channel task. It never reads a clock: every method that needs time takes
``now``, in seconds on a monotonic clock (e.g. ``trio.current_time()``). On the wire, times
are whole microseconds (``round(now * 1e6)``, clamped at 0).

Sending
    :meth:`~HeartbeatTracker.build` makes the next outgoing :class:`Heartbeat`: sequence 1,
    2, 3, ...; ``sent_at_us`` is ``now``; the echo fields repeat the latest heartbeat received
    from the peer together with how long we held it (all 0 before the first one); ``rtt_us``
    and ``jitter_us`` carry our smoothed RTT and jitter, saturated at 2**32 - 1. The first
    heartbeat is due at construction, later ones ``interval`` after the previous send.

Following the peer (``follow_peer=True``, what theta's server does)
    Each heartbeat received makes ours due at once, provided at least ``interval / 2`` has
    passed since our previous send. Our heartbeats then leave right after the peer's
    arrive, so the QUIC packet carrying ours also acknowledges theirs (one datagram per
    period instead of two), and the echo delay is near 0. After such an answer the next
    heartbeat is due ``interval * 1.25`` later unless the peer's comes first: the margin
    keeps our timer from racing the peer's next heartbeat (whose timer runs a little late
    each period). A peer heartbeat arriving too soon after ours moves our next one to
    ``interval * 1.25`` after ours, so that the peer's following one comes first and is
    answered (the offset between the two schedules shrinks by ``interval / 4`` a period
    until they align). After a heartbeat sent on our own timer the next is due ``interval``
    later, as without following. So no gap between two of our heartbeats ever exceeds
    ``interval * 1.25``, whatever the peer sends or fails to send.

Receiving
    :meth:`~HeartbeatTracker.receive` rejects a sequence that does not strictly increase
    (the first must be >= 1) with :class:`ProtocolViolation`, leaving the tracker untouched.
    Otherwise it remembers the heartbeat for echoing, pushes the liveness deadline to
    ``now + timeout`` and, when ``echo_sequence != 0``, takes an RTT sample::

        rtt = now_us - echo_sent_at_us - echo_delay_us      (clamped at 0)

    Both timestamps in that formula are on our own clock (``echo_sent_at_us`` is our
    ``sent_at_us`` coming back) so the two peers' clocks never need to agree. A future-dated
    or forged echo gives 0, never a negative value.

Estimates (all kept in microseconds)
    * latest RTT: the last sample; min RTT: the smallest sample since construction;
    * smoothed RTT (RFC 6298): the first sample sets it, then ``srtt += (rtt - srtt) / 8``;
    * jitter (RFC 3550, section 6.4.1): from the second sample on,
      ``jitter += (|rtt - previous rtt| - jitter) / 16``, a float that is never negative;
    * percentiles p50/p90/p99 over the last ``window`` samples by the *nearest-rank* method:
      with the ``n`` samples sorted ascending, the p-th percentile is the sample of 1-based
      rank ``ceil(p * n / 100)``. It is always an observed sample (no interpolation).

Timers
    :attr:`~HeartbeatTracker.next_send_at` and :attr:`~HeartbeatTracker.deadline` (no
    heartbeat received by then means ``HEARTBEAT_TIMEOUT``); :meth:`~HeartbeatTracker.get_timer`
    is the earlier of the two and :meth:`~HeartbeatTracker.handle_timer` acts on it. A driver
    with a separate receiver task may use :meth:`~HeartbeatTracker.check_timeout` alone.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from dataclasses import dataclass

from theta.core._errors import HeartbeatTimeout, ProtocolViolation
from theta.core._messages import Heartbeat

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_RTT_WINDOW",
    "HeartbeatMetrics",
    "HeartbeatTracker",
]

DEFAULT_HEARTBEAT_INTERVAL = 0.5
"""Seconds between two heartbeats sent (spec section 4.4)."""

DEFAULT_HEARTBEAT_TIMEOUT = 5.0
"""Seconds without a received heartbeat before ``HEARTBEAT_TIMEOUT`` (spec section 4.4)."""

DEFAULT_RTT_WINDOW = 256
"""RTT samples kept for the rolling percentiles (about two minutes at the default interval)."""

_US_PER_S = 1_000_000
_FOLLOW_MARGIN = 1.25  # following the peer: the longest gap between ours, in intervals
_U32_MAX = 2**32 - 1


def _to_us(now: float) -> int:
    """``now`` (seconds) as whole microseconds for the wire, clamped at 0."""
    return max(0, round(now * _US_PER_S))


def _saturate_u32(value_us: float) -> int:
    """A non-negative estimate in microseconds as a ``uint32`` field, saturating."""
    return min(_U32_MAX, max(0, round(value_us)))


def _seconds(value_us: float | None) -> float | None:
    return None if value_us is None else value_us / _US_PER_S


def _nearest_rank(sorted_samples: list[int], percent: int) -> int:
    """The ``percent``-th percentile (1..100) of a non-empty ascending list, nearest-rank."""
    rank = -(-percent * len(sorted_samples) // 100)  # ceil(percent * n / 100), exact
    return sorted_samples[rank - 1]


@dataclass(frozen=True, slots=True)
class HeartbeatMetrics:
    """A snapshot of a :class:`HeartbeatTracker`'s measurements.

    Durations are in seconds; each is ``None`` until the first RTT sample (``jitter`` is 0.0
    after the first sample and meaningful from the second on). ``min_rtt`` is over the
    tracker's whole life, the percentiles over its last ``window`` samples (nearest-rank).
    ``peer_rtt``/``peer_jitter`` are the estimates the peer last reported about itself, or
    ``None`` while it has reported no RTT (an ``rtt_us`` of 0 means "no estimate yet").
    """

    latest_rtt: float | None
    smoothed_rtt: float | None
    min_rtt: float | None
    rtt_p50: float | None
    rtt_p90: float | None
    rtt_p99: float | None
    jitter: float | None
    heartbeats_sent: int
    heartbeats_received: int
    peer_rtt: float | None
    peer_jitter: float | None


class HeartbeatTracker:
    """The heartbeat state of one session: what to send, when, and what it measured.

    ``now`` is the current monotonic time in seconds; ``interval`` is the time between
    heartbeats sent, ``timeout`` the longest silence tolerated from the peer and ``window``
    the number of recent RTT samples the percentiles are computed over; ``follow_peer``
    sends each heartbeat as the peer's arrives (see the module documentation). Raises
    ``TypeError`` when ``interval`` or ``timeout`` is not a real number, ``ValueError``
    when it is not positive and finite or ``window`` is below 1.
    """

    def __init__(
        self,
        *,
        now: float,
        interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        window: int = DEFAULT_RTT_WINDOW,
        follow_peer: bool = False,
    ) -> None:
        given: tuple[tuple[str, object], ...] = (("interval", interval), ("timeout", timeout))
        for name, value in given:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"heartbeat {name} must be a number of seconds, not {value!r}")
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"heartbeat interval must be positive and finite, not {interval!r}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"heartbeat timeout must be positive and finite, not {timeout!r}")
        if window < 1:
            raise ValueError(f"RTT window must hold at least 1 sample, not {window!r}")
        self._interval = interval
        self._timeout = timeout
        self._follow_peer = follow_peer
        self._answering = False  # following: the next send answers the peer's heartbeat
        self._last_sent_at = -math.inf
        self._next_send_at = now
        self._deadline = now + timeout
        self._next_sequence = 1
        self._sent = 0
        self._received = 0
        # The latest heartbeat accepted from the peer, and when (µs on our clock).
        self._peer_sequence = 0
        self._peer_sent_at_us = 0
        self._peer_received_at_us = 0
        self._peer_rtt_us = 0
        self._peer_jitter_us = 0
        # Our estimates, in µs; None until the first sample.
        self._latest_rtt_us: int | None = None
        self._min_rtt_us: int | None = None
        self._smoothed_rtt_us: float | None = None
        self._jitter_us = 0.0
        self._window: deque[int] = deque(maxlen=window)

    @property
    def interval(self) -> float:
        """Seconds between two heartbeats sent."""
        return self._interval

    @property
    def timeout(self) -> float:
        """Seconds of silence from the peer tolerated before ``HEARTBEAT_TIMEOUT``."""
        return self._timeout

    @property
    def next_send_at(self) -> float:
        """When the next heartbeat is due (the construction time, then the last send plus
        ``interval``; when following the peer, see the module documentation)."""
        return self._next_send_at

    @property
    def deadline(self) -> float:
        """When the peer is declared dead: the last receive (or construction) plus
        ``timeout``."""
        return self._deadline

    def get_timer(self) -> float:
        """The earliest time :meth:`handle_timer` has something to do."""
        return min(self._next_send_at, self._deadline)

    def check_timeout(self, now: float) -> None:
        """Raise :class:`HeartbeatTimeout` when ``now`` has reached :attr:`deadline`."""
        if now >= self._deadline:
            raise HeartbeatTimeout(
                f"no heartbeat received for {self._timeout:g} s "
                f"(last sequence {self._peer_sequence})"
            )

    def handle_timer(self, now: float) -> Heartbeat | None:
        """Act on the timers: raise :class:`HeartbeatTimeout` at or after the deadline,
        else return the heartbeat to send when one is due (see :meth:`build`), else
        ``None``."""
        self.check_timeout(now)
        if now >= self._next_send_at:
            return self.build(now)
        return None

    def build(self, now: float) -> Heartbeat:
        """Make the next heartbeat to send at ``now``, count it as sent and schedule the
        next one at ``now + interval`` (``interval * 1.25`` after answering the peer's)."""
        now_us = _to_us(now)
        # Held since its receipt; 0 (with the other echo fields) while nothing was received.
        echo_delay_us = max(0, now_us - self._peer_received_at_us) if self._peer_sequence else 0
        if self._smoothed_rtt_us is None:
            rtt_us = jitter_us = 0
        else:
            rtt_us = _saturate_u32(self._smoothed_rtt_us)
            jitter_us = _saturate_u32(self._jitter_us)
        heartbeat = Heartbeat(
            sequence=self._next_sequence,
            sent_at_us=now_us,
            echo_sequence=self._peer_sequence,
            echo_sent_at_us=self._peer_sent_at_us,
            echo_delay_us=echo_delay_us,
            rtt_us=rtt_us,
            jitter_us=jitter_us,
        )
        self._next_sequence += 1
        self._sent += 1
        self._last_sent_at = now
        self._next_send_at = now + self._interval * (_FOLLOW_MARGIN if self._answering else 1.0)
        self._answering = False
        return heartbeat

    def receive(self, heartbeat: Heartbeat, now: float) -> None:
        """Take in a heartbeat from the peer, received at ``now``.

        Raises :class:`ProtocolViolation` (and changes nothing) when its sequence is not
        above the previous one's, or is 0 for the first. Otherwise records it for echoing,
        moves :attr:`deadline` to ``now + timeout`` and, when it echoes one of ours, takes
        an RTT sample. When following the peer, ours becomes due at ``now`` if at least
        ``interval / 2`` has passed since our last send, and otherwise
        ``interval * 1.25`` after our last send.
        """
        if heartbeat.sequence <= self._peer_sequence:
            if self._peer_sequence:
                raise ProtocolViolation(
                    f"heartbeat sequence {heartbeat.sequence} does not increase "
                    f"(previous {self._peer_sequence})"
                )
            raise ProtocolViolation(f"heartbeat sequence {heartbeat.sequence} is below 1")
        now_us = _to_us(now)
        self._peer_sequence = heartbeat.sequence
        self._peer_sent_at_us = heartbeat.sent_at_us
        self._peer_received_at_us = now_us
        self._peer_rtt_us = heartbeat.rtt_us
        self._peer_jitter_us = heartbeat.jitter_us
        self._received += 1
        self._deadline = now + self._timeout
        if self._follow_peer:
            if now - self._last_sent_at >= self._interval / 2:
                self._next_send_at = min(self._next_send_at, now)
                self._answering = True
            else:  # too soon after ours: move ours (within the margin) to answer its next
                self._next_send_at = max(
                    self._next_send_at, self._last_sent_at + self._interval * _FOLLOW_MARGIN
                )
        if heartbeat.echo_sequence != 0:
            rtt = now_us - heartbeat.echo_sent_at_us - heartbeat.echo_delay_us
            self._add_sample(max(0, rtt))

    def _add_sample(self, rtt_us: int) -> None:
        if self._latest_rtt_us is not None:
            self._jitter_us += (abs(rtt_us - self._latest_rtt_us) - self._jitter_us) / 16
        srtt = self._smoothed_rtt_us
        self._smoothed_rtt_us = float(rtt_us) if srtt is None else srtt + (rtt_us - srtt) / 8
        self._min_rtt_us = rtt_us if self._min_rtt_us is None else min(self._min_rtt_us, rtt_us)
        self._latest_rtt_us = rtt_us
        self._window.append(rtt_us)

    def metrics(self) -> HeartbeatMetrics:
        """A snapshot of the counters and estimates (durations in seconds)."""
        p50: int | None = None
        p90: int | None = None
        p99: int | None = None
        jitter: float | None = None
        if self._window:
            ordered = sorted(self._window)
            p50, p90, p99 = (_nearest_rank(ordered, p) for p in (50, 90, 99))
            jitter = self._jitter_us / _US_PER_S
        peer_known = self._peer_rtt_us != 0
        return HeartbeatMetrics(
            latest_rtt=_seconds(self._latest_rtt_us),
            smoothed_rtt=_seconds(self._smoothed_rtt_us),
            min_rtt=_seconds(self._min_rtt_us),
            rtt_p50=_seconds(p50),
            rtt_p90=_seconds(p90),
            rtt_p99=_seconds(p99),
            jitter=jitter,
            heartbeats_sent=self._sent,
            heartbeats_received=self._received,
            peer_rtt=self._peer_rtt_us / _US_PER_S if peer_known else None,
            peer_jitter=self._peer_jitter_us / _US_PER_S if peer_known else None,
        )
