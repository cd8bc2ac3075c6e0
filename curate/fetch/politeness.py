"""Per-host politeness of one fetcher process: concurrency, rate, pauses, failing hosts.

Every request (robots.txt included) takes a slot of its host first:

- at most `concurrency` requests to a host at a time;
- request starts to a host at least 1 / `rate` seconds apart;
- no request before a pause ends: a host that answered 429 / 503 is paused for its
  Retry-After (or the backoff delay); a pause longer than `max_wait` refuses the
  request at once (`rate_limited`) instead of waiting;
- a host whose last `max_failures` requests all failed to connect, broke off or timed
  out (a body that never completes included) is skipped (`host_unreachable`) for
  `failure_cooldown` seconds, then given one more chance, so a dead or stuck host
  cannot hold the run.

`HostLimiter` keeps these rules for the threads of one process: a fetcher used on its own (in this
process, in tests). In a run on Ray, the fetch workers share one run-wide limiter instead
(curate/fetch/politeness_client.py), with the same interface and rules, the rate as a token bucket.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from curate.fetch.host_table import HostTable
from curate.fetch.reasons import HOST_UNREACHABLE, RATE_LIMITED


def unreachable_detail(host: str, seconds: float, max_failures: int) -> str:
    """Why a request to a failing host is refused (`seconds` left of its cooldown)."""
    return f"{host} skipped for {seconds:.0f} s after {max_failures} requests in a row without an answer"


def rate_limited_detail(host: str, seconds: float, max_wait: float) -> str:
    """Why a request to a host paused for longer than `max_wait` is refused (`seconds` left of the pause)."""
    return f"{host} asked to wait {seconds:.0f} s (max_retry_after {max_wait:g} s)"


class HostRefused(Exception):
    """A request refused by the politeness rules without contacting the host."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Host:
    active: int = 0  # requests in flight
    next_start: float = 0.0  # earliest start of the next request (rate)
    paused_until: float = 0.0  # Retry-After / backoff pause asked by the host
    failures: int = 0  # consecutive failed requests
    skipped_until: float = 0.0  # failing host: refuse requests until then

    def idle(self, now: float) -> bool:
        return self.active == 0 and max(self.next_start, self.paused_until, self.skipped_until) <= now


class HostLimiter:
    """Politeness state of every host one fetcher talks to (bounded: idle hosts are forgotten first)."""

    def __init__(
        self,
        concurrency: int,
        rate: float | None,
        max_wait: float,
        max_failures: int = 0,
        failure_cooldown: float = 300.0,
        max_hosts: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.concurrency = concurrency
        self.interval = 1.0 / rate if rate else 0.0
        self.max_wait = max_wait
        self.max_failures = max_failures
        self.failure_cooldown = failure_cooldown
        self._clock = clock
        self._hosts = HostTable(max_hosts, _Host, lambda state: state.idle(self._clock()))
        self._changed = threading.Condition()

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        """Hold one request slot of `host`, waiting as politeness demands; raises HostRefused."""
        self._acquire(host)
        try:
            yield
        finally:
            self._release(host)

    def pause(self, host: str, seconds: float) -> None:
        """No new request to `host` for `seconds` (what a 429 / 503 answer asked for)."""
        with self._changed:
            state = self._state(host)
            state.paused_until = max(state.paused_until, self._clock() + seconds)

    def record(self, host: str, failed: bool) -> None:
        """Count a request to `host` that `failed` (could not connect, broke off or timed out) or did not."""
        with self._changed:
            state = self._state(host)
            if not failed:
                state.failures = 0
                return
            state.failures += 1
            if self.max_failures and state.failures >= self.max_failures:
                state.skipped_until = self._clock() + self.failure_cooldown
                state.failures = self.max_failures - 1  # after the cooldown, one more failure skips it again
                self._changed.notify_all()

    def close(self) -> None:
        """Nothing to release (the run-wide limiter's counterpart sends what it still owes)."""

    def _acquire(self, host: str) -> None:
        with self._changed:
            while True:
                state = self._state(host)
                now = self._clock()
                if state.skipped_until > now:
                    raise HostRefused(HOST_UNREACHABLE,
                                      unreachable_detail(host, state.skipped_until - now, self.max_failures))
                if state.paused_until - now > self.max_wait:
                    raise HostRefused(RATE_LIMITED, rate_limited_detail(host, state.paused_until - now, self.max_wait))
                ready = max(state.paused_until, state.next_start)
                if ready <= now and state.active < self.concurrency:
                    state.active += 1
                    state.next_start = now + self.interval
                    return
                self._changed.wait(ready - now if ready > now else None)

    def _release(self, host: str) -> None:
        with self._changed:
            self._state(host).active -= 1
            self._changed.notify_all()

    def _state(self, host: str) -> _Host:
        """The state of `host` (created if new); caller holds the lock."""
        return self._hosts.get(host)
