"""The endpoint's timer queue: one task waking many parked drivers at their deadlines."""

from __future__ import annotations

import math
import weakref

import trio
import trio.testing

from theta._quic._timers import TimerQueue


class Recorder:
    """A sleeper that records when it was woken (on trio's clock)."""

    def __init__(self, name: str, woken: list[tuple[str, float]]) -> None:
        self.name = name
        self.woken = woken
        self.timer_deadline = math.inf
        self.timer_queued = math.inf

    def timer_expired(self) -> None:
        self.woken.append((self.name, trio.current_time()))


def running_queue(nursery: trio.Nursery) -> tuple[TimerQueue, list[tuple[str, float]], float]:
    """A queue running in ``nursery``, the list its recorders log to, and the start time."""
    queue = TimerQueue()
    nursery.start_soon(queue.run)
    return queue, [], trio.current_time()


async def test_sleepers_wake_at_their_deadlines_in_order(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    queue, woken, start = running_queue(nursery)
    sleepers = {name: Recorder(name, woken) for name in ("c", "a", "b", "a2")}  # kept alive
    for name, delay in (("c", 3.0), ("a", 1.0), ("b", 2.0), ("a2", 1.0)):
        queue.schedule(sleepers[name], start + delay)
    await trio.sleep(5)
    assert woken == [("a", start + 1), ("a2", start + 1), ("b", start + 2), ("c", start + 3)]


async def test_rescheduling_later_earlier_and_cancelling(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    queue, woken, start = running_queue(nursery)
    later = Recorder("later", woken)
    queue.schedule(later, start + 1)
    queue.schedule(later, start + 4)  # the entry at +1 stays and re-queues it at +4
    earlier = Recorder("earlier", woken)
    queue.schedule(earlier, start + 3)
    queue.schedule(earlier, start + 2)  # the entry at +3 is superseded
    cancelled = Recorder("cancelled", woken)
    queue.schedule(cancelled, start + 1.5)
    queue.schedule(cancelled, math.inf)
    await trio.sleep(10)
    assert woken == [("earlier", start + 2), ("later", start + 4)]
    assert later.timer_queued == earlier.timer_queued == cancelled.timer_queued == math.inf


async def test_a_new_earliest_deadline_wakes_the_queue_sooner(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    queue, woken, start = running_queue(nursery)
    far, near = Recorder("far", woken), Recorder("near", woken)
    queue.schedule(far, start + 100)
    await trio.sleep(1)  # the queue's task now sleeps until +100
    queue.schedule(near, start + 2)
    await trio.sleep(2)
    assert woken == [("near", start + 2)]


def reschedule_ever_earlier(queue: TimerQueue, sleepers: list[Recorder]) -> None:
    """1000 ever earlier deadlines each: every push makes one entry stale."""
    for step in range(1000):
        for sleeper in sleepers:
            queue.schedule(sleeper, 10_000.0 - step)


async def test_stale_entries_are_pruned() -> None:
    queue = TimerQueue()
    sleepers = [Recorder(str(index), []) for index in range(10)]
    reschedule_ever_earlier(queue, sleepers)
    assert len(queue._heap) <= 2 * len(sleepers) + 64 + 1


async def test_a_cancelled_sleeper_is_neither_woken_nor_kept_alive(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    queue, woken, start = running_queue(nursery)
    kept = Recorder("kept", woken)
    queue.schedule(kept, start + 2)
    finished = Recorder("finished", woken)
    queue.schedule(finished, start + 1)
    queue.cancel(finished)
    assert finished.timer_queued == finished.timer_deadline == math.inf
    reference = weakref.ref(finished)
    del finished
    assert reference() is None  # the queue's stale entry does not hold it
    await trio.sleep(3)
    assert woken == [("kept", start + 2)]


async def test_sleepers_dropped_without_cancel_do_not_loosen_pruning() -> None:
    queue = TimerQueue()
    start = trio.current_time()
    for index in range(100):  # dropped at once: their entries outlive them
        queue.schedule(Recorder(f"dropped {index}", []), start + 1)
    queue._fire(start + 2)
    sleepers = [Recorder(str(index), []) for index in range(10)]
    reschedule_ever_earlier(queue, sleepers)
    assert queue._live == len(sleepers)
    assert len(queue._heap) <= 2 * len(sleepers) + 64 + 1


async def test_pruning_keeps_one_entry_per_sleeper() -> None:
    queue = TimerQueue()
    woken: list[tuple[str, float]] = []
    sleeper = Recorder("one", woken)
    queue.schedule(sleeper, 5.0)
    queue.schedule(sleeper, 3.0)  # earlier: a second entry; the one for 5 stays
    queue._fire(3.0)
    queue.schedule(sleeper, 5.0)  # woken, it asks for 5 again: two entries for 5
    queue._prune()
    assert len(queue._heap) == queue._live == 1
    queue._fire(5.0)
    assert len(woken) == 2
    assert queue._live == 0
