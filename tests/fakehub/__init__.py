"""A loopback Hugging Face Hub for tests: `FakeHub` (server), `Fault` (planted failures), pytest fixtures."""

from .server import FakeHub, Fault, HubStatistics, RecordedRequest

__all__ = ["FakeHub", "Fault", "HubStatistics", "RecordedRequest"]
