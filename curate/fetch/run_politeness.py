"""The run-wide politeness state, kept by one service for every fetch worker of a run (no Ray in here).

`RunHostLimits` hands out slots of a host: each slot is one request start (a token of the host's
bucket) and one of its `concurrency` units, held until released. The bucket fills at `rate` tokens
per second up to `bucket_capacity(rate)`, so in any one second a host sees at most capacity + rate
request starts. Pauses (429 / 503) and failing-host cooldowns are kept here too. `RobotsBoard` keeps
the robots.txt answers of the run: the first worker to ask for an origin fetches it, the others wait.

Time is this process's monotonic clock; what is exchanged with workers are durations.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from curate.fetch.host_table import HostTable
from curate.fetch.politeness import rate_limited_detail, unreachable_detail
from curate.fetch.reasons import HOST_UNREACHABLE, RATE_LIMITED


def bucket_capacity(rate: float) -> float:
    """Tokens a host's bucket holds: a tenth of a second's worth, at least one whole request.

    With requests started as soon as their tokens are granted, a host then sees at most
    capacity + rate x 1 s starts in any second: 1.1 x rate from 10/s up, rate + 1 below.
    """
    return max(1.0, 0.1 * rate)


@dataclass(frozen=True)
class Grant:
    """The answer to a request for slots of one host.

    `slots` > 0: start that many requests now. Otherwise `wait` seconds pass before anything can be
    granted (math.inf: until a slot is released); `paused`: because the host asked for a pause; and
    `refusal` (a drop reason), when set, means the requests are refused without contacting the host
    until then.
    """

    slots: int = 0
    wait: float = 0.0
    paused: bool = False
    refusal: str | None = None
    detail: str = ""


@dataclass
class _Host:
    tokens: float
    refilled: float  # when `tokens` was last brought up to date
    leases: deque[float] = field(default_factory=deque)  # when each slot in use is reclaimed if never released
    paused_until: float = 0.0
    failures: int = 0  # consecutive failed requests, over all workers
    skipped_until: float = 0.0

    def idle(self, now: float, capacity: float) -> bool:
        return not self.leases and self.tokens >= capacity and max(self.paused_until, self.skipped_until) <= now


class RunHostLimits:
    """Concurrency, rate, pauses and failing-host cooldowns of every host of a run (bounded: idle hosts go first).

    A slot never released (its worker died) is reclaimed after `slot_lease` seconds, longer than any request.
    """

    def __init__(
        self,
        concurrency: int,
        rate: float | None,
        max_wait: float,
        max_failures: int = 0,
        failure_cooldown: float = 300.0,
        max_hosts: int = 10_000,
        slot_lease: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.concurrency = concurrency
        self.rate = rate
        self.capacity = bucket_capacity(rate) if rate else math.inf
        self.max_wait = max_wait
        self.max_failures = max_failures
        self.failure_cooldown = failure_cooldown
        self.slot_lease = slot_lease
        self._clock = clock
        self._hosts = HostTable(max_hosts, lambda: _Host(tokens=self.capacity, refilled=self._clock()),
                                lambda state: self._refilled(state, self._clock()).idle(self._clock(), self.capacity))

    def take(self, host: str, wanted: int) -> Grant:
        """Up to `wanted` slots of `host` if politeness allows them now, else how long until it may."""
        state, now = self._state(host), self._clock()
        if state.skipped_until > now:
            left = state.skipped_until - now
            return Grant(wait=left, refusal=HOST_UNREACHABLE,
                         detail=unreachable_detail(host, left, self.max_failures))
        if state.paused_until > now:
            left = state.paused_until - now
            if left > self.max_wait:
                return Grant(wait=left, refusal=RATE_LIMITED, detail=rate_limited_detail(host, left, self.max_wait))
            return Grant(wait=left, paused=True)
        while state.leases and state.leases[0] <= now:
            state.leases.popleft()
        free = min(wanted, self.concurrency - len(state.leases))
        if free <= 0:
            return Grant(wait=math.inf)
        if self.rate:
            if state.tokens < 1.0:
                return Grant(wait=(1.0 - state.tokens) / self.rate)
            free = min(free, int(state.tokens))
            state.tokens -= free
        state.leases.extend([now + self.slot_lease] * free)
        return Grant(slots=free)

    def release(self, host: str, slots: int) -> None:
        """`slots` requests to `host` ended."""
        state = self._state(host)
        for _ in range(min(slots, len(state.leases))):
            state.leases.popleft()

    def pause(self, host: str, seconds: float) -> None:
        """No new request to `host` for `seconds` (what a 429 / 503 answer asked for)."""
        state = self._state(host)
        state.paused_until = max(state.paused_until, self._clock() + seconds)

    def record(self, host: str, failures: int, succeeded_first: bool = False) -> None:
        """Count `failures` requests to `host` in a row that could not connect, broke off or timed out;
        `succeeded_first`: one that did not came before them (the count starts again)."""
        state = self._state(host)
        if succeeded_first:
            state.failures = 0
        state.failures += failures
        if self.max_failures and state.failures >= self.max_failures:
            state.skipped_until = self._clock() + self.failure_cooldown
            state.failures = self.max_failures - 1  # after the cooldown, one more failure skips it again

    def _state(self, host: str) -> _Host:
        """The state of `host` (created if new), its bucket brought up to date."""
        return self._refilled(self._hosts.get(host), self._clock())

    def _refilled(self, state: _Host, now: float) -> _Host:
        if self.rate:
            state.tokens = min(self.capacity, state.tokens + (now - state.refilled) * self.rate)
        state.refilled = now
        return state


@dataclass(frozen=True)
class RobotsLook:
    """What a worker asking for an origin's robots.txt does: use `answer`, fetch it, or wait up to `wait` s."""

    answer: Any = None  # (rules, seconds they stay valid) when known
    fetch: bool = False
    wait: float = 0.0


class RobotsBoard:
    """The robots.txt answers of a run, one fetch per origin: the first to ask claims it, the others wait.

    A claim not answered within `claim_lease` seconds (its worker died) passes to the next asker.
    """

    def __init__(self, max_origins: int, claim_lease: float, clock: Callable[[], float] = time.monotonic):
        self.max_origins = max(1, max_origins)
        self.claim_lease = claim_lease
        self._clock = clock
        self._answers: OrderedDict[Hashable, tuple[Any, float]] = OrderedDict()  # origin -> (rules, expires)
        self._claims: dict[Hashable, float] = {}  # origin -> when its claim lapses

    def look(self, origin: Hashable) -> RobotsLook:
        """The known answer for `origin`, else a claim to fetch it, else how long the current claim may still take."""
        now = self._clock()
        known = self._answers.get(origin)
        if known is not None and known[1] > now:
            self._answers.move_to_end(origin)
            return RobotsLook(answer=(known[0], known[1] - now))
        lapses = self._claims.get(origin)
        if lapses is not None and lapses > now:
            return RobotsLook(wait=lapses - now)
        self._claims[origin] = now + self.claim_lease
        return RobotsLook(fetch=True)

    def answer(self, origin: Hashable, rules: Any, ttl: float) -> None:
        """The claimant's answer for `origin`, valid for `ttl` seconds."""
        self._claims.pop(origin, None)
        if ttl > 0:
            self._answers[origin] = (rules, self._clock() + ttl)
            self._answers.move_to_end(origin)
            while len(self._answers) > self.max_origins:
                self._answers.popitem(last=False)

    def abandon(self, origin: Hashable) -> None:
        """The claimant could not get an answer (the host refused it): the next asker claims it."""
        self._claims.pop(origin, None)
