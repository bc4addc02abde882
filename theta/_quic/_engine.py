"""The QUIC engine boundary: the only module of theta that imports aioquic.

Theory of operation: the driver talks to a sans-IO QUIC connection (bytes and ``now`` in,
events and datagrams out). Everything that differs between engines lives here, so a second
engine (qh3, nearly name-for-name compatible) can be added as another module with the same
names:

* imports (``Buffer``, ``pull_quic_header``, the connection class, the event classes),
* building the engine configuration from :class:`~theta._quic._config.QuicConfig`,
* the exceptions an engine call may raise (:data:`ENGINE_ERRORS`),
* :class:`EngineConnection`, which adds to aioquic's connection the three things aioquic
  does not offer publicly: the per-stream unacknowledged send figure, receive credit tied
  to what the application has read (aioquic grants credit as data *arrives*), and a
  statistics read-out (RTT, congestion window, losses); it also shares aioquic's
  per-connection frame-handler table between connections (fewer objects for the garbage
  collector). These touch private attributes of aioquic 1.7.2
  (``QuicStreamSender._buffer_start/_buffer_stop``, ``_write_stream_limits``, the stream
  limits ``_local_next_stream_id_bidi``/``_remote_max_streams_bidi``,
  ``QuicPacketRecovery`` fields, ``QuicConnection.__frame_handlers``, and
  ``_network_paths`` for an address a Retry validated) and are pinned by
  ``tests/quic/test_quic_engine.py``.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Iterable
from typing import Any, NamedTuple

from aioquic._buffer import Buffer
from aioquic.quic import events as _events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import Limit as _Limit
from aioquic.quic.connection import QuicConnection as _AioquicConnection
from aioquic.quic.connection import QuicConnectionState, QuicNetworkPath
from aioquic.quic.packet import (
    QuicFrameType,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream as _AioquicStream
from aioquic.tls import Epoch, Group

from ._certs import load_certificates, load_server_credentials, read_pem
from ._config import ALPN, QUIC_VERSION_1, QuicConfig
from ._stats import EngineStats

__all__ = [
    "CID_LENGTH",
    "ENGINE_ERRORS",
    "ConnectionIdIssued",
    "ConnectionIdRetired",
    "ConnectionTerminated",
    "EngineConnection",
    "EngineStats",
    "HandshakeCompleted",
    "PacketHeader",
    "StopSendingReceived",
    "StreamDataReceived",
    "StreamReset",
    "build_configuration",
    "create_connection",
    "parse_header_untrusted",
    "release_configuration",
    "retry_packet",
    "short_header_destination",
    "termination_kind",
    "version_negotiation_reply",
]

logger = logging.getLogger("theta.quic")

# Event classes the driver routes (same names in qh3).
QuicEvent = _events.QuicEvent
ConnectionIdIssued = _events.ConnectionIdIssued
ConnectionIdRetired = _events.ConnectionIdRetired
ConnectionTerminated = _events.ConnectionTerminated
HandshakeCompleted = _events.HandshakeCompleted
StopSendingReceived = _events.StopSendingReceived
StreamDataReceived = _events.StreamDataReceived
StreamReset = _events.StreamReset

#: What an engine call fed with attacker-controlled input may raise. aioquic raises plain
#: built-ins (``IndexError`` from ``datagrams_to_send`` on mutated Initials, ``ValueError``,
#: ``AssertionError``...), so the driver treats any ``Exception`` as "this connection is
#: broken" and closes only that connection.
ENGINE_ERRORS: tuple[type[Exception], ...] = (Exception,)

#: The reason aioquic gives when it closes a connection itself on idle timeout.
_IDLE_TIMEOUT_REASON = "Idle timeout"

# Key shares a client offers. aioquic generates one for every group it supports
# (P-256, P-384, X25519, X448: ≈ 280 µs of key generation per connection here); P-256 is
# mandatory for every TLS 1.3 server and X25519 nearly universal, which is ≈ 65 µs.
_CLIENT_KEY_SHARE_GROUPS = [Group.SECP256R1, Group.X25519]

# aioquic's capacity reservation for a MAX_STREAM_DATA frame (type + two varints).
_MAX_STREAM_DATA_FRAME_CAPACITY = 1 + 2 * 8


class PacketHeader(NamedTuple):
    """What the endpoint needs from a datagram's first packet header to route it."""

    version: int | None
    is_initial: bool
    is_version_negotiation: bool
    destination_cid: bytes
    source_cid: bytes
    token: bytes
    """An Initial's address-validation token (empty when none)."""


def parse_header_untrusted(data: bytes, cid_length: int) -> PacketHeader | None:
    """Parse the first packet header of an untrusted datagram; ``None`` if malformed."""
    try:
        header = pull_quic_header(Buffer(data=data), host_cid_length=cid_length)
    except Exception:  # malformed input of any kind: drop the datagram
        return None
    return PacketHeader(
        version=header.version,
        is_initial=header.packet_type == QuicPacketType.INITIAL,
        is_version_negotiation=header.packet_type == QuicPacketType.VERSION_NEGOTIATION,
        destination_cid=header.destination_cid,
        source_cid=header.source_cid,
        token=header.token,
    )


def short_header_destination(data: bytes, cid_length: int) -> bytes | None:
    """The destination connection id of a datagram whose first packet has a short
    header (RFC 9000, 17.3: high bit 0, fixed bit 1), read without parsing the rest;
    ``None`` for anything else. The routing fast path for established connections."""
    if len(data) > cid_length and data[0] & 0xC0 == 0x40:
        return data[1 : 1 + cid_length]
    return None


def version_negotiation_reply(header: PacketHeader) -> bytes:
    """A Version Negotiation packet answering ``header`` (never call it for a VN packet)."""
    return encode_quic_version_negotiation(
        source_cid=header.destination_cid,
        destination_cid=header.source_cid,
        supported_versions=list(SUPPORTED_VERSIONS),
    )


def retry_packet(header: PacketHeader, retry_cid: bytes, token: bytes) -> bytes:
    """A Retry packet answering the Initial of ``header``: the client is to come back to
    connection id ``retry_cid`` with ``token``."""
    assert header.version is not None
    return encode_quic_retry(
        version=header.version,
        source_cid=retry_cid,
        destination_cid=header.source_cid,
        original_destination_cid=header.destination_cid,
        retry_token=token,
    )


SUPPORTED_VERSIONS: tuple[int, ...] = (QUIC_VERSION_1,)

CID_LENGTH = 8
"""Length of the connection ids this side issues (and routes by)."""


# --- configuration ----------------------------------------------------------------------


def build_configuration(
    config: QuicConfig, *, is_client: bool, server_name: str | None = None
) -> QuicConfiguration:
    """Build aioquic's configuration from ``config``, setting every engine default explicitly.

    If a key log file is configured it is opened here; call :func:`release_configuration`
    when the endpoint using the configuration is done.
    """
    configuration = QuicConfiguration(
        alpn_protocols=[ALPN],
        is_client=is_client,
        idle_timeout=config.idle_timeout,
        max_datagram_size=config.max_datagram_size,
        max_data=config.max_data,
        max_stream_data=config.stream_receive_window,
        initial_rtt=config.initial_rtt,
        supported_versions=list(SUPPORTED_VERSIONS),
        congestion_control_algorithm=config.congestion_control,
        connection_id_length=CID_LENGTH,
    )
    if is_client:
        configuration.server_name = config.server_name or server_name
        if config.insecure_skip_verify_for_tests:
            logger.warning(
                "QUIC client certificate verification is OFF "
                "(insecure_skip_verify_for_tests): never use this outside tests"
            )
            configuration.verify_mode = ssl.CERT_NONE
        else:
            configuration.verify_mode = ssl.CERT_REQUIRED
            if config.ca_certs is not None:
                configuration.cadata = read_pem("ca_certs", config.ca_certs)
                load_certificates("ca_certs", configuration.cadata)  # a clear error now
    else:
        if config.certificate is None or config.private_key is None:
            raise ValueError("a server needs both certificate and private_key")
        chain, configuration.private_key = load_server_credentials(
            config.certificate, config.private_key
        )
        configuration.certificate = chain[0]
        configuration.certificate_chain = chain[1:]
    if config.key_log_file is not None:  # last: nothing after it can fail and leave it open
        try:
            key_log = open(config.key_log_file, "a")  # noqa: SIM115 - see release_configuration
        except OSError as error:
            raise OSError(
                error.errno, f"cannot open key_log_file {config.key_log_file}: {error.strerror}"
            ) from None
        configuration.secrets_log_file = key_log
    return configuration


def release_configuration(configuration: QuicConfiguration) -> None:
    """Close what :func:`build_configuration` opened (the key log file)."""
    if configuration.secrets_log_file is not None:
        configuration.secrets_log_file.close()
        configuration.secrets_log_file = None


# --- statistics -------------------------------------------------------------------------


# --- connection -------------------------------------------------------------------------


class _FrameHandlers(dict[int, tuple[Any, frozenset[Epoch]]]):
    """Stands in for aioquic's per-connection frame-type table (for each of 31 frame types
    a bound method, a tuple and a frozenset of epochs: ≈ 100 objects per connection for
    the garbage collector to scan for the connection's whole life). Entries are made from
    one shared table of method names the first time a frame type is seen, so a
    connection holds only the few types it meets, and a lookup stays a plain dict hit."""

    __slots__ = ("_connection",)

    def __init__(self, connection: EngineConnection, built: dict[int, tuple[Any, Any]]) -> None:
        super().__init__()
        self._connection = connection
        if not _FRAME_HANDLERS:  # the first connection's table, by method name
            _FRAME_HANDLERS.update(
                (frame_type, (handler.__name__, frozenset(epochs)))
                for frame_type, (handler, epochs) in built.items()
            )

    def __missing__(self, frame_type: int) -> tuple[Any, frozenset[Epoch]]:
        name, epochs = _FRAME_HANDLERS[frame_type]  # KeyError: unknown frame type
        entry = self[frame_type] = (getattr(self._connection, name), epochs)
        return entry


_FRAME_HANDLERS: dict[int, tuple[str, frozenset[Epoch]]] = {}


class _PeerStreamLimit(_Limit):
    """The MAX_STREAMS limit on the peer's bidirectional streams, raised only by the
    driver as the application releases streams. aioquic adds one each time a stream
    finishes inside the engine, accepted and read or not, which would let a peer open
    stream after stream while earlier ones wait unread: those raises are ignored."""

    def __init__(self, limit: _Limit) -> None:  # no super().__init__: it sets value
        self.frame_type, self.name = limit.frame_type, limit.name
        self.sent, self.used = limit.sent, limit.used
        self.granted = limit.value

    @property
    def value(self) -> int:
        return self.granted

    @value.setter
    def value(self, _: int) -> None:
        pass  # aioquic's own raises


class EngineConnection(_AioquicConnection):
    """aioquic's ``QuicConnection`` plus the few figures and controls the driver needs."""

    def __init__(
        self, *, configuration: QuicConfiguration, max_peer_streams: int, **kwargs: Any
    ) -> None:
        super().__init__(configuration=configuration, **kwargs)
        state = vars(self)  # the table is name-mangled private state of aioquic's class
        state["_QuicConnection__frame_handlers"] = _FrameHandlers(
            self, state["_QuicConnection__frame_handlers"]
        )
        # Initial MAX_STREAMS (aioquic hard-codes 128 and adds one per finished stream).
        for limit in (self._local_max_streams_bidi, self._local_max_streams_uni):
            limit.value = limit.sent = max_peer_streams
        self._local_max_streams_bidi = _PeerStreamLimit(self._local_max_streams_bidi)
        self._theta_released: set[int] = set()  # peer streams closed by the application
        self._theta_eager: set[int] = set()  # streams whose credit rises in small steps
        self._theta_window = configuration.max_stream_data
        self._theta_consumed: dict[int, int] = {}
        self._theta_lost_packets = 0
        self._theta_probe_timeouts = 0
        recovery = self._loss
        on_lost = recovery._on_packets_lost
        on_timeout = recovery.on_loss_detection_timeout

        def count_lost(**kwargs: Any) -> None:
            packets = list(kwargs.pop("packets"))
            if kwargs.get("congestion_event", True):
                self._theta_lost_packets += len(packets)
            on_lost(packets=packets, **kwargs)

        def count_timeout(*, now: float) -> None:
            self._theta_probe_timeouts += 1
            on_timeout(now=now)

        recovery._on_packets_lost = count_lost  # type: ignore[method-assign]
        recovery.on_loss_detection_timeout = count_timeout  # type: ignore[method-assign]

        pacer = recovery._pacer
        update_rate = pacer.update_rate
        max_datagram_size = configuration.max_datagram_size

        def update_rate_keeping_bursts(congestion_window: int, smoothed_rtt: float) -> None:
            # aioquic sizes the pacing bucket for a burst of min(cwnd/4, 16) datagrams but
            # clamps the per-packet time up to 1 µs without scaling the bucket: on a fast
            # path (large cwnd, ~1 ms RTT) the bucket shrinks to 2-3 datagrams and every
            # datagrams_to_send() call returns one or two datagrams, doubling CPU per byte.
            # Keep the intended burst size.
            update_rate(congestion_window, smoothed_rtt)
            if pacer.packet_time is not None:
                burst = max(
                    2, min(congestion_window // 4, 16 * max_datagram_size) // max_datagram_size
                )
                pacer.bucket_max = max(pacer.bucket_max, burst * pacer.packet_time)

        pacer.update_rate = update_rate_keeping_bursts  # type: ignore[method-assign]

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if self._is_client:
            self.tls._supported_groups = list(_CLIENT_KEY_SHARE_GROUPS)

    # -- send side --

    def unacked_send_bytes(self, stream_id: int) -> int:
        """Bytes written to ``stream_id`` and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def has_unacknowledged_data(self, stream_ids: Iterable[int] | None = None) -> bool:
        """True while any stream (of ``stream_ids``, default all) has sent data or a FIN
        the peer has not acknowledged."""
        if stream_ids is None:
            streams: Iterable[_AioquicStream] = self._streams.values()
        else:
            streams = [s for sid in stream_ids if (s := self._streams.get(sid)) is not None]
        for stream in streams:
            sender = stream.sender
            if sender._reset_error_code is not None:
                continue
            if sender._buffer_stop != sender._buffer_start:
                return True
            if sender._buffer_fin is not None and not sender._acked_fin:
                return True
        return False

    def ack_now(self, now: float) -> None:
        """Let the next 1-RTT packet carry the pending ACK instead of waiting out aioquic's
        ACK delay. Called when stream data is about to go out: the ACK rides along rather
        than taking a datagram of its own a millisecond later (acknowledging early is always
        allowed, RFC 9000 section 13.2.1)."""
        space = self._spaces.get(Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None and space.ack_at > now:
            space.ack_at = now

    def datagrams_to_send_unpaced(self, now: float) -> list[tuple[bytes, Any]]:
        """``datagrams_to_send`` without the pacer's gaps (congestion control still
        applies): for the last flush before a close, after which the engine sends nothing
        but CONNECTION_CLOSE, so whatever the pacer held back would be lost."""
        pacer = self._loss._pacer
        packet_time = pacer.packet_time
        pacer.packet_time = None
        try:
            return self.datagrams_to_send(now=now)
        finally:
            pacer.packet_time = packet_time

    # -- receive side --

    def stream_consumed(self, stream_id: int, total: int) -> bool:
        """Record that the application has read ``total`` bytes of ``stream_id``.

        The peer is then allowed to send up to ``total + stream_receive_window``. Returns
        True when that allowance should be announced now (a MAX_STREAM_DATA is due).
        """
        self._theta_consumed[stream_id] = total
        stream = self._streams.get(stream_id)
        if stream is None or stream.receiver.is_finished:
            return False
        target = total + self._theta_window
        return target - stream.max_stream_data_local_sent >= self._credit_step(stream_id)

    def _credit_step(self, stream_id: int) -> int:
        return self._theta_window // (16 if stream_id in self._theta_eager else 2)

    def credit_eagerly(self, stream_id: int) -> None:
        """From now on raise ``stream_id``'s credit in steps of a sixteenth of the window
        (half, by default) as the application reads."""
        self._theta_eager.add(stream_id)

    def forget_stream(self, stream_id: int) -> None:
        """The application is done with ``stream_id`` (closed or reset): drop the
        driver's bookkeeping. A stream the peer opened gives its place back once the
        engine is done with it too (a peer ignoring STOP_SENDING keeps it busy)."""
        self._theta_consumed.pop(stream_id, None)
        self._theta_eager.discard(stream_id)
        peer_initiated = (stream_id & 1) == self._is_client
        if peer_initiated and not stream_id & 2:
            self._theta_released.add(stream_id)
            self._grant_released()

    def _grant_released(self) -> bool:
        """Give back the places of released peer streams the engine has discarded; True
        if any (a MAX_STREAMS may be due)."""
        discarded = [sid for sid in self._theta_released if sid not in self._streams]
        if not discarded:
            return False
        self._theta_released.difference_update(discarded)
        limit = self._local_max_streams_bidi
        assert isinstance(limit, _PeerStreamLimit)
        limit.granted += len(discarded)
        return True

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        datagrams = super().datagrams_to_send(now=now)
        # aioquic discards finished streams while it builds packets: announce the places
        # of released ones at once (the peer may be waiting for them to open a stream).
        if self._theta_released and self._grant_released():
            datagrams += super().datagrams_to_send(now=now)
        return datagrams

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: _AioquicStream
    ) -> None:
        # Replaces aioquic's policy (double the credit whenever half has *arrived*) with
        # "credit = bytes the application has read + window", so an unread stream buffers
        # at most one window however fast the peer sends.
        if not stream.max_stream_data_local or stream.receiver.is_finished:
            return
        sid = stream.stream_id
        assert sid is not None
        target = self._theta_consumed.get(sid, 0) + self._theta_window
        if target - stream.max_stream_data_local >= self._credit_step(sid):
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=_MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(sid)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    @property
    def peer_address(self) -> Any:
        """Where the engine sends to now: it moves to a peer's new address (RFC 9000, 9.3)
        once a non-probing packet came from there."""
        return self._network_paths[0].addr

    @property
    def is_first_flight(self) -> bool:
        """True until a packet from the peer has been decrypted."""
        return self._state is QuicConnectionState.FIRSTFLIGHT

    def can_open_stream(self) -> bool:
        """Whether the peer's MAX_STREAMS allows this side one more bidirectional stream
        now (aioquic would create it anyway, blocked, and still write RESET_STREAM or
        STOP_SENDING frames for it, which the peer treats as STREAM_LIMIT_ERROR)."""
        return self._local_next_stream_id_bidi >> 2 < self._remote_max_streams_bidi

    def close_with_transport_error(self, code: int, reason: str) -> None:
        """Close with a QUIC transport error ``code`` (``close`` sends an application one)."""
        self.close(error_code=code, frame_type=QuicFrameType.PADDING, reason_phrase=reason)

    # -- read-outs --

    def peer_close(self) -> ConnectionTerminated | None:
        """The peer's CONNECTION_CLOSE as soon as it arrived. aioquic reports it only after
        the draining period (3 × PTO); nothing is sent while draining, so the driver can end
        the connection for the application at once."""
        if self._state is QuicConnectionState.DRAINING:
            return self._close_event
        return None

    def own_close(self) -> ConnectionTerminated | None:
        """The engine's own CONNECTION_CLOSE (it found the peer breaking QUIC, or TLS
        failed), once sent; aioquic reports it only after the closing period."""
        if self._state is QuicConnectionState.CLOSING:
            return self._close_event
        return None

    def read_stats(self) -> EngineStats:
        """Snapshot of RTT, congestion window and loss figures (private aioquic state)."""
        recovery = self._loss
        min_rtt = recovery._rtt_min
        return EngineStats(
            smoothed_rtt=recovery._rtt_smoothed,
            min_rtt=0.0 if math.isinf(min_rtt) else min_rtt,
            latest_rtt=recovery._rtt_latest,
            rtt_variance=recovery._rtt_variance,
            congestion_window=recovery.congestion_window,
            bytes_in_flight=recovery.bytes_in_flight,
            lost_packets=self._theta_lost_packets,
            probe_timeouts=self._theta_probe_timeouts,
        )

    @property
    def is_handshake_complete(self) -> bool:
        """True once the TLS handshake has completed."""
        return bool(self._handshake_complete)


def create_connection(
    configuration: QuicConfiguration,
    *,
    max_peer_streams: int = 16,
    original_destination_cid: bytes | None = None,
    retry_source_cid: bytes | None = None,
    validated_address: Any = None,
) -> EngineConnection:
    """A new engine connection. Server: pass the client's original destination CID,
    and, when a Retry validated the client's address, the CID that Retry chose and the
    address: the server's first flight to it is then not held to three times what the
    client sent (RFC 9000, section 8.1), so a large certificate chain goes out at once."""
    connection = EngineConnection(
        configuration=configuration,
        max_peer_streams=max_peer_streams,
        original_destination_connection_id=original_destination_cid,
        retry_source_connection_id=retry_source_cid,
    )
    if validated_address is not None:
        # aioquic adopts a known path for the first datagram's address, and counts bytes
        # against the limit only on a path not yet validated.
        connection._network_paths = [QuicNetworkPath(validated_address, is_validated=True)]
    return connection


def termination_kind(event: ConnectionTerminated) -> str:
    """Classify a termination: ``"application"``, ``"idle"`` or ``"transport"``.

    aioquic reports an APPLICATION_CLOSE with ``frame_type is None``; its own closes (protocol
    errors, TLS alerts) always name a frame type; the idle timeout has a fixed reason.
    """
    if event.frame_type is None:
        return "application"
    if event.frame_type == QuicFrameType.PADDING and event.reason_phrase == _IDLE_TIMEOUT_REASON:
        return "idle"
    return "transport"
