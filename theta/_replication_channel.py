"""The replication channel of a session: state deltas, both ways, with backpressure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from theta._channel import DataChannel, ReceiveIterator
from theta._framed import FramedStream
from theta.core import (
    CAP_ZSTD,
    REPLICATION_FRAME_OVERHEAD,
    Message,
    ReplicationMessage,
    ReplicationReceiver,
    ReplicationSender,
    Role,
)

if TYPE_CHECKING:
    from theta._config import ClientConfig, ServerConfig
    from theta._session import Session

__all__ = ["ReplicationChannel"]


class ReplicationChannel(DataChannel[ReplicationMessage]):
    """Send and receive replication messages (application state deltas).

    Received messages wait in a queue bounded in messages and bytes (``receive_queue``,
    ``receive_queue_bytes``); while it is full the session stops reading the stream and
    QUIC flow control slows the peer down. With ``CAP_ZSTD`` negotiated, payloads are
    compressed when that makes them smaller and always handed to the application
    decompressed.
    """

    _permission = Role.REPLICATE
    _action = "send replication messages"
    _name = "replication channel"

    def __init__(
        self, session: Session, framed: FramedStream, config: ClientConfig | ServerConfig
    ) -> None:
        super().__init__(session, framed, config.receive_queue, config.receive_queue_bytes)
        zstd = CAP_ZSTD in session.negotiated_capabilities
        self._sender = ReplicationSender(
            zstd_negotiated=zstd,
            max_payload=config.frame_limits.replication - REPLICATION_FRAME_OVERHEAD,
        )
        self._receiver = ReplicationReceiver(
            zstd_negotiated=zstd, max_payload=config.frame_limits.replication
        )
        self._zstd = zstd

    @property
    def compression_ratio(self) -> float | None:
        """Uncompressed ÷ sent payload bytes, or ``None`` until zstd is negotiated and used."""
        stats = self._sender.stats
        if not self._zstd or not stats.compressed_messages:
            return None
        return stats.ratio

    async def send(self, payload: bytes, *, tick: int) -> None:
        """Send ``payload`` for simulation ``tick``.

        Blocks while the transport's send buffer is full. Raises :class:`SessionClosed`
        once the session is over, ``PermissionError`` if this client's role lacks
        ``REPLICATE``, ``ValueError`` for a payload above the replication frame limit.
        """
        self._check_may_send()
        await self._send(self._sender.message(tick, payload))

    async def send_many(self, updates: Iterable[tuple[int, bytes]]) -> None:
        """Send several ``(tick, payload)`` messages in one write (a batch beyond the
        transport's high-water mark in a few): much cheaper than one :meth:`send` each when
        a tick produces many small deltas. Same errors as :meth:`send`; an invalid payload
        raises before anything is sent. Cancelled, it has sent a prefix of the messages,
        each whole, and nothing after them."""
        self._check_may_send()
        messages: list[Message] = [self._sender.message(tick, payload) for tick, payload in updates]
        if messages:
            await self._send_many(messages)

    async def receive(self) -> ReplicationMessage:
        """The next message from the peer (``payload`` decompressed, ``flags`` 0).

        Raises ``trio.EndOfChannel`` once the peer finished its direction and
        :class:`SessionClosed` once the session is over (after the queued messages).
        """
        return await self._next()

    def __aiter__(self) -> ReceiveIterator[ReplicationMessage]:
        """``async for message in session.replication``: see :class:`ReceiveIterator`."""
        return ReceiveIterator(self.receive, self)

    def _size(self, item: ReplicationMessage) -> int:
        return len(item.payload)

    def _accept(self, message: Message) -> ReplicationMessage:
        assert isinstance(message, ReplicationMessage)  # the decoder checked the type
        return ReplicationMessage(message.tick, 0, self._receiver.receive(message), 0)
