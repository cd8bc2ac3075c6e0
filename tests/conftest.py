"""Shared test fixtures."""

import pytest

from curate.demo.server import LoopbackServer


@pytest.fixture(scope="session")
def _loopback_server():
    with LoopbackServer() as server:
        yield server


@pytest.fixture
def loopback(_loopback_server):
    """The loopback HTTP server with no routes; tests add `Route`s to `loopback.routes`."""
    _loopback_server.routes.clear()
    yield _loopback_server
    _loopback_server.routes.clear()
