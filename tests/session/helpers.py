"""Helpers for the session tests: certificate, configurations, servers, task counting."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
import trio.testing

import theta
from theta import ClientConfig, Server, ServerConfig, Session, SessionClosed
from theta._quic import SelfSignedCertificate


@functools.cache
def certificate() -> SelfSignedCertificate:
    """One self-signed certificate for the whole test run."""
    return theta.generate_self_signed_certificate()


def server_config(**overrides: Any) -> ServerConfig:
    """A server configuration with the test certificate."""
    cert = certificate()
    fields: dict[str, Any] = {
        "certificate": cert.certificate_pem,
        "private_key": cert.private_key_pem,
    }
    return ServerConfig(**(fields | overrides))


def client_config(**overrides: Any) -> ClientConfig:
    """A verifying client configuration trusting the test certificate."""
    fields: dict[str, Any] = {"ca_certs": certificate().certificate_pem, "server_name": "localhost"}
    return ClientConfig(**(fields | overrides))


async def start_server(
    nursery: trio.Nursery,
    handler: Callable[[Session], Awaitable[object]],
    host: str = "127.0.0.1",
    **overrides: Any,
) -> Server:
    """Start ``theta.serve`` in ``nursery`` on an ephemeral port."""
    server: Server = await nursery.start(
        functools.partial(theta.serve, handler, host, 0, server_config(**overrides))
    )
    return server


async def echo(session: Session) -> None:
    """Echo replication messages and assets until the peer finishes both."""

    async def replication() -> None:
        async for message in session.replication:
            await session.replication.send(message.payload, tick=message.tick)

    async def assets() -> None:
        while True:
            try:
                asset = await session.assets.receive()
            except trio.EndOfChannel:
                await session.assets.finish()
                return
            await session.assets.send(asset.name, asset.data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(replication)
        nursery.start_soon(assets)
    await session.wait_closed()


class SessionEnds:
    """A server handler (:meth:`handler`) that records how each of its sessions ended."""

    def __init__(self) -> None:
        self.seen: list[SessionClosed] = []
        self._added = trio.Event()

    async def handler(self, session: Session) -> None:
        self.seen.append(await session.wait_closed())
        self._added.set()
        self._added = trio.Event()

    async def wait(self, count: int = 1) -> list[SessionClosed]:
        """Wait until ``count`` sessions have ended; return how they ended."""
        while len(self.seen) < count:
            await self._added.wait()
        return self.seen


async def tasks_left_after(body: Callable[[], Awaitable[object]]) -> int:
    """Run ``body`` in a task of its own; return how many tasks it left running below it."""
    left: list[int] = []

    async def run() -> None:
        await body()
        await trio.testing.wait_all_tasks_blocked()
        left.append(count_tasks() - 1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
    return left[0]


def count_tasks() -> int:
    """Tasks alive under the current task (a test's own tasks, not its fixtures')."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    return walk(trio.lowlevel.current_task())


def session_task_names() -> list[str]:
    """Names of the session-layer tasks alive under the current task."""
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        if task.name.startswith(("theta._session", "theta._replication", "theta._asset")):
            names.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_task())
    return names


@contextlib.asynccontextmanager
async def cancellable_server(
    handler: Callable[[Session], Awaitable[object]],
) -> AsyncIterator[tuple[theta.Server, trio.CancelScope]]:
    """``theta.serve`` in a nursery of its own, with the scope that stops it; the block
    ends once the server has stopped (after the scope is cancelled)."""
    async with trio.open_nursery() as nursery:
        server_scope = trio.CancelScope()

        async def run_server(*, task_status: trio.TaskStatus[theta.Server]) -> None:
            with server_scope:
                await theta.serve(handler, "127.0.0.1", 0, server_config(), task_status=task_status)

        server: theta.Server = await nursery.start(run_server)
        yield server, server_scope
