"""A seeded, hostile UDP link for tests: a relay between clients and a server on loopback.

The relay listens on its own address; point a client at :attr:`LinkConditioner.address`
and it forwards to the server, applying per direction, in this order: a drop filter,
bursty loss (Gilbert–Elliott), independent loss, duplication, reordering, and delay with
jitter. Every random choice comes from a ``random.Random`` seeded per direction, so a run
is reproducible given the same traffic. Each client address gets its own upstream socket
(like a NAT), so many clients can share one conditioner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import random
import socket
from collections.abc import Callable
from typing import Any

import trio

Address = tuple[Any, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class GilbertElliott:
    """Two-state bursty loss: per datagram, move good→bad with ``p_enter_bad`` and
    bad→good with ``p_leave_bad``, then drop with ``loss_in_bad`` / ``loss_in_good``."""

    p_enter_bad: float = 0.01
    p_leave_bad: float = 0.3
    loss_in_bad: float = 0.5
    loss_in_good: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check(field.name, getattr(self, field.name), 1.0)


@dataclasses.dataclass(frozen=True, slots=True)
class LinkConditionerConfig:
    """Impairments of one direction of the link (probabilities in [0, 1], times in s).

    ``reorder`` holds a datagram back by an extra ``reorder_delay`` so later ones overtake
    it. ``jitter`` adds a uniform delay in ``[-jitter, +jitter]`` (never below zero), so
    it may reorder too. ``drop`` is called with each datagram; returning True drops it
    (e.g. to cut one direction entirely or to drop only ACK-sized packets).
    """

    loss: float = 0.0
    burst_loss: GilbertElliott | None = None
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.01
    delay: float = 0.0
    jitter: float = 0.0
    drop: Callable[[bytes], bool] | None = None

    def __post_init__(self) -> None:
        """``ValueError`` for a probability outside [0, 1] or a negative or infinite time,
        ``TypeError`` for anything else that is not a number (or a callable ``drop``)."""
        for name in ("loss", "duplicate", "reorder"):
            _check(name, getattr(self, name), 1.0)
        for name in ("reorder_delay", "delay", "jitter"):
            _check(name, getattr(self, name), math.inf)
        if self.burst_loss is not None and not isinstance(self.burst_loss, GilbertElliott):
            raise TypeError(f"burst_loss must be a GilbertElliott, not {self.burst_loss!r}")
        if self.drop is not None and not callable(self.drop):
            raise TypeError(f"drop must be callable, not {self.drop!r}")


def _check(name: str, value: object, most: float) -> None:
    """A probability (``most`` 1) or a time in seconds (``most`` inf, excluded)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {value!r}")
    if most == math.inf and not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
    if not 0 <= value <= most:
        raise ValueError(f"{name} must be a probability in [0, 1], not {value!r}")


@dataclasses.dataclass
class DirectionStats:
    """What one direction of the conditioner did to the datagrams it saw."""

    received: int = 0
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0


class _Direction:
    def __init__(self, config: LinkConditionerConfig, seed: int) -> None:
        self.config = config
        self.random = random.Random(seed)
        self.bad_state = False
        self.stats = DirectionStats()

    def schedule(self, now: float) -> list[float]:
        """Delivery times for one datagram (empty: dropped; two: duplicated)."""
        config, rng = self.config, self.random
        self.stats.received += 1
        burst = config.burst_loss
        if burst is not None:
            flip = rng.random()
            if self.bad_state and flip < burst.p_leave_bad:
                self.bad_state = False
            elif not self.bad_state and flip < burst.p_enter_bad:
                self.bad_state = True
            if rng.random() < (burst.loss_in_bad if self.bad_state else burst.loss_in_good):
                self.stats.dropped += 1
                return []
        if rng.random() < config.loss:
            self.stats.dropped += 1
            return []
        copies = 2 if rng.random() < config.duplicate else 1
        self.stats.duplicated += copies - 1
        times = []
        for _ in range(copies):
            delay = config.delay + (
                rng.uniform(-config.jitter, config.jitter) if config.jitter else 0.0
            )
            if rng.random() < config.reorder:
                delay += config.reorder_delay
                self.stats.reordered += 1
            times.append(now + max(0.0, delay))
        self.stats.forwarded += copies
        return times


class LinkConditioner:
    """A UDP relay to ``server`` impairing traffic as configured, until cancelled.

    Start it with ``conditioner = LinkConditioner(...); await nursery.start(conditioner.run)``
    and connect clients to ``conditioner.address``. Impairments can be changed while it
    runs with :meth:`configure` (e.g. cut the server→client direction mid-test).
    """

    def __init__(
        self,
        server: Address,
        to_server: LinkConditionerConfig | None = None,
        to_client: LinkConditionerConfig | None = None,
        *,
        seed: int = 0,
    ) -> None:
        self.server = tuple(server)
        self.family = socket.AF_INET6 if ":" in str(server[0]) else socket.AF_INET
        self._directions = {
            "to_server": _Direction(to_server or LinkConditionerConfig(), seed * 2 + 1),
            "to_client": _Direction(to_client or LinkConditionerConfig(), seed * 2 + 2),
        }
        self._listener: trio.socket.SocketType | None = None  # made by run()
        self._upstreams: dict[Address, trio.socket.SocketType] = {}
        # (when, order, data, client, destination): to the server (client set) through the
        # client's upstream socket as of delivery, to a client (None) through the listener.
        self._queue: list[tuple[float, int, bytes, Address | None, Address]] = []
        self._sequence = 0
        self._queue_changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    @property
    def address(self) -> Address:
        """Where clients should send (the relay's listening address); ``RuntimeError``
        until :meth:`run` has started."""
        if self._listener is None:
            raise RuntimeError("not running: start it with nursery.start(conditioner.run)")
        return tuple(self._listener.getsockname())

    @property
    def stats(self) -> dict[str, DirectionStats]:
        """Per-direction counters, keyed ``"to_server"`` and ``"to_client"``."""
        return {name: d.stats for name, d in self._directions.items()}

    def configure(
        self,
        *,
        to_server: LinkConditionerConfig | None = None,
        to_client: LinkConditionerConfig | None = None,
    ) -> None:
        """Replace the impairments of one or both directions (keeps the random streams)."""
        if to_server is not None:
            self._directions["to_server"].config = to_server
        if to_client is not None:
            self._directions["to_client"].config = to_client

    def rebind(self) -> None:
        """Act like a NAT that forgot its mappings: each client's next datagram to the
        server (already queued ones included) leaves from a new port, and what the server
        sends to the old ports is lost. For testing how a server follows a client whose
        address changed."""
        for upstream in self._upstreams.values():
            upstream.close()
        self._upstreams.clear()

    async def run(
        self, *, task_status: trio.TaskStatus[LinkConditioner] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Relay until cancelled; ``task_status.started(self)`` once listening."""
        host = "::1" if self.family == socket.AF_INET6 else "127.0.0.1"
        listener = self._listener = trio.socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            await listener.bind((host, 0))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._deliver_loop)
                nursery.start_soon(self._client_side_loop)
                task_status.started(self)
        finally:
            listener.close()
            for upstream in self._upstreams.values():
                upstream.close()
            # Ready to run again (fresh sockets; the statistics and random streams go on).
            self._upstreams.clear()
            self._queue.clear()
            self._listener = self._nursery = None

    def _enqueue(self, direction: str, data: bytes, client: Address | None, dest: Address) -> None:
        for when in self._directions[direction].schedule(trio.current_time()):
            self._sequence += 1
            heapq.heappush(self._queue, (when, self._sequence, data, client, dest))
        self._queue_changed.set()

    def _dropped_by_filter(self, direction: str, data: bytes) -> bool:
        direction_state = self._directions[direction]
        drop = direction_state.config.drop
        if drop is not None and drop(data):
            direction_state.stats.received += 1
            direction_state.stats.dropped += 1
            return True
        return False

    async def _client_side_loop(self) -> None:
        assert self._listener is not None
        while True:
            data, client = await self._listener.recvfrom(65536)
            if not self._dropped_by_filter("to_server", data):
                self._enqueue("to_server", data, tuple(client), self.server)

    async def _upstream(self, client: Address) -> trio.socket.SocketType:
        """The client's socket towards the server (its NAT mapping), made on first use."""
        upstream = self._upstreams.get(client)
        if upstream is None:
            assert self._nursery is not None
            upstream = trio.socket.socket(self.family, socket.SOCK_DGRAM)
            await upstream.bind(("::1" if self.family == socket.AF_INET6 else "127.0.0.1", 0))
            self._upstreams[client] = upstream
            self._nursery.start_soon(self._server_side_loop, upstream, client)
        return upstream

    async def _server_side_loop(self, upstream: trio.socket.SocketType, client: Address) -> None:
        while True:
            try:
                data, _ = await upstream.recvfrom(65536)
            except trio.ClosedResourceError:
                return  # rebound while waiting
            except OSError:
                if upstream.fileno() == -1:
                    return  # rebound between two reads
                continue  # e.g. an ICMP error reported by the socket
            if not self._dropped_by_filter("to_client", data):
                self._enqueue("to_client", data, None, client)

    async def _deliver_loop(self) -> None:
        while True:
            now = trio.current_time()
            while self._queue and self._queue[0][0] <= now:
                _, _, data, client, dest = heapq.heappop(self._queue)
                sock = await self._upstream(client) if client is not None else self._listener
                assert sock is not None
                with contextlib.suppress(OSError):  # e.g. the peer socket is gone
                    await sock.sendto(data, dest)
                now = trio.current_time()
            deadline = self._queue[0][0] if self._queue else math.inf
            self._queue_changed = trio.Event()
            with trio.move_on_at(deadline):
                await self._queue_changed.wait()
