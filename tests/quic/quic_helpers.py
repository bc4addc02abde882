"""Helpers for the QUIC driver tests: certificates, configurations, servers, echo."""

from __future__ import annotations

import functools
import hashlib
import random
import socket
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from theta._quic import (
    QuicConfig,
    QuicConnection,
    QuicServer,
    QuicStream,
    SelfSignedCertificate,
    _engine,
    generate_self_signed_certificate,
    serve_quic,
)


@functools.cache
def certificate() -> SelfSignedCertificate:
    """One self-signed certificate for the whole test session."""
    return generate_self_signed_certificate()


def server_config(**overrides: object) -> QuicConfig:
    """A server configuration with the test certificate."""
    cert = certificate()
    return QuicConfig(
        certificate=cert.certificate_pem,
        private_key=cert.private_key_pem,
        **overrides,  # type: ignore[arg-type]
    )


def client_config(**overrides: object) -> QuicConfig:
    """A verifying client configuration trusting the test certificate."""
    return QuicConfig(ca_certs=certificate().certificate_pem, **overrides)  # type: ignore[arg-type]


Handler = Callable[[QuicConnection], Awaitable[None]]


async def start_server(
    nursery: trio.Nursery, handler: Handler, host: str = "127.0.0.1", **overrides: object
) -> QuicServer:
    """Start ``serve_quic`` in ``nursery`` on an ephemeral port and return the server."""
    server: QuicServer = await nursery.start(
        functools.partial(serve_quic, handler, host, 0, server_config(**overrides))
    )
    return server


async def echo_stream(stream: QuicStream) -> None:
    """Echo ``stream`` until EOF, then send EOF and close it (quietly ends if broken)."""
    async with stream:
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            return


async def echo_handler(connection: QuicConnection) -> None:
    """Echo every stream the peer opens until the connection ends."""
    async with trio.open_nursery() as streams:
        while True:
            try:
                stream = await connection.accept_stream()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            streams.start_soon(echo_stream, stream)


async def read_all(stream: QuicStream, limit: int = 1 << 30) -> bytes:
    """Read ``stream`` to EOF (at most ``limit`` bytes)."""
    chunks = bytearray()
    while data := await stream.receive_some():
        chunks += data
        assert len(chunks) <= limit
    return bytes(chunks)


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


async def send_in_chunks(stream: QuicStream, data: bytes, chunk: int = 65536) -> None:
    """``send_all`` ``data`` in ``chunk``-sized pieces."""
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        await stream.send_all(view[start : start + chunk])


async def digest_handler(connection: QuicConnection) -> None:
    """For each stream: read to EOF, reply with the SHA-256 of what was read, then EOF."""
    async with trio.open_nursery() as streams:
        while True:
            try:
                stream = await connection.accept_stream()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            streams.start_soon(_digest_stream, stream)


async def _digest_stream(stream: QuicStream) -> None:
    async with stream:
        digest = hashlib.sha256()
        while data := await stream.receive_some():
            digest.update(data)
        await stream.send_all(digest.digest())
        await stream.send_eof()


def count_tasks(root: trio.lowlevel.Task | None = None) -> int:
    """Number of tasks in the tree under ``root`` (default: the whole run), root included."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for n in task.child_nurseries for child in n.child_tasks)

    if root is None:
        root = trio.lowlevel.current_root_task()
        assert root is not None
    return count(root)


async def send_silent_initial(server: QuicServer, *, token: bytes = b"") -> None:
    """Send ``server`` a genuine client Initial (carrying ``token``) from a client that
    never answers, and let the server take it in."""
    configuration = _engine.build_configuration(
        client_config(), is_client=True, server_name="localhost"
    )
    configuration.token = token
    engine = _engine.create_connection(configuration)
    engine.connect(server.address, now=trio.current_time())
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for data, _ in engine.datagrams_to_send(now=trio.current_time()):
            await sock.sendto(data, server.address)
    await trio.testing.wait_all_tasks_blocked()
