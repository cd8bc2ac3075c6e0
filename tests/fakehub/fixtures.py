"""pytest fixtures: `fake_hub` (a loopback Hub per test) and `hub_env` (huggingface_hub and datasets aimed at it).

huggingface_hub and datasets read HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET and their cache folders when
they are imported, so `point_clients_at` sets the environment for subprocesses and patches those import-time
constants for the current process; monkeypatch undoes both after the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .server import FakeHub

TEST_TOKEN = "hf_curateTestToken0123456789abcdef"


@pytest.fixture
def fake_hub():
    """A FakeHub on loopback accepting the token `TEST_TOKEN`; stopped after the test."""
    with FakeHub(token=TEST_TOKEN) as hub:
        yield hub


@pytest.fixture
def hub_env(fake_hub, monkeypatch, tmp_path):
    """`fake_hub`, with huggingface_hub and datasets online, aimed at it, with HF_TOKEN set and fresh caches."""
    point_clients_at(fake_hub, monkeypatch, tmp_path / "hf-home")
    return fake_hub


def point_clients_at(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Aim huggingface_hub and datasets (environment and import-time constants) at `hub`, online, caches in `home`."""
    home.mkdir(parents=True, exist_ok=True)
    environment = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HUB_OFFLINE": "0",
                   "HF_DATASETS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
                   "HF_HUB_DISABLE_TELEMETRY": "1"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    from huggingface_hub import constants

    patches = {"ENDPOINT": hub.endpoint,
               "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
               "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HOME": str(home),
               "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN_PATH": str(home / "token"),
               "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
               "AGENT_HARNESSES_PATH": str(home / "agent_harnesses.json")}
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)

    import datasets.config

    dataset_patches = {"HF_ENDPOINT": hub.endpoint,
                       "HUB_DATASETS_URL": hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
                       "HF_HUB_OFFLINE": False, "HF_DATASETS_OFFLINE": False,
                       "HF_DATASETS_CACHE": home / "datasets",
                       "DOWNLOADED_DATASETS_PATH": home / "datasets" / "downloads",
                       "EXTRACTED_DATASETS_PATH": home / "datasets" / "downloads" / "extracted"}
    for name, value in dataset_patches.items():
        if hasattr(datasets.config, name):
            monkeypatch.setattr(datasets.config, name, value)
