"""The fetch politeness service of a run: one async Ray actor every fetch worker asks (FetchStage.services).

It keeps `RunHostLimits` and `RobotsBoard` (curate/fetch/run_politeness.py). A request for slots that
must wait for the host's next token or for a slot to be released is held here until it can be granted
(at most `HOLD` seconds, then the worker asks again); a pause is answered with its duration, which
the worker waits out by itself. A worker asking for a robots.txt another worker is fetching waits here
for that answer.
"""

from __future__ import annotations

import asyncio
from typing import Any, Hashable

from curate.fetch.run_politeness import Grant, RobotsBoard, RunHostLimits

HOLD = 2.0  # seconds a request for slots is held before the worker is told to ask again


class PolitenessService:
    """Run-wide per-host limits and robots.txt answers, shared by every fetch worker of the run."""

    def __init__(
        self,
        concurrency: int,
        rate: float | None,
        max_wait: float,
        max_failures: int,
        failure_cooldown: float,
        max_hosts: int,
        slot_lease: float,
        robots_claim_lease: float,
    ):
        self.limits = RunHostLimits(concurrency, rate, max_wait, max_failures, failure_cooldown, max_hosts,
                                    slot_lease)
        self.robots_board = RobotsBoard(max_hosts, robots_claim_lease)
        self._host_changed: dict[str, asyncio.Event] = {}  # hosts with held requests: set when a slot frees
        self._robots_answered: dict[Hashable, asyncio.Event] = {}  # origins with waiters: set when answered

    async def take(self, host: str, wanted: int) -> Grant:
        """Up to `wanted` slots of `host` as soon as they can be granted; a pause or refusal with its duration."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + HOLD
        while True:
            grant = self.limits.take(host, max(1, wanted))
            if grant.slots or grant.refusal or grant.paused:
                return grant
            left = give_up - loop.time()
            if left <= 0:
                return Grant()
            changed = self._host_changed.setdefault(host, asyncio.Event())
            try:
                await asyncio.wait_for(changed.wait(), min(grant.wait, left))
            except TimeoutError:
                pass

    async def report(self, ended: dict[str, tuple[int, int, bool]]) -> None:
        """What a worker's requests did since its last report: host -> (slots released, failures in a row
        at the end, whether a success came before those failures)."""
        for host, (released, failures, succeeded_first) in ended.items():
            if released:
                self.limits.release(host, released)
            if failures or succeeded_first:
                self.limits.record(host, failures, succeeded_first)
            self._wake(host)

    async def pause(self, host: str, seconds: float) -> None:
        """No new request to `host` for `seconds` (a 429 / 503 answer asked for it)."""
        self.limits.pause(host, seconds)
        self._wake(host)

    async def robots(self, origin: Hashable) -> Any:
        """The robots.txt answer of `origin` as (rules, seconds they stay valid), or None: the caller fetches it
        and tells `robots_answer` (or `robots_abandon`)."""
        while True:
            look = self.robots_board.look(origin)
            if not look.wait:
                return look.answer
            answered = self._robots_answered.setdefault(origin, asyncio.Event())
            try:
                await asyncio.wait_for(answered.wait(), look.wait)
            except TimeoutError:
                pass

    async def robots_answer(self, origin: Hashable, rules: Any, ttl: float) -> None:
        """The answer the claimant of `origin` fetched, valid for `ttl` seconds."""
        self.robots_board.answer(origin, rules, ttl)
        self._wake_robots(origin)

    async def robots_abandon(self, origin: Hashable) -> None:
        """The claimant of `origin` got no answer; a waiting worker claims it next."""
        self.robots_board.abandon(origin)
        self._wake_robots(origin)

    def _wake(self, host: str) -> None:
        changed = self._host_changed.pop(host, None)
        if changed is not None:
            changed.set()

    def _wake_robots(self, origin: Hashable) -> None:
        answered = self._robots_answered.pop(origin, None)
        if answered is not None:
            answered.set()
