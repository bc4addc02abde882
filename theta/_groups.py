"""Exception groups in the session layer: what ends a session quietly (the QUIC layer's
:func:`single_error` is re-exported for the layers above it)."""

from __future__ import annotations

import trio

from theta._errors import SessionClosed
from theta._quic._groups import leaves, single_error

__all__ = ["leaves", "only_session_closed", "single_error", "split_cancelled"]


def only_session_closed(error: BaseException) -> bool:
    """Whether ``error`` just reports that the session is over (possibly in a group)."""
    if isinstance(error, BaseExceptionGroup):
        return all(only_session_closed(inner) for inner in error.exceptions)
    return isinstance(error, SessionClosed | trio.Cancelled)


def split_cancelled(error: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """``error`` as (its ``Cancelled`` part, the rest); either may be ``None``."""
    if isinstance(error, trio.Cancelled):
        return error, None
    if isinstance(error, BaseExceptionGroup):
        return error.split(trio.Cancelled)
    return None, error
