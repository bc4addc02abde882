"""A Theta client embedded in a trio application: send, and read the echoes concurrently.

Start ``echo_server.py`` first (see its docstring), then::

    python examples/echo_client.py cert.pem 4433
"""

from __future__ import annotations

import sys

import trio

import theta


async def send(session: theta.Session) -> None:
    for tick in range(5):
        await session.replication.send(f"position of entity 7 at tick {tick}".encode(), tick=tick)
    await session.assets.send("level-1.map", bytes(range(256)) * 1024)


async def main(ca_file: str, port: int) -> None:
    config = theta.ClientConfig(ca_certs=ca_file, server_name="localhost")
    async with theta.connect("127.0.0.1", port, config) as session:
        print(f"session {session.session_id:#x}, role {session.role!r}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, session)
            for _ in range(5):
                message = await session.replication.receive()
                print(f"tick {message.tick}: {message.payload.decode()}")
            asset = await session.assets.receive()
            print(f"asset {asset.name!r}: {len(asset.data)} bytes back")
        stats = session.diagnostics()
        rtt = (
            "not measured yet"
            if stats.rtt_smoothed is None
            else f"{stats.rtt_smoothed * 1e3:.2f} ms"
        )
        print(f"heartbeat RTT {rtt}, {stats.bytes_sent} bytes sent")
    # Leaving the block closed the session gracefully (NO_ERROR).


if __name__ == "__main__":
    try:
        trio.run(main, sys.argv[1], int(sys.argv[2]))
    except theta.HandshakeRejected as error:  # the server said no, with its code
        sys.exit(f"rejected: {error.code.name}: {error.reason}")
    except theta.ServerUnreachable as error:  # nothing answered, or nothing listens
        sys.exit(f"server unreachable: {error.reason}")
    except theta.ProtocolError as error:  # handshake failed or timed out
        sys.exit(f"handshake: {error.code.name}: {error.reason}")
    except theta.TransportError as error:  # e.g. the certificate was not trusted
        sys.exit(f"QUIC/TLS error {error.code:#x}: {error.reason}")
    except theta.SessionClosed as error:  # the session ended before the echoes came back
        sys.exit(str(error))
    except (OSError, ValueError) as error:  # e.g. the CA file is unreadable or no PEM
        sys.exit(str(error))
