"""Fixtures for the QUIC driver tests."""

from __future__ import annotations

import pytest
import trio

from theta._quic import QuicServer

from .quic_helpers import echo_handler, start_server


@pytest.fixture
async def echo_server(nursery: trio.Nursery) -> QuicServer:
    """A server on 127.0.0.1 echoing every stream until EOF."""
    return await start_server(nursery, echo_handler)
