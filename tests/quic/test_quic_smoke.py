from __future__ import annotations

import trio

from theta._quic import QuicServer, open_quic_connection

from .quic_helpers import client_config


async def test_echo_small(echo_server: QuicServer) -> None:
    with trio.fail_after(10):
        async with open_quic_connection("127.0.0.1", echo_server.port, client_config()) as conn:
            stream = await conn.open_stream()
            await stream.send_all(b"hello")
            await stream.send_eof()
            got = b""
            while data := await stream.receive_some():
                got += data
            assert got == b"hello"
