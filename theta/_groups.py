"""Exception-group hygiene for public context managers (used by every trio layer)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NoReturn

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
            _raise_as_it_was(errors[0])
        if not errors:
            _raise_as_it_was(leaves[0])
        raise


def _raise_as_it_was(error: BaseException) -> NoReturn:
    """Raise ``error`` out of the group that held it, keeping its own cause and context
    (raising it here would make the group its context)."""
    cause, context, suppress = error.__cause__, error.__context__, error.__suppress_context__
    try:
        raise error
    finally:
        error.__cause__, error.__context__ = cause, context
        error.__suppress_context__ = suppress


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
