"""A Theta echo server embedded in a trio application.

Every replication message and asset a client sends comes straight back. Run it together
with ``echo_client.py``::

    python -m theta cert --name localhost --cert-out cert.pem --key-out key.pem
    python examples/echo_server.py cert.pem key.pem 4433
    python examples/echo_client.py cert.pem 4433        # in another terminal
"""

from __future__ import annotations

import logging
import sys

import trio

import theta


async def echo(session: theta.Session) -> None:
    """Echo both channels; the client closes the session once it has its echoes."""

    async def replication() -> None:
        async for message in session.replication:  # until the client finishes or leaves
            await session.replication.send(message.payload, tick=message.tick)

    async def assets() -> None:
        while True:
            try:
                asset = await session.assets.receive()
            except trio.EndOfChannel:  # the client sent its last asset
                return
            await session.assets.send(asset.name, asset.data)

    # SessionClosed from either loop just means the session is over: serve() handles it.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(replication)
        nursery.start_soon(assets)
    await session.wait_closed()  # returning now would close it under echoes in flight


async def main(certificate: str, private_key: str, port: int) -> None:
    config = theta.ServerConfig(certificate=certificate, private_key=private_key)
    async with trio.open_nursery() as nursery:
        server: theta.Server = await nursery.start(theta.serve, echo, "127.0.0.1", port, config)
        print(f"echo server on {server.address[0]}:{server.port}, Ctrl-C to stop")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("quic").setLevel(logging.WARNING)
    cert_file, key_file, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        trio.run(main, cert_file, key_file, port)
    except* KeyboardInterrupt:  # Ctrl-C (raised inside a nursery, so maybe in a group)
        pass  # serve() has told every client GOING_AWAY
    except* (OSError, ValueError) as failed:  # unreadable or bad files, port in use
        sys.exit(f"cannot serve: {failed.exceptions[0]}")
