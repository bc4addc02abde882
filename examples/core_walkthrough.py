"""A Theta session's protocol, end to end, over in-memory bytes — no network, no clock.

A client and a server built from ``theta.core`` complete the Ed25519-signed handshake,
exchange heartbeats with simulated one-way delays and send a few replication frames. Every
message travels as encoded frame bytes through a ``FrameDecoder``, exactly as it would over a
QUIC stream. Run: ``python examples/core_walkthrough.py``.
"""

from __future__ import annotations

from typing import TypeVar

from theta.core import (
    CAP_ZSTD,
    Channel,
    ChannelOpen,
    ClientHandshake,
    FrameDecoder,
    HeartbeatTracker,
    Message,
    ReplicationMessage,
    Role,
    ServerHandshake,
    encode_frame,
    schema_hash,
)

M = TypeVar("M", bound=Message)
MANIFEST = {"Position": "x:f32,y:f32,z:f32", "Velocity": "dx:f32,dy:f32,dz:f32"}
ONE_WAY = 0.012  # simulated one-way delay, seconds


def carry(message: M, decoder: FrameDecoder) -> M:
    """Encode ``message`` and decode it on the other side, as a stream would."""
    frame = encode_frame(message)
    (received,) = decoder.feed(frame)
    assert type(received) is type(message)
    print(f"  {type(message).__name__:<20} {len(frame):>5} bytes")
    return received


def main() -> None:
    now = 100.0
    manifest_hash = schema_hash(MANIFEST)
    client = ClientHandshake(schema_hash=manifest_hash, capabilities=[7, CAP_ZSTD])
    server = ServerHandshake(
        schema_hash=manifest_hash,
        capabilities=[CAP_ZSTD, 7, 9],
        authenticator=lambda token, key, address: int(Role.REPLICATE | Role.UPLOAD_ASSETS),
        peer_address=("127.0.0.1", 50000),
        now=now,
    )
    server_control = FrameDecoder(None)  # the server learns the channel from the first frame
    client_control = FrameDecoder(Channel.CONTROL)

    print(f"schema hash {manifest_hash:#018x}\nhandshake:")
    acknowledge = server.receive(carry(client.start(now), server_control), now + ONE_WAY)
    assert acknowledge is not None
    confirm = client.receive(carry(acknowledge, client_control), now + 2 * ONE_WAY)
    server.receive(carry(confirm, server_control), now + 3 * ONE_WAY)
    print(
        f"  established: session {server.session_id:#018x}, role {client.role!r},"
        f" capabilities {[hex(c) for c in client.negotiated_capabilities]}"
    )

    print("heartbeats:")
    now += 3 * ONE_WAY
    client_beats = HeartbeatTracker(now=now)
    server_beats = HeartbeatTracker(now=now + 5.0)  # another clock origin: it does not matter
    for _ in range(4):
        server_beats.receive(carry(client_beats.build(now), server_control), now + 5.0 + ONE_WAY)
        reply = server_beats.build(now + 5.0 + ONE_WAY + 0.002)  # held 2 ms before the reply
        client_beats.receive(carry(reply, client_control), now + 2 * ONE_WAY + 0.002)
        now += 0.5
    metrics = client_beats.metrics()
    assert metrics.latest_rtt is not None
    print(
        f"  client RTT {metrics.latest_rtt * 1e3:.1f} ms (one-way {ONE_WAY * 1e3:.0f} ms each way),"
        f" jitter {(metrics.jitter or 0.0) * 1e3:.2f} ms, sent {metrics.heartbeats_sent},"
        f" received {metrics.heartbeats_received}"
    )

    print("replication:")
    replication = FrameDecoder(None)
    carry(ChannelOpen(Channel.REPLICATION), replication)
    for tick in range(1, 4):
        delta = carry(ReplicationMessage(tick=tick, payload=b"x=%d" % tick), replication)
        assert isinstance(delta, ReplicationMessage)
        print(f"    tick {delta.tick}: {delta.payload!r}")


if __name__ == "__main__":
    main()
