"""``theta demo``: a server and a client on loopback in one process, with live diagnostics.

The client sends a small replication message (a moving entity's position) at a steady rate
and an asset every few seconds; the server echoes both back. A table of heartbeat RTT,
jitter, heartbeats and throughput is refreshed every second, and a summary ends the run.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import struct
import sys

import trio

import theta
from theta._cli._common import EXIT_FAILURE, EXIT_OK, run, session_config
from theta._cli._dashboard import Dashboard, Traffic, summary

__all__ = ["demo"]

MANIFEST = {"Position": "x:f32,y:f32,z:f32", "Velocity": "dx:f32,dy:f32,dz:f32"}
_POSITION = struct.Struct("!Qfff")  # entity id, x, y, z
_REFRESH = 1.0  # seconds between table redraws


def _position(tick: int, rate: float) -> bytes:
    """Entity 1 circling the origin, one lap every 4 seconds."""
    angle = 2 * math.pi * tick / (4 * rate)
    return _POSITION.pack(1, 10 * math.cos(angle), 10 * math.sin(angle), 0.0)


class _Demo:
    """The traffic of both sides, and its counters."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rate: float = args.rate
        self.asset_size: int = args.asset_size
        self.asset_interval: float = args.asset_interval
        self.client = Traffic()
        self.server = Traffic()
        self.sent: dict[int, bytes] = {}
        self.sent_assets: dict[str, bytes] = {}  # name: SHA-256 of what was sent

    async def server_handler(self, session: theta.Session) -> None:
        """Echo replication messages and assets, counting them."""

        async def echo_replication() -> None:
            async for message in session.replication:
                self.server.messages_in += 1
                self.server.payload_in += len(message.payload)
                await session.replication.send(message.payload, tick=message.tick)
                self.server.messages_out += 1
                self.server.payload_out += len(message.payload)

        async def echo_assets() -> None:
            while True:
                try:
                    asset = await session.assets.receive()
                except (trio.EndOfChannel, theta.SessionClosed):
                    return
                self.server.assets_in += 1
                self.server.asset_bytes_in += len(asset.data)
                await session.assets.send(asset.name, asset.data)
                self.server.assets_out += 1
                self.server.asset_bytes_out += len(asset.data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo_replication)
            nursery.start_soon(echo_assets)
        await session.wait_closed()

    async def send_replication(self, session: theta.Session) -> None:
        start = trio.current_time()
        for tick in range(1, 2**62):
            await trio.sleep_until(start + tick / self.rate)
            payload = _position(tick, self.rate)
            self.sent[tick] = payload
            await session.replication.send(payload, tick=tick)
            self.client.messages_out += 1
            self.client.payload_out += len(payload)

    async def receive_replication(self, session: theta.Session) -> None:
        async for message in session.replication:
            if self.sent.pop(message.tick, None) != message.payload:
                self.client.mismatches += 1
            self.client.messages_in += 1
            self.client.payload_in += len(message.payload)

    async def send_assets(self, session: theta.Session) -> None:
        for number in range(1, 2**62):
            data = os.urandom(self.asset_size)
            name = f"demo/asset-{number}.bin"
            self.sent_assets[name] = hashlib.sha256(data).digest()
            await session.assets.send(name, data)
            self.client.assets_out += 1
            self.client.asset_bytes_out += len(data)
            await trio.sleep(self.asset_interval)

    async def receive_assets(self, session: theta.Session) -> None:
        while True:
            try:
                asset = await session.assets.receive()
            except (trio.EndOfChannel, theta.SessionClosed):
                return
            if self.sent_assets.pop(asset.name, None) != hashlib.sha256(asset.data).digest():
                self.client.asset_mismatches += 1
            self.client.assets_in += 1
            self.client.asset_bytes_in += len(asset.data)

    def sides(
        self, session: theta.Session, server: theta.Server
    ) -> list[tuple[str, theta.TransportDiagnostics, Traffic]]:
        sides = [("client", session.diagnostics(), self.client)]
        sides += [("server", peer.diagnostics(), self.server) for peer in server.sessions]
        return sides


async def _run(args: argparse.Namespace) -> int:
    certificate = theta.generate_self_signed_certificate()
    demo = _Demo(args)
    server_config = session_config(
        lambda: theta.ServerConfig(
            certificate=certificate.certificate_pem,
            private_key=certificate.private_key_pem,
            manifest=MANIFEST,
        )
    )
    client_config = session_config(
        lambda: theta.ClientConfig(
            ca_certs=certificate.certificate_pem, server_name="localhost", manifest=MANIFEST
        )
    )
    async with trio.open_nursery() as nursery:
        server: theta.Server = await nursery.start(
            theta.serve, demo.server_handler, "127.0.0.1", 0, server_config
        )
        async with theta.connect("127.0.0.1", server.port, client_config) as session:
            title = (
                f"theta demo: 127.0.0.1:{server.port}, session {session.session_id:#018x},"
                f" capabilities {[hex(c) for c in session.negotiated_capabilities]},"
                f" {args.rate:g} msgs/s, {args.duration:g} s"
            )
            dashboard = Dashboard(sys.stdout, title, tty=sys.stdout.isatty())
            with trio.move_on_after(args.duration):
                async with trio.open_nursery() as traffic:
                    traffic.start_soon(demo.send_replication, session)
                    traffic.start_soon(demo.receive_replication, session)
                    traffic.start_soon(demo.send_assets, session)
                    traffic.start_soon(demo.receive_assets, session)
                    start = trio.current_time()
                    for refresh in range(1, 2**62):
                        await trio.sleep_until(start + refresh * _REFRESH)
                        dashboard.refresh(trio.current_time(), demo.sides(session, server))
            duration = session.diagnostics().uptime
            client = session.diagnostics()
            peers = [peer.diagnostics() for peer in server.sessions]
        nursery.cancel_scope.cancel()
    print("\n".join(summary(duration, client, peers[0] if peers else None, demo.client)))
    return EXIT_FAILURE if demo.client.mismatches or demo.client.asset_mismatches else EXIT_OK


def demo(args: argparse.Namespace) -> int:
    """Run the demo for ``--duration`` seconds."""
    return run("demo", lambda: _run(args))
