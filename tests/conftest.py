"""Shared test fixtures: offline settings, a local Ray, the loopback server."""

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from fakehub.fixtures import fake_hub, hub_env  # noqa: E402,F401 - the loopback Hugging Face Hub (tests/fakehub)

from curate.demo.server import LoopbackServer  # noqa: E402 - after the environment is set


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


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on 2 CPUs, started once and shared by the tests that run the engine in-process."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
