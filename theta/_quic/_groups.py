"""Exception-group hygiene for public context managers (every trio layer uses it; it
imports nothing from theta, so the QUIC layer can)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NoReturn

import trio

__all__ = ["leaves", "single_error"]


def leaves(error: BaseException) -> Iterator[BaseException]:
    """The exceptions in ``error``, groups flattened (``error`` itself if not a group)."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaves(inner)
    else:
        yield error


@contextlib.contextmanager
def single_error() -> Iterator[None]:
    """Re-raise an exception group holding one real error (besides ``Cancelled``) as that
    error, so a public context manager never leaks a group when one error explains it."""
    try:
        yield
    except BaseExceptionGroup as group:
        found = list(leaves(group))
        errors = [exc for exc in found if not isinstance(exc, trio.Cancelled)]
        if len(errors) == 1:
            _raise_as_it_was(errors[0])
        if not errors:
            _raise_as_it_was(found[0])
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
