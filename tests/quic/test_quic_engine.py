"""The engine module against the pinned aioquic 1.7.2: private read-outs and credit policy.

A client and a server engine connection shuttle datagrams in memory with a simulated
clock (pacing and timers need time to pass).
"""

from __future__ import annotations

import importlib.metadata

import pytest
from aioquic.tls import Group

from theta._quic import _engine

from .quic_helpers import client_config, server_config

ADDR = ("127.0.0.1", 4433)


def test_pinned_aioquic_version() -> None:
    assert importlib.metadata.version("aioquic") == "1.7.2"


class Pair:
    def __init__(self, max_peer_streams: int = 16, **overrides: object) -> None:
        self.now = 1.0
        self.max_peer_streams = max_peer_streams
        self.client = _engine.create_connection(
            _engine.build_configuration(
                client_config(**overrides), is_client=True, server_name="localhost"
            )
        )
        self.server: _engine.EngineConnection | None = None
        self.server_config = _engine.build_configuration(
            server_config(**overrides), is_client=False
        )
        self.client.connect(ADDR, now=self.now)

    def shuttle(self, rounds: int = 1, *, drop_to_client: bool = False) -> None:
        for _ in range(rounds):
            self.now += 0.005
            for data, _ in self.client.datagrams_to_send(now=self.now):
                if self.server is None:
                    header = _engine.parse_header_untrusted(data, 8)
                    assert header is not None
                    self.server = _engine.create_connection(
                        self.server_config,
                        max_peer_streams=self.max_peer_streams,
                        original_destination_cid=header.destination_cid,
                    )
                self.server.receive_datagram(data, ADDR, now=self.now)
            assert self.server is not None
            for data, _ in self.server.datagrams_to_send(now=self.now):
                if not drop_to_client:
                    self.client.receive_datagram(data, ADDR, now=self.now)
            for connection in (self.client, self.server):
                timer = connection.get_timer()
                if timer is not None and timer <= self.now:
                    connection.handle_timer(now=self.now)


def test_handshake_and_stats_readout() -> None:
    pair = Pair()
    pair.shuttle(4)
    assert pair.client.is_handshake_complete
    stats = pair.client.read_stats()
    recovery = pair.client._loss
    assert stats.smoothed_rtt == recovery._rtt_smoothed > 0
    assert stats.min_rtt == recovery._rtt_min > 0
    assert stats.latest_rtt == recovery._rtt_latest
    assert stats.rtt_variance == recovery._rtt_variance
    assert stats.congestion_window == recovery.congestion_window > 0
    assert stats.bytes_in_flight == recovery.bytes_in_flight
    assert stats.lost_packets == 0


def test_fresh_connection_reports_zero_min_rtt() -> None:
    pair = Pair()
    assert pair.client.read_stats().min_rtt == 0.0


def test_losses_and_probes_are_counted() -> None:
    pair = Pair()
    pair.shuttle(4)
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(stream_id, b"x" * 200_000)
    pair.shuttle(60, drop_to_client=True)  # no ACKs: only timers can act
    stats = pair.client.read_stats()
    assert stats.probe_timeouts >= 1
    pair.shuttle(60)
    assert pair.client.unacked_send_bytes(stream_id) == 0


def test_unacked_send_bytes_tracks_the_sender_buffer() -> None:
    pair = Pair()
    pair.shuttle(4)
    stream_id = pair.client.get_next_available_stream_id()
    assert pair.client.unacked_send_bytes(stream_id) == 0
    pair.client.send_stream_data(stream_id, b"y" * 100_000)
    sender = pair.client._streams[stream_id].sender
    assert pair.client.unacked_send_bytes(stream_id) == 100_000
    assert sender._buffer_stop - sender._buffer_start == 100_000
    assert pair.client.has_unacknowledged_data()
    pair.shuttle(40)
    assert pair.client.unacked_send_bytes(stream_id) == 0


@pytest.mark.parametrize("read", [False, True])
def test_receive_credit_follows_what_the_application_read(read: bool) -> None:
    window = 64 * 1024
    pair = Pair(stream_receive_window=window)
    pair.shuttle(4)
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(stream_id, b"z" * 1_000_000)
    assert pair.server is not None
    delivered = 0
    for _ in range(80):
        pair.shuttle()
        while (event := pair.server.next_event()) is not None:
            if isinstance(event, _engine.StreamDataReceived):
                delivered += len(event.data)
                if read:
                    pair.server.stream_consumed(stream_id, delivered)
    if read:
        assert delivered == 1_000_000
    else:
        assert delivered == window  # a reader that never reads stalls the peer at one window
        assert pair.client.unacked_send_bytes(stream_id) == 1_000_000 - window


@pytest.mark.parametrize(("eager", "step"), [(False, 2), (True, 16)])
def test_credit_is_raised_in_steps_of_half_or_a_sixteenth_of_the_window(
    eager: bool, step: int
) -> None:
    window = 64 * 1024
    pair = Pair(stream_receive_window=window)
    pair.shuttle(4)
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(stream_id, b"z" * window)
    pair.shuttle(10)
    assert pair.server is not None
    if eager:
        pair.server.credit_eagerly(stream_id)
    due = [pair.server.stream_consumed(stream_id, read) for read in range(1, window, 512)]
    first_due = 1 + 512 * due.index(True)
    assert window // step <= first_due < window // step + 512


def test_malformed_headers_parse_to_none() -> None:
    assert _engine.parse_header_untrusted(b"", 8) is None
    assert _engine.parse_header_untrusted(b"\xc0\x00", 8) is None


@pytest.mark.parametrize(
    "data",
    [b"", b"\x40", b"\x40" + bytes(8), b"\x41" + bytes(9), b"\x7f" + bytes(range(20)),
     b"\x00" + bytes(20), b"\x80" + bytes(20), b"\xc0" + bytes(20)],
)  # fmt: skip
def test_the_short_header_fast_path_reads_what_the_full_parse_reads(data: bytes) -> None:
    cid = _engine.short_header_destination(data, 8)
    header = _engine.parse_header_untrusted(data, 8)
    if cid is not None:
        assert header is not None
        assert header.version is None
        assert cid == header.destination_cid
    else:  # a long header, a zero fixed bit, or too short to hold the id
        assert header is None or header.version is not None or len(data) <= 8


def test_termination_kinds() -> None:
    event = _engine.ConnectionTerminated(error_code=42, frame_type=None, reason_phrase="bye")
    assert _engine.termination_kind(event) == "application"
    idle = _engine.ConnectionTerminated(error_code=1, frame_type=0, reason_phrase="Idle timeout")
    assert _engine.termination_kind(idle) == "idle"
    tls = _engine.ConnectionTerminated(error_code=0x12A, frame_type=6, reason_phrase="bad cert")
    assert _engine.termination_kind(tls) == "transport"


def test_pacing_bucket_keeps_intended_burst_on_fast_paths() -> None:
    pair = Pair()
    pair.shuttle(4)
    pacer = pair.client._loss._pacer
    pacer.update_rate(congestion_window=8_000_000, smoothed_rtt=0.001)
    assert pacer.packet_time == pytest.approx(1e-6)  # aioquic's clamp
    assert pacer.bucket_max >= 16 * 1e-6  # 16 datagrams per burst, not 2-3
    pacer.update_rate(congestion_window=120_000, smoothed_rtt=0.05)
    assert pacer.packet_time is not None
    assert pacer.bucket_max == pytest.approx(16 * 1200 / (120_000 / 0.05))  # unchanged


def test_peer_stream_concurrency_is_capped() -> None:
    pair = Pair(max_peer_streams=2)
    pair.shuttle(4)
    ids = []
    for _ in range(3):
        stream_id = pair.client.get_next_available_stream_id()
        pair.client.send_stream_data(stream_id, b"open")
        ids.append(stream_id)
    pair.shuttle(4)
    assert [pair.client._streams[i].is_blocked for i in ids] == [False, False, True]


def test_peer_close_is_visible_before_the_draining_period_ends() -> None:
    pair = Pair()
    pair.shuttle(4)
    assert pair.server is not None
    assert pair.client.peer_close() is None
    pair.server.close(error_code=42, reason_phrase="bye")
    pair.shuttle(1)  # one exchange: the CONNECTION_CLOSE reached the client
    event = pair.client.peer_close()
    assert event is not None
    assert (event.error_code, event.reason_phrase) == (42, "bye")
    assert pair.server.peer_close() is None  # the closing side is not draining


def test_client_offers_two_key_shares_only() -> None:
    pair = Pair()
    groups = pair.client.tls._supported_groups
    assert groups == [Group.SECP256R1, Group.X25519]
    assert pair.client.tls._x448_private_key is None  # no key generated for other groups
    assert len(pair.client.tls._ec_private_keys) == 1  # P-256 only
    pair.shuttle(4)
    assert pair.client.is_handshake_complete


def test_frame_handler_table_is_shared_and_matches_aioquic() -> None:
    from aioquic.quic.connection import QuicConnection as AioquicConnection

    pair = Pair()
    pair.shuttle(3)
    assert pair.server is not None
    assert pair.client.is_handshake_complete
    plain = AioquicConnection(
        configuration=_engine.build_configuration(
            client_config(), is_client=True, server_name="localhost"
        )
    )
    aioquic_table = vars(plain)["_QuicConnection__frame_handlers"]
    for connection in (pair.client, pair.server):
        table = vars(connection)["_QuicConnection__frame_handlers"]
        assert 0 < len(table) < 10  # only the frame types this connection has met so far
        for frame_type, (handler, epochs) in aioquic_table.items():
            bound, shared_epochs = table[frame_type]
            assert bound.__self__ is connection
            assert bound.__func__ is handler.__func__
            assert shared_epochs == epochs
        with pytest.raises(KeyError):
            table[0x99]  # an unknown frame type: aioquic answers FRAME_ENCODING_ERROR
