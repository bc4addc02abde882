"""``theta.connect`` and ``theta.serve`` refuse what is not a UDP port (``getaddrinfo`` would
silently take a port above 65535 modulo 65536)."""

from __future__ import annotations

import pytest
import trio

import theta

from .helpers import client_config, echo, server_config, start_server


async def test_connect_refuses_a_port_beyond_65535(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, echo)
    with trio.fail_after(5), pytest.raises(ValueError, match=r"port must be in 1\.\.65535"):
        async with theta.connect("127.0.0.1", server.port + 65536, client_config()):
            pytest.fail("must not reach the server on port % 65536")  # pragma: no cover


@pytest.mark.parametrize(
    ("port", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (65536, ValueError),
        ("4433", TypeError),
        (True, TypeError),
    ],
)
async def test_connect_refuses_a_bad_port(port: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="port must be"):
        async with theta.connect("127.0.0.1", port, client_config()):  # type: ignore[arg-type]
            pytest.fail("must not connect")  # pragma: no cover


@pytest.mark.parametrize(
    ("port", "error"),
    [(-1, ValueError), (65536, ValueError), ("0", TypeError), (4433.0, TypeError)],
)
async def test_serve_refuses_a_bad_port(port: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="port must be"):
        await theta.serve(echo, "127.0.0.1", port, server_config())  # type: ignore[arg-type]
