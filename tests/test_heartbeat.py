"""Tests of the sans-IO heartbeat tracker (wire spec section 4.4).

Time is always passed explicitly. Simulated times are whole microseconds (ints) turned into
seconds only at the tracker's boundary, so expected RTTs are exact.
"""

from __future__ import annotations

import importlib
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from theta.core._errors import ErrorCode, HeartbeatTimeout, ProtocolViolation
from theta.core._heartbeat import HeartbeatMetrics, HeartbeatTracker
from theta.core._messages import Heartbeat

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

# The two peers' monotonic clocks have unrelated origins (µs of true time 0 on each clock).
A_ORIGIN_US = 1_000_000_000
B_ORIGIN_US = 3_250_000


def a_now(t_us: int) -> float:
    """Peer A's clock, in seconds, at true time ``t_us``."""
    return (A_ORIGIN_US + t_us) / 1_000_000


def b_now(t_us: int) -> float:
    """Peer B's clock, in seconds, at true time ``t_us``."""
    return (B_ORIGIN_US + t_us) / 1_000_000


def round_trip(
    a: HeartbeatTracker, b: HeartbeatTracker, t_us: int, *, forward: int, hold: int, back: int
) -> tuple[Heartbeat, Heartbeat]:
    """A sends at ``t_us``; B gets it ``forward`` µs later, holds it ``hold`` µs, answers;
    the answer reaches A ``back`` µs later. Returns (A's heartbeat, B's answer)."""
    ping = a.build(a_now(t_us))
    b.receive(ping, b_now(t_us + forward))
    pong = b.build(b_now(t_us + forward + hold))
    assert pong.echo_sequence == ping.sequence
    assert pong.echo_sent_at_us == ping.sent_at_us
    assert pong.echo_delay_us == hold
    a.receive(pong, a_now(t_us + forward + hold + back))
    return ping, pong


def feed_rtts(tracker: HeartbeatTracker, rtts_us: Iterable[int], *, first_sequence: int = 1) -> int:
    """Give ``tracker`` one RTT sample per value (heartbeats echoing a send ``rtt`` µs ago,
    held 0 µs). Returns the next unused sequence."""
    sequence = first_sequence
    now_us = 10**9
    for rtt in rtts_us:
        now_us += 1_000
        heartbeat = Heartbeat(
            sequence=sequence, sent_at_us=0, echo_sequence=1, echo_sent_at_us=now_us - rtt
        )
        tracker.receive(heartbeat, now_us / 1_000_000)
        sequence += 1
    return sequence


def test_core_imports_without_trio_or_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("trio", "socket", "time", "asyncio"):
        monkeypatch.setitem(sys.modules, name, None)
    # Re-import the module for real; both the cache entry and the package attribute are
    # put back afterwards, so other tests keep the original classes.
    monkeypatch.delitem(sys.modules, "theta.core._heartbeat")
    monkeypatch.delattr(sys.modules["theta.core"], "_heartbeat", raising=False)
    module = importlib.import_module("theta.core._heartbeat")
    assert module.HeartbeatTracker(now=0.0).build(0.0).sequence == 1


def test_constructor_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="interval"):
        HeartbeatTracker(now=0.0, interval=0.0)
    with pytest.raises(ValueError, match="timeout"):
        HeartbeatTracker(now=0.0, timeout=float("inf"))
    with pytest.raises(ValueError, match="window"):
        HeartbeatTracker(now=0.0, window=0)
    with pytest.raises(TypeError, match="heartbeat interval must be a number of seconds"):
        HeartbeatTracker(now=0.0, interval="0.5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="heartbeat timeout must be a number of seconds"):
        HeartbeatTracker(now=0.0, timeout=True)


def test_build_before_anything_received() -> None:
    tracker = HeartbeatTracker(now=2.0)
    first = tracker.build(2.0)
    second = tracker.build(2.5)
    assert first == Heartbeat(sequence=1, sent_at_us=2_000_000)
    assert second == Heartbeat(sequence=2, sent_at_us=2_500_000)
    assert (second.echo_sequence, second.echo_sent_at_us, second.echo_delay_us) == (0, 0, 0)
    assert (second.rtt_us, second.jitter_us) == (0, 0)
    assert tracker.metrics() == HeartbeatMetrics(
        latest_rtt=None,
        smoothed_rtt=None,
        min_rtt=None,
        rtt_p50=None,
        rtt_p90=None,
        rtt_p99=None,
        jitter=None,
        heartbeats_sent=2,
        heartbeats_received=0,
        peer_rtt=None,
        peer_jitter=None,
    )


def test_wire_times_are_rounded_microseconds_clamped_at_zero() -> None:
    tracker = HeartbeatTracker(now=-3.0)
    assert tracker.build(-3.0).sent_at_us == 0
    assert tracker.build(1.001).sent_at_us == 1_001_000  # 1.001 * 1e6 is 1000999.99...


def test_pair_rtt_is_the_simulated_round_trip() -> None:
    a = HeartbeatTracker(now=a_now(0))
    b = HeartbeatTracker(now=b_now(0))
    # A -> B takes 12 ms, B holds A's heartbeat 7 ms, B -> A takes 18 ms: 30 ms round trip.
    round_trip(a, b, 0, forward=12_000, hold=7_000, back=18_000)
    assert a.metrics().latest_rtt == 0.030
    assert b.metrics().latest_rtt is None  # B has not seen an echo of its own yet

    # A held B's heartbeat 13 ms (received at 37 ms, answers at 50 ms); it reaches B at
    # 62 ms. B's round trip is 18 + 12 = 30 ms again, its 13 ms hold excluded.
    ping = a.build(a_now(50_000))
    assert ping.echo_delay_us == 13_000
    assert ping.rtt_us == 30_000
    assert ping.jitter_us == 0
    b.receive(ping, b_now(62_000))
    assert b.metrics().latest_rtt == 0.030
    assert b.build(b_now(62_000)).rtt_us == 30_000
    assert a.metrics().heartbeats_sent == 2
    assert a.metrics().heartbeats_received == 1
    assert b.metrics().heartbeats_sent == 2
    assert b.metrics().heartbeats_received == 2


def test_jitter_smoothed_and_min_follow_rfc_3550_and_6298() -> None:
    a = HeartbeatTracker(now=a_now(0))
    b = HeartbeatTracker(now=b_now(0))
    # (forward, hold, back) in µs; round trips 30, 46, 30, 38 ms whatever the hold.
    legs = [(12_000, 7_000, 18_000), (20_000, 1_000, 26_000), (10_000, 0, 20_000)]
    legs.append((15_000, 250_000, 23_000))
    # By hand, in µs:
    #   jitter: 0; 0 + (16000 - 0)/16 = 1000; 1000 + (16000 - 1000)/16 = 1937.5;
    #           1937.5 + (8000 - 1937.5)/16 = 2316.40625
    #   srtt:   30000; 30000 + (46000 - 30000)/8 = 32000; 32000 + (30000 - 32000)/8 = 31750;
    #           31750 + (38000 - 31750)/8 = 32531.25
    expected = [
        (30_000, 0.0, 30_000.0),
        (46_000, 1_000.0, 32_000.0),
        (30_000, 1_937.5, 31_750.0),
        (38_000, 2_316.40625, 32_531.25),
    ]
    t_us = 0
    for (forward, hold, back), (rtt, jitter, srtt) in zip(legs, expected, strict=True):
        round_trip(a, b, t_us, forward=forward, hold=hold, back=back)
        metrics = a.metrics()
        assert metrics.latest_rtt == rtt / 1_000_000
        assert metrics.jitter == jitter / 1_000_000
        assert metrics.smoothed_rtt == srtt / 1_000_000
        assert metrics.min_rtt == 0.030
        t_us += 500_000
    report = a.build(a_now(t_us))
    assert report.rtt_us == 32_531  # smoothed, rounded to the µs
    assert report.jitter_us == 2_316


def test_percentiles_use_nearest_rank() -> None:
    tracker = HeartbeatTracker(now=0.0)
    feed_rtts(tracker, [7_000])
    single = tracker.metrics()
    assert single.rtt_p50 == single.rtt_p90 == single.rtt_p99 == 0.007

    tracker = HeartbeatTracker(now=0.0)
    feed_rtts(tracker, [5_000, 1_000, 4_000, 2_000, 3_000])
    # n = 5: ranks ceil(2.5) = 3, ceil(4.5) = 5, ceil(4.95) = 5.
    metrics = tracker.metrics()
    assert (metrics.rtt_p50, metrics.rtt_p90, metrics.rtt_p99) == (0.003, 0.005, 0.005)

    tracker = HeartbeatTracker(now=0.0)
    samples = [ms * 1_000 for ms in range(1, 101)]
    random.Random(7).shuffle(samples)
    feed_rtts(tracker, samples)
    metrics = tracker.metrics()
    assert (metrics.rtt_p50, metrics.rtt_p90, metrics.rtt_p99) == (0.050, 0.090, 0.099)
    assert metrics.min_rtt == 0.001


def test_percentile_window_rolls() -> None:
    tracker = HeartbeatTracker(now=0.0, window=10)
    feed_rtts(tracker, [ms * 1_000 for ms in range(1, 21)])
    metrics = tracker.metrics()
    # The window holds 11..20 ms: ranks 5, 9 and 10.
    assert (metrics.rtt_p50, metrics.rtt_p90, metrics.rtt_p99) == (0.015, 0.019, 0.020)
    assert metrics.latest_rtt == 0.020
    assert metrics.min_rtt == 0.001  # min RTT is over the whole life, not the window


def test_heartbeat_metrics_clamp_future_timestamps() -> None:
    tracker = HeartbeatTracker(now=1.0)
    # An echo claiming we sent it in the future, and one whose delay exceeds the elapsed time.
    future = Heartbeat(sequence=1, sent_at_us=5, echo_sequence=1, echo_sent_at_us=9_000_000)
    tracker.receive(future, 2.0)
    long_hold = Heartbeat(
        sequence=2, sent_at_us=6, echo_sequence=1, echo_sent_at_us=0, echo_delay_us=U64_MAX
    )
    tracker.receive(long_hold, 2.5)
    metrics = tracker.metrics()
    assert metrics.latest_rtt == 0.0
    assert metrics.min_rtt == 0.0
    assert metrics.smoothed_rtt == 0.0
    assert metrics.jitter is not None
    assert metrics.jitter >= 0.0
    report = tracker.build(3.0)
    assert report.rtt_us == 0
    assert report.jitter_us == 0


def test_echo_delay_never_negative() -> None:
    tracker = HeartbeatTracker(now=5.0)
    tracker.receive(Heartbeat(sequence=1, sent_at_us=77), 5.0)
    assert tracker.build(4.0).echo_delay_us == 0  # a clock going backwards must not underflow
    held = tracker.build(5.25)
    assert (held.echo_sequence, held.echo_sent_at_us, held.echo_delay_us) == (1, 77, 250_000)


def test_heartbeat_without_echo_gives_no_sample() -> None:
    tracker = HeartbeatTracker(now=0.0)
    tracker.receive(Heartbeat(sequence=1, sent_at_us=1), 1.0)
    metrics = tracker.metrics()
    assert metrics.heartbeats_received == 1
    assert metrics.latest_rtt is None
    assert metrics.jitter is None
    assert tracker.deadline == 6.0


def test_peer_reported_estimates() -> None:
    tracker = HeartbeatTracker(now=0.0)
    tracker.receive(Heartbeat(sequence=1, sent_at_us=1), 0.1)
    assert tracker.metrics().peer_rtt is None  # rtt_us 0: the peer has no estimate yet
    tracker.receive(Heartbeat(sequence=2, sent_at_us=2, rtt_us=25_000, jitter_us=1_500), 0.2)
    metrics = tracker.metrics()
    assert metrics.peer_rtt == 0.025
    assert metrics.peer_jitter == 0.0015
    assert metrics.latest_rtt is None  # the peer's figures are not our samples


@pytest.mark.parametrize("bad_sequence", [5, 4, 1, 0])
def test_non_increasing_sequence_is_a_violation(bad_sequence: int) -> None:
    tracker = HeartbeatTracker(now=0.0)
    tracker.receive(
        Heartbeat(sequence=5, sent_at_us=42, echo_sequence=1, echo_sent_at_us=990_000), 1.0
    )
    before = tracker.metrics()
    deadline = tracker.deadline
    replay = Heartbeat(sequence=bad_sequence, sent_at_us=43, echo_sequence=2, echo_sent_at_us=0)
    with pytest.raises(ProtocolViolation) as excinfo:
        tracker.receive(replay, 2.0)
    assert excinfo.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert tracker.metrics() == before
    assert tracker.deadline == deadline
    echo = tracker.build(2.0)
    assert (echo.echo_sequence, echo.echo_sent_at_us, echo.echo_delay_us) == (5, 42, 1_000_000)
    tracker.receive(Heartbeat(sequence=6, sent_at_us=44), 2.0)  # still usable afterwards


def test_first_sequence_zero_is_a_violation() -> None:
    tracker = HeartbeatTracker(now=0.0)
    with pytest.raises(ProtocolViolation) as excinfo:
        tracker.receive(Heartbeat(sequence=0, sent_at_us=1, echo_sequence=0), 1.0)
    assert excinfo.value.code is ErrorCode.PROTOCOL_VIOLATION
    assert tracker.metrics().heartbeats_received == 0
    assert tracker.deadline == 5.0
    assert tracker.build(1.0).echo_sequence == 0
    tracker.receive(Heartbeat(sequence=1, sent_at_us=1), 1.0)  # 1 is the first legal one


def test_timeout_deadline_moves_on_each_receive() -> None:
    tracker = HeartbeatTracker(now=100.0, interval=0.5, timeout=5.0)
    assert tracker.deadline == 105.0
    tracker.check_timeout(104.75)
    tracker.receive(Heartbeat(sequence=1, sent_at_us=1), 103.0)
    assert tracker.deadline == 108.0
    tracker.check_timeout(107.75)
    assert tracker.handle_timer(107.75) is not None  # a send is due, not the timeout
    tracker.receive(Heartbeat(sequence=2, sent_at_us=2), 107.75)
    assert tracker.deadline == 112.75
    assert tracker.handle_timer(112.5) is not None
    with pytest.raises(HeartbeatTimeout) as excinfo:
        tracker.handle_timer(112.75)
    assert excinfo.value.code is ErrorCode.HEARTBEAT_TIMEOUT
    with pytest.raises(HeartbeatTimeout):
        tracker.check_timeout(200.0)


def test_timeout_without_any_heartbeat() -> None:
    tracker = HeartbeatTracker(now=0.0, interval=0.5, timeout=2.0)
    now = 0.0
    sent = 0
    while now < 2.0:
        if tracker.handle_timer(now) is not None:
            sent += 1
        now += 0.25
    assert sent == 4  # at 0.0, 0.5, 1.0 and 1.5
    with pytest.raises(HeartbeatTimeout) as excinfo:
        tracker.handle_timer(2.0)
    assert excinfo.value.code is ErrorCode.HEARTBEAT_TIMEOUT
    assert tracker.metrics().heartbeats_sent == 4  # nothing was built at the deadline


def test_send_schedule() -> None:
    tracker = HeartbeatTracker(now=10.0, interval=0.5, timeout=5.0)
    assert tracker.next_send_at == 10.0  # the first heartbeat is due at once
    assert tracker.get_timer() == 10.0
    first = tracker.handle_timer(10.0)
    assert first is not None
    assert (first.sequence, first.sent_at_us) == (1, 10_000_000)
    assert tracker.next_send_at == tracker.get_timer() == 10.5
    assert tracker.handle_timer(10.25) is None
    second = tracker.handle_timer(10.5)
    assert second is not None
    assert second.sequence == 2
    # A late wake-up sends one heartbeat and schedules from then: no catch-up burst.
    third = tracker.handle_timer(11.25)
    assert third is not None
    assert third.sequence == 3
    assert tracker.next_send_at == 11.75
    assert tracker.handle_timer(11.25) is None
    assert tracker.metrics().heartbeats_sent == 3


def _peer_heartbeat(sequence: int, sent_at: float) -> Heartbeat:
    return Heartbeat(sequence, round(sent_at * 1e6), 0, 0, 0, 0, 0)


def test_following_the_peer_answers_each_heartbeat_at_once() -> None:
    tracker = HeartbeatTracker(now=0.0, interval=0.5, timeout=5.0, follow_peer=True)
    assert tracker.handle_timer(0.0) is not None  # the first one is due at construction
    assert tracker.next_send_at == 0.5  # sent on its own timer: every interval
    # The peer's first heartbeat 0.1 s after ours: too soon (under interval / 2) to
    # answer; ours moves to 1.25 intervals after ours, so that the peer's next one comes
    # first.
    tracker.receive(_peer_heartbeat(1, 0.1), 0.1)
    assert tracker.handle_timer(0.1) is None
    assert tracker.next_send_at == pytest.approx(0.625)
    # Its next one is answered at once: the schedules are aligned ...
    tracker.receive(_peer_heartbeat(2, 0.61), 0.61)
    assert tracker.next_send_at == 0.61
    answer = tracker.handle_timer(0.61)
    assert answer is not None
    assert (answer.sequence, answer.echo_sequence, answer.echo_delay_us) == (2, 2, 0)
    assert tracker.next_send_at == pytest.approx(0.61 + 0.625)  # margin after an answer
    # ... and stay so although the peer's timer runs a little late each period.
    for sequence, now in ((3, 1.12), (4, 1.64), (5, 2.17), (6, 2.69)):
        assert tracker.next_send_at > now
        tracker.receive(_peer_heartbeat(sequence, now), now)
        answer = tracker.handle_timer(now)
        assert answer is not None
        assert answer.echo_sequence == sequence
    # A peer sending too fast is answered at most every interval / 2.
    tracker.receive(_peer_heartbeat(7, 2.8), 2.8)
    assert tracker.handle_timer(2.8) is None
    tracker.receive(_peer_heartbeat(8, 2.95), 2.95)
    assert tracker.handle_timer(2.95) is not None
    # A silent peer: one gap of 1.25 intervals, then every interval until the timeout.
    assert tracker.next_send_at == pytest.approx(3.575)
    assert tracker.handle_timer(3.575) is not None
    assert tracker.next_send_at == pytest.approx(4.075)
    assert tracker.metrics().heartbeats_sent == 8


def test_following_the_peer_never_leaves_a_gap_over_a_quarter_interval_late() -> None:
    """Heartbeats arriving too soon after ours, one after another, do not push ours
    further each time: the gap stays within 1.25 intervals (spec 4.4: every interval)."""
    tracker = HeartbeatTracker(now=0.0, interval=3.2, timeout=20.0, follow_peer=True)
    assert tracker.handle_timer(0.0) is not None
    for sequence, now in ((1, 0.5), (2, 1.0), (3, 1.5)):
        tracker.receive(_peer_heartbeat(sequence, now), now)
        assert tracker.handle_timer(now) is None
    assert tracker.next_send_at == pytest.approx(4.0)


def test_following_the_peer_aligns_with_a_late_schedule_within_two_periods() -> None:
    """The peer's heartbeats 0.2 s (0.4 interval) after ours: ours then leaves 1.25
    intervals after the previous one, 0.075 s before the peer's, whose next one arrives
    before our timer and is answered at once, as every one after it."""
    tracker = HeartbeatTracker(now=0.0, interval=0.5, timeout=5.0, follow_peer=True)
    sends = []
    for sequence, arrival in enumerate((0.2, 0.7, 1.2, 1.7, 2.2), start=1):
        while tracker.next_send_at <= arrival:
            heartbeat = tracker.handle_timer(tracker.next_send_at)
            assert heartbeat is not None
            sends.append(heartbeat.sent_at_us / 1e6)
        tracker.receive(_peer_heartbeat(sequence, arrival), arrival)
        if (answer := tracker.handle_timer(arrival)) is not None:
            sends.append(answer.sent_at_us / 1e6)
    assert sends == pytest.approx([0.0, 0.625, 1.2, 1.7, 2.2])


def test_not_following_ignores_the_peer_schedule() -> None:
    tracker = HeartbeatTracker(now=0.0, interval=0.5, timeout=5.0)
    assert tracker.handle_timer(0.0) is not None
    tracker.receive(_peer_heartbeat(1, 0.3), 0.3)
    assert tracker.next_send_at == 0.5
    assert tracker.handle_timer(0.3) is None


def test_get_timer_is_the_deadline_when_earlier() -> None:
    tracker = HeartbeatTracker(now=0.0, interval=10.0, timeout=3.0)
    assert tracker.handle_timer(0.0) is not None
    assert tracker.next_send_at == 10.0
    assert tracker.get_timer() == tracker.deadline == 3.0


def test_reported_estimates_saturate_at_u32() -> None:
    tracker = HeartbeatTracker(now=0.0)
    # Sample 1: a future-dated echo, RTT 0. Sample 2: an echo of time 1 µs at 100000 s,
    # RTT ~1e11 µs, so jitter ~6.25e9 µs: both above 2**32 - 1.
    tracker.receive(
        Heartbeat(sequence=1, sent_at_us=0, echo_sequence=1, echo_sent_at_us=U64_MAX), 100_000.0
    )
    tracker.receive(
        Heartbeat(sequence=2, sent_at_us=0, echo_sequence=1, echo_sent_at_us=1), 100_000.0
    )
    metrics = tracker.metrics()
    assert metrics.latest_rtt == (100_000 * 1_000_000 - 1) / 1_000_000
    assert metrics.jitter is not None
    assert metrics.jitter > U32_MAX / 1_000_000
    report = tracker.build(100_000.0)
    assert report.rtt_us == U32_MAX
    assert report.jitter_us == U32_MAX


u64 = st.one_of(st.integers(0, 16), st.integers(0, 10**13), st.integers(0, U64_MAX))
heartbeats = st.builds(
    Heartbeat,
    sequence=u64,
    sent_at_us=u64,
    echo_sequence=u64,
    echo_sent_at_us=u64,
    echo_delay_us=u64,
    rtt_us=st.integers(0, U32_MAX),
    jitter_us=st.integers(0, U32_MAX),
)
nows = st.floats(min_value=-1e6, max_value=1e7, allow_nan=False)


@dataclass(frozen=True)
class Receive:
    heartbeat: Heartbeat
    now: float


@dataclass(frozen=True)
class Build:
    now: float


steps = st.lists(
    st.one_of(st.builds(Receive, heartbeats, nows), st.builds(Build, nows)), max_size=40
)


def assert_sane(metrics: HeartbeatMetrics) -> None:
    for value in (
        metrics.latest_rtt,
        metrics.smoothed_rtt,
        metrics.min_rtt,
        metrics.rtt_p50,
        metrics.rtt_p90,
        metrics.rtt_p99,
        metrics.jitter,
    ):
        assert value is None or value >= 0.0
    if metrics.min_rtt is not None:
        assert metrics.latest_rtt is not None
        assert metrics.rtt_p50 is not None
        assert metrics.rtt_p99 is not None
        assert metrics.min_rtt <= metrics.latest_rtt
        assert metrics.min_rtt <= metrics.rtt_p50 <= metrics.rtt_p99


@settings(derandomize=True, max_examples=300)
@given(start=nows, window=st.integers(1, 8), script=steps)
def test_arbitrary_input_only_raises_protocol_violation(
    start: float, window: int, script: list[Receive | Build]
) -> None:
    tracker = HeartbeatTracker(now=start, window=window)
    last_sequence = 0
    sent = 0
    for step in script:
        if isinstance(step, Build):
            heartbeat = tracker.build(step.now)
            sent += 1
            assert heartbeat.sequence == sent
            assert heartbeat.sent_at_us >= 0
            assert heartbeat.echo_delay_us >= 0
            assert heartbeat.echo_sequence == last_sequence
            assert 0 <= heartbeat.rtt_us <= U32_MAX
            assert 0 <= heartbeat.jitter_us <= U32_MAX
        else:
            before = tracker.metrics()
            deadline = tracker.deadline
            if step.heartbeat.sequence <= last_sequence:  # last_sequence 0 also rejects 0
                with pytest.raises(ProtocolViolation) as excinfo:
                    tracker.receive(step.heartbeat, step.now)
                assert excinfo.value.code is ErrorCode.PROTOCOL_VIOLATION
                assert tracker.metrics() == before
                assert tracker.deadline == deadline
            else:
                tracker.receive(step.heartbeat, step.now)
                last_sequence = step.heartbeat.sequence
                assert tracker.metrics().heartbeats_received == before.heartbeats_received + 1
        assert_sane(tracker.metrics())
