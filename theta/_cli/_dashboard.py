"""The demo's live diagnostics table and its closing summary (plain text, ANSI redraw)."""

from __future__ import annotations

import dataclasses
from typing import TextIO

from theta import TransportDiagnostics

__all__ = ["Dashboard", "Traffic", "summary"]

_COLUMNS = (
    ("t s", 6),
    ("side", 7),
    ("rtt ms", 8),
    ("p99 ms", 8),
    ("jitter ms", 11),
    ("hb out/in", 11),
    ("msgs/s out/in", 15),
    ("bytes/s out/in", 17),
    ("assets out/in", 15),
    ("lost", 6),
)


@dataclasses.dataclass
class Traffic:
    """Application traffic one side has sent and received so far."""

    messages_out: int = 0
    messages_in: int = 0
    payload_out: int = 0
    payload_in: int = 0
    assets_out: int = 0
    assets_in: int = 0
    asset_bytes_out: int = 0
    asset_bytes_in: int = 0
    mismatches: int = 0
    asset_mismatches: int = 0


@dataclasses.dataclass(frozen=True)
class _Sample:
    time: float
    messages_out: int
    messages_in: int
    bytes_out: int
    bytes_in: int


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def _si(value: float) -> str:
    """``value`` with a k/M/G suffix, e.g. ``14.2k``."""
    for unit in ("", "k", "M"):
        if abs(value) < 1000:
            return f"{value:.0f}{unit}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}G"


def _row(cells: tuple[str, ...]) -> str:
    return "".join(
        cell.ljust(width) if i < 2 else cell.rjust(width)
        for i, (cell, (_, width)) in enumerate(zip(cells, _COLUMNS, strict=True))
    ).rstrip()


class Dashboard:
    """Renders one row per side each refresh.

    On a terminal the title, header and rows are redrawn in place (ANSI cursor movement);
    otherwise the header is printed once and rows are appended, one per side per refresh.
    """

    def __init__(self, out: TextIO, title: str, *, tty: bool) -> None:
        self._out = out
        self._title = title
        self._tty = tty
        self._drawn_lines = 0
        self._previous: dict[str, _Sample] = {}

    def _cells(
        self, now: float, side: str, diagnostics: TransportDiagnostics, traffic: Traffic
    ) -> tuple[str, ...]:
        sample = _Sample(
            now,
            traffic.messages_out,
            traffic.messages_in,
            diagnostics.bytes_sent,
            diagnostics.bytes_received,
        )
        before = self._previous.get(side, _Sample(now - diagnostics.uptime, 0, 0, 0, 0))
        self._previous[side] = sample
        span = max(sample.time - before.time, 1e-9)

        def rate(out: int, in_: int, out_before: int, in_before: int) -> str:
            return f"{_si((out - out_before) / span)}/{_si((in_ - in_before) / span)}"

        return (
            f"{diagnostics.uptime:.1f}",
            side,
            _ms(diagnostics.rtt_latest),
            _ms(diagnostics.rtt_p99),
            _ms(diagnostics.jitter),
            f"{diagnostics.heartbeats_sent}/{diagnostics.heartbeats_received}",
            rate(sample.messages_out, sample.messages_in, before.messages_out, before.messages_in),
            rate(sample.bytes_out, sample.bytes_in, before.bytes_out, before.bytes_in),
            f"{traffic.assets_out}/{traffic.assets_in}",
            str(diagnostics.quic_lost_packets),
        )

    def refresh(self, now: float, sides: list[tuple[str, TransportDiagnostics, Traffic]]) -> None:
        """Draw the current figures of each ``(side, diagnostics, traffic)``."""
        rows = [_row(self._cells(now, *side)) for side in sides]
        header = _row(tuple(name for name, _ in _COLUMNS))
        if self._tty:
            lines = [self._title, header, *rows]
            up = f"\x1b[{self._drawn_lines}F" if self._drawn_lines else ""
            self._out.write(up + "".join(f"{line}\x1b[K\n" for line in lines))
            self._drawn_lines = len(lines)
        else:
            if not self._drawn_lines:
                self._out.write(f"{self._title}\n{header}\n")
                self._drawn_lines = 2
            self._out.write("".join(f"{row}\n" for row in rows))
        self._out.flush()


def summary(
    duration: float,
    client: TransportDiagnostics,
    server: TransportDiagnostics | None,
    traffic: Traffic,
) -> list[str]:
    """The closing summary, from the client's point of view (and the server's heartbeats)."""
    rate = traffic.messages_out / duration if duration > 0 else 0.0
    lines = [
        f"summary after {duration:.1f} s:",
        f"  replication  {traffic.messages_out} messages sent ({rate:.1f}/s,"
        f" {_si(traffic.payload_out)}B), {traffic.messages_in} echoed back"
        f" ({_si(traffic.payload_in)}B, {traffic.mismatches} mismatched)",
        f"  assets       {traffic.assets_out} sent ({_si(traffic.asset_bytes_out)}B),"
        f" {traffic.assets_in} echoed back ({_si(traffic.asset_bytes_in)}B,"
        f" {traffic.asset_mismatches} mismatched)",
        f"  heartbeats   client {client.heartbeats_sent} sent / {client.heartbeats_received}"
        " received"
        + (
            f", server {server.heartbeats_sent} sent / {server.heartbeats_received} received"
            if server is not None
            else ""
        ),
        f"  rtt          min {_ms(client.rtt_min)} ms, p50 {_ms(client.rtt_p50)} ms,"
        f" p90 {_ms(client.rtt_p90)} ms, p99 {_ms(client.rtt_p99)} ms,"
        f" jitter {_ms(client.jitter)} ms (QUIC smoothed {_ms(client.quic_smoothed_rtt)} ms)",
        f"  transport    {client.datagrams_sent} datagrams / {_si(client.bytes_sent)}B sent,"
        f" {client.datagrams_received} / {_si(client.bytes_received)}B received,"
        f" {client.quic_lost_packets} packets lost",
    ]
    if client.compression_ratio is not None:
        lines.append(f"  zstd         replication payloads {client.compression_ratio:.2f}x smaller")
    return lines
