"""Exception-group hygiene for public context managers (used by every trio layer)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio

from theta._errors import SessionClosed

__all__ = ["only_session_closed", "single_error", "split_cancelled"]


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


@contextlib.contextmanager
def single_error() -> Iterator[None]:
    """Re-raise an exception group holding one real error (besides ``Cancelled``) as that
    error, so a public context manager never leaks a group when one error explains it."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        errors = [exc for exc in leaves if not isinstance(exc, trio.Cancelled)]
        if len(errors) == 1:
            raise errors[0] from None
        if not errors:
            raise leaves[0] from None
        raise


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
