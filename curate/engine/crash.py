"""Test-only crash hook: end the process at a chosen point, as a kill would."""

from __future__ import annotations

import os

CRASH_HOOK_ENV = "CURATE_TEST_CRASH_AFTER"


def crash_if_asked(phase: str, shard: int) -> None:
    """Test-only crash hook: exit the process at once after `phase` finished work shard `shard`.

    Set CURATE_TEST_CRASH_AFTER=PHASE:SHARD (e.g. ``prepare:1``) to simulate a
    run killed mid-way; nothing is flushed or cleaned up, as with a real kill.
    """
    wanted = os.environ.get(CRASH_HOOK_ENV)
    if wanted and wanted == f"{phase}:{shard}":
        os._exit(86)
