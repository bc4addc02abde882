"""Stateless address-validation tokens for QUIC Retry packets (RFC 9000, section 8.1.2).

A server that answers a client's first Initial with a Retry learns, from the Initial
that comes back carrying the token, that the client really receives datagrams at its
source address: a flood of Initials with forged source addresses cannot hold handshake
slots or make the server send its first flight (certificate and all) to a victim.

The token carries what the server must remember without keeping state: when it was
issued and the client's original destination connection id (which the server must echo
in its transport parameters). A MAC with a key of this endpoint binds both to the
client's address and to the connection id the Retry chose, so a token is worthless from
any other address, with any other connection id, to any other endpoint, or once expired.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import Any

__all__ = ["RetryTokens"]

_FORMAT = 1
_HEADER = struct.Struct("!Bq")  # format, issued at (µs on the endpoint's clock)
_MAC_SIZE = 16
_MAX_CID_LENGTH = 20  # RFC 9000, section 17.2


class RetryTokens:
    """Issues and checks the Retry tokens of one endpoint (a fresh key per instance)."""

    def __init__(self, lifetime: float) -> None:
        self._key = secrets.token_bytes(32)
        self._lifetime = lifetime
        self._lifetime_us = int(lifetime * 1e6)
        self._used: dict[bytes, float] = {}  # Retry connection id -> when to forget it

    def first_use(self, retry_cid: bytes, now: float) -> bool:
        """True the first time, within a token's lifetime, that a valid token for the
        Retry that chose ``retry_cid`` is used: only that use may count as proof of the
        address (RFC 9000, section 8.1.3: a replayed token must not lift the limits)."""
        used = self._used
        while used:  # insertion order is expiry order: forget what has expired
            oldest = next(iter(used))
            if used[oldest] >= now:  # a token is fresh up to its expiry instant included
                break
            del used[oldest]
        if retry_cid in used:
            return False
        used[retry_cid] = now + self._lifetime
        return True

    def forget(self, retry_cid: bytes) -> None:
        """Undo :meth:`first_use`: that Initial turned out not to decrypt (damaged, or
        forged around a copied header), so it proved nothing and the client's own Initial
        may still come."""
        self._used.pop(retry_cid, None)

    def issue(
        self, address: tuple[Any, ...], original_cid: bytes, retry_cid: bytes, now: float
    ) -> bytes:
        """The token for a Retry to ``address`` that chose ``retry_cid`` in answer to an
        Initial addressed to ``original_cid``."""
        body = _HEADER.pack(_FORMAT, int(now * 1e6)) + bytes([len(original_cid)]) + original_cid
        return body + self._mac(body, address, retry_cid)

    def validate(
        self, address: tuple[Any, ...], token: bytes, destination_cid: bytes, now: float
    ) -> tuple[bytes, bool] | None:
        """``(original destination connection id, fresh)`` if this endpoint issued
        ``token`` for ``address`` and ``destination_cid`` (the Retry's connection id);
        ``fresh`` is False once it has expired. ``None`` if it is not such a token."""
        if len(token) < _HEADER.size + 1 + _MAC_SIZE:
            return None
        body, mac = token[:-_MAC_SIZE], token[-_MAC_SIZE:]
        if not hmac.compare_digest(mac, self._mac(body, address, destination_cid)):
            return None
        version, issued_at = _HEADER.unpack_from(body)
        original_cid = body[_HEADER.size + 1 :]
        if (
            version != _FORMAT
            or len(original_cid) != body[_HEADER.size]
            or len(original_cid) > _MAX_CID_LENGTH
        ):
            return None  # the MAC input is unambiguous: only a key holder gets here
        return original_cid, issued_at <= int(now * 1e6) <= issued_at + self._lifetime_us

    def _mac(self, body: bytes, address: tuple[Any, ...], retry_cid: bytes) -> bytes:
        # Every variable-length field is length-prefixed: no two (token, address, id)
        # triples share a MAC input, so a token cannot be re-cut for another address.
        host, port = str(address[0]).encode(), int(address[1])
        fields = (body, host, port.to_bytes(2, "big"), retry_cid)
        message = b"".join(len(field).to_bytes(2, "big") + field for field in fields)
        return hmac.digest(self._key, message, hashlib.sha256)[:_MAC_SIZE]
