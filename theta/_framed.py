"""A trio stream carrying Theta frames: messages in, messages out."""

from __future__ import annotations

from collections import deque

import trio

from theta._quic import QuicStream
from theta.core import FrameDecoder, Message, encode_frame

_READ_SIZE = 256 * 1024


class FramedStream:
    """Frames over one QUIC stream.

    ``receive()`` returns the next message or ``None`` at a clean end of stream and raises
    :class:`~theta.core.ProtocolError` for bad frames; ``send()`` is safe to call from
    several tasks (frames are never interleaved). A send cancelled while it waits for the
    transport has sent nothing: frames are handed to QUIC whole (a stream may then hold
    one write's worth of bytes beyond its high-water mark).
    """

    def __init__(self, stream: QuicStream, decoder: FrameDecoder) -> None:
        self.stream = stream
        self.decoder = decoder
        self._pending: deque[Message] = deque()
        self._send_lock = trio.StrictFIFOLock()
        self._ended = False

    async def receive(self) -> Message | None:
        """The next message, or ``None`` once the peer ended the stream on a boundary."""
        while not self._pending:
            if self._ended:
                return None
            data = await self.stream.receive_some(_READ_SIZE)
            if not data:
                self._ended = True
                self.decoder.end_of_stream()
                return None
            self._pending.extend(self.decoder.feed(data))
        return self._pending.popleft()

    async def send(self, message: Message) -> None:
        """Encode ``message`` and send it whole."""
        await self._send_frames(encode_frame(message))

    async def send_many(self, messages: list[Message]) -> None:
        """Encode ``messages`` and send them back to back in writes of up to the stream's
        high-water mark (they share datagrams instead of waking the transport once each).
        Cancelled, it has sent a prefix of the messages, each whole."""
        frames = [encode_frame(message) for message in messages]
        limit = self.stream.send_high_water
        if sum(map(len, frames)) <= limit:
            await self._send_frames(b"".join(frames))
            return
        async with self._send_lock:  # the batch stays contiguous on the stream
            start, size = 0, 0
            for end, frame in enumerate(frames):
                if size and size + len(frame) > limit:
                    await self.stream.send_whole(b"".join(frames[start:end]))
                    start, size = end, 0
                size += len(frame)
            await self.stream.send_whole(b"".join(frames[start:]))

    async def _send_frames(self, frames: bytes) -> None:
        lock = self._send_lock
        if lock.locked():
            async with lock:
                await self.stream.send_whole(frames)
            return
        # Uncontended: take the lock without its two scheduler passes (send_whole is the
        # checkpoint), so that a reply is written within the transport's answer window.
        lock.acquire_nowait()
        try:
            await self.stream.send_whole(frames)
        finally:
            lock.release()

    async def send_eof(self) -> None:
        """End our direction of the stream (FIN) after any frame being sent."""
        async with self._send_lock:
            await self.stream.send_eof()
