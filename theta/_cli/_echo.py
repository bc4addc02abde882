"""``theta echo-server`` and ``theta echo-client``: the interoperability pair."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets

import trio

import theta
from theta._cli._common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandFailed,
    capabilities,
    load_manifest,
    read_pem,
    run,
    session_config,
)

__all__ = ["echo_client", "echo_server"]

logger = logging.getLogger("theta.cli")

_MIN_PAYLOAD, _MAX_PAYLOAD = 1, 512  # random replication payload sizes, bytes


# -- server ----------------------------------------------------------------------------


async def _echo_replication(session: theta.Session) -> None:
    with contextlib.suppress(theta.SessionClosed):  # over: wait_closed() says why
        async for message in session.replication:
            await session.replication.send(message.payload, tick=message.tick)
        await session.replication.finish()  # mirror the end of the client's direction


async def _echo_assets(session: theta.Session) -> None:
    with contextlib.suppress(theta.SessionClosed):
        while True:
            try:
                asset = await session.assets.receive()
            except trio.EndOfChannel:
                break
            await session.assets.send(asset.name, asset.data)
        await session.assets.finish()


async def echo_handler(session: theta.Session) -> None:
    """Echo every replication message and asset back until the client ends the session.

    The end of a client direction (FIN) is mirrored, but the client closes the session:
    closing it here could cut off echoes still in flight."""
    host, port = session.peer_address
    logger.info("session %#x from %s:%d established", session.session_id, host, port)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_echo_replication, session)
        nursery.start_soon(_echo_assets, session)
    closed = await session.wait_closed()
    logger.info("session %#x ended: %s", session.session_id, closed)


def echo_server(args: argparse.Namespace) -> int:
    """Validate the arguments, then serve until interrupted."""
    config = session_config(
        lambda: theta.ServerConfig(
            certificate=read_pem(args.cert, "--cert"),
            private_key=read_pem(args.key, "--key"),
            manifest=load_manifest(args.manifest),
            capabilities=capabilities(args.capability),
            handshake_timeout=args.handshake_timeout,
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_timeout=args.heartbeat_timeout,
        )
    )

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            try:
                server: theta.Server = await nursery.start(
                    theta.serve, echo_handler, args.listen.host, args.listen.port, config
                )
            except ValueError as error:  # the TLS stack refused the certificate or key
                raise CommandFailed(f"cannot use --cert/--key: {error}", EXIT_USAGE) from None
            except OSError as error:  # the address is taken or not this host's
                raise CommandFailed(
                    f"cannot listen on {args.listen.text()}: {error.strerror}", EXIT_USAGE
                ) from None
            print(f"listening on {args.listen.text(server.port)}", flush=True)
            logger.info(
                "schema hash %#018x, capabilities %s",
                config.schema_hash,
                ", ".join(f"{c:#x}" for c in config.capabilities),
            )
        return EXIT_OK  # pragma: no cover - serve() runs until cancelled

    return run("echo-server", main)


# -- client ----------------------------------------------------------------------------


class _Tally:
    """What came back, compared with what was sent."""

    def __init__(self, messages: dict[int, bytes], asset: tuple[str, bytes]) -> None:
        self.expected_messages = messages
        self.expected_asset = asset
        self.echoed_messages = 0
        self.asset_echoed = False

    def progress(self) -> str:
        return (
            f"{self.echoed_messages}/{len(self.expected_messages)} messages and"
            f" {int(self.asset_echoed)}/1 asset echoed"
        )


async def _check_replication(session: theta.Session, tally: _Tally) -> None:
    pending = dict(tally.expected_messages)
    while pending:
        try:
            message = await session.replication.receive()
        except trio.EndOfChannel:
            raise CommandFailed(
                f"the server ended the replication channel with {len(pending)} echoes missing"
            ) from None
        expected = pending.pop(message.tick, None)
        if expected is None:
            raise CommandFailed(f"unexpected or repeated echo for tick {message.tick}")
        if message.payload != expected:
            raise CommandFailed(
                f"echo mismatch for tick {message.tick}: sent {len(expected)} bytes,"
                f" got {len(message.payload)} bytes back that differ"
            )
        tally.echoed_messages += 1


async def _check_asset(session: theta.Session, tally: _Tally) -> None:
    try:
        asset = await session.assets.receive()
    except trio.EndOfChannel:
        raise CommandFailed(
            "the server ended the assets channel without echoing the asset"
        ) from None
    name, data = tally.expected_asset
    if asset.name != name:
        raise CommandFailed(f"asset echo mismatch: sent name {name!r}, got {asset.name!r}")
    if asset.data != data:
        raise CommandFailed(
            f"asset echo mismatch: sent {len(data)} bytes, got {len(asset.data)} bytes that differ"
        )
    tally.asset_echoed = True


async def _send(session: theta.Session, tally: _Tally) -> None:
    for tick, payload in tally.expected_messages.items():
        await session.replication.send(payload, tick=tick)
    await session.replication.finish()
    name, data = tally.expected_asset
    await session.assets.send(name, data)
    await session.assets.finish()


def echo_client(args: argparse.Namespace) -> int:
    """Send random messages and one random asset; check that they all come back intact."""
    config = session_config(
        lambda: theta.ClientConfig(
            ca_certs=read_pem(args.ca, "--ca"),
            server_name=args.server_name,
            manifest=load_manifest(args.manifest),
            capabilities=capabilities(args.capability),
            handshake_timeout=args.handshake_timeout,
        )
    )
    first_tick = secrets.randbelow(2**32)
    messages = {
        first_tick + i: os.urandom(_MIN_PAYLOAD + secrets.randbelow(_MAX_PAYLOAD))
        for i in range(args.messages)
    }
    tally = _Tally(messages, (f"echo-{secrets.token_hex(4)}.bin", os.urandom(args.asset_size)))

    async def main() -> int:
        start = trio.current_time()
        async with theta.connect(args.connect.host, args.connect.port, config) as session:
            established = trio.current_time()
            logger.info(
                "session %#x established, role %s, capabilities %s",
                session.session_id,
                session.role,
                ", ".join(f"{c:#x}" for c in session.negotiated_capabilities),
            )
            with trio.move_on_after(args.timeout) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_send, session, tally)
                    nursery.start_soon(_check_replication, session, tally)
                    nursery.start_soon(_check_asset, session, tally)
            if scope.cancelled_caught:
                raise CommandFailed(f"timed out after {args.timeout:g} s: {tally.progress()}")
            done = trio.current_time()  # before the close: the echo time is the echoes'
            rtt = session.diagnostics().rtt_smoothed
        rtt_text = f", heartbeat RTT {rtt * 1000:.2f} ms" if rtt is not None else ""
        print(
            f"ok: {len(messages)} message{'' if len(messages) == 1 else 's'} and a"
            f" {args.asset_size}-byte asset echoed intact"
            f" by {args.connect.text()} (handshake {(established - start) * 1000:.0f} ms,"
            f" echo {(done - established) * 1000:.0f} ms{rtt_text})",
            flush=True,
        )
        return EXIT_OK

    return run("echo-client", main)
