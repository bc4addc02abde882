"""The deadlines of an endpoint's connection drivers, served by one trio task.

Theory of operation: each round, a connection driver parks until it is woken (a datagram,
a write) or its engine timer is due. Parking inside ``trio.move_on_at`` would enter a new
cancel scope every round, and each scope leaves an entry in trio's deadline heap until
the heap is pruned; with hundreds of connections, a few rounds per heartbeat each, that
is a measurable share of a server's CPU and of its garbage collector's work. Instead a
driver parks with ``trio.lowlevel.wait_task_rescheduled`` and registers its deadline
here, which costs a heap push at most:

* a :class:`Sleeper` has at most one live entry, its earliest: a later deadline leaves
  that entry in place (when it fires early, the sleeper is simply queued again at the
  deadline it wants by then), an earlier one supersedes it (the old entry is skipped when
  it comes up, and pruned once stale entries outnumber live ones);
* one task sleeps until the earliest entry (one cancel scope per firing, however many
  sleepers are due) and calls :meth:`Sleeper.timer_expired` on each due sleeper;
* entries hold sleepers by weak reference, and :meth:`TimerQueue.cancel` makes a
  sleeper's entry stale at once, so a finished connection is never kept alive by the
  queue.
"""

from __future__ import annotations

import itertools
import math
import weakref
from heapq import heapify, heappop, heappush
from typing import Protocol

import trio

__all__ = ["Sleeper", "TimerQueue"]

_PRUNE_SLACK = 64  # stale entries tolerated beyond the number of live ones


class Sleeper(Protocol):
    """What the queue needs from a sleeper (a connection driver)."""

    timer_deadline: float
    """When the sleeper wants to be woken (``math.inf``: never); set by the queue."""
    timer_queued: float
    """Its earliest entry in the queue (``math.inf``: none); managed by the queue."""

    def timer_expired(self) -> None:
        """Its deadline has come (called from the queue's task; must not block)."""


class TimerQueue:
    """Deadlines of many sleepers, served by :meth:`run` (one task per endpoint)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, weakref.ref[Sleeper]]] = []
        self._order = itertools.count()  # ties never compare sleepers
        self._live = 0  # sleepers with an entry
        self._scope: trio.CancelScope | None = None

    def schedule(self, sleeper: Sleeper, deadline: float) -> None:
        """Wake ``sleeper`` (through ``timer_expired``) at ``deadline`` or soon after;
        replaces its previous deadline (``math.inf``: none). The queue holds sleepers by
        weak reference: one nobody else keeps alive is dropped, unwoken."""
        sleeper.timer_deadline = deadline
        if deadline >= sleeper.timer_queued:
            return  # the earlier entry fires first and queues it again if still needed
        if sleeper.timer_queued == math.inf:
            self._live += 1
        sleeper.timer_queued = deadline
        heappush(self._heap, (deadline, next(self._order), weakref.ref(sleeper)))
        if self._scope is not None and deadline < self._scope.deadline:
            self._scope.deadline = deadline
        if len(self._heap) > 2 * self._live + _PRUNE_SLACK:
            self._prune()

    def cancel(self, sleeper: Sleeper) -> None:
        """Forget ``sleeper`` (a finished connection): its entry is stale from now on."""
        if sleeper.timer_queued != math.inf:
            self._live -= 1
        sleeper.timer_queued = sleeper.timer_deadline = math.inf

    async def run(self) -> None:
        """Wake sleepers as their deadlines come, until cancelled."""
        while True:
            with trio.CancelScope(deadline=self._heap[0][0] if self._heap else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            self._fire(trio.current_time())

    def _fire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            queued_at, _, ref = heappop(heap)
            sleeper = ref()
            if sleeper is None or sleeper.timer_queued != queued_at:
                continue  # superseded by an earlier entry, or cancelled
            sleeper.timer_queued = math.inf
            self._live -= 1
            if sleeper.timer_deadline <= now:
                sleeper.timer_expired()
            elif sleeper.timer_deadline != math.inf:
                self.schedule(sleeper, sleeper.timer_deadline)

    def _prune(self) -> None:
        # Keep one entry per live sleeper (re-queued at a deadline it had already asked
        # for, a sleeper can have two that match). Recounting also forgets sleepers that
        # were garbage-collected without cancel(): _fire cannot tell whether theirs was live.
        kept: dict[int, tuple[float, int, weakref.ref[Sleeper]]] = {}
        for entry in self._heap:
            sleeper = entry[2]()
            if sleeper is not None and sleeper.timer_queued == entry[0]:
                kept.setdefault(id(sleeper), entry)
        self._heap = list(kept.values())
        heapify(self._heap)
        self._live = len(self._heap)
