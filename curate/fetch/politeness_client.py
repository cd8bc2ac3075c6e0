"""The fetch worker's side of the run's politeness service (curate/fetch/politeness_service.py).

`SharedHostLimiter` has HostLimiter's interface (slot, pause, record) with the limits held run-wide:
a thread that needs a slot of a host either takes one its worker was already granted, or waits while
one thread of the worker asks the service for as many slots as the worker has threads waiting for that
host (so a busy host costs one call per batch, and grants are used as soon as they arrive). Ended
requests and failure counts go back in one report every few milliseconds at most; a pause is sent at
once, before the request that saw it gives its slot back, and kept here too, so this worker stops at once.

`SharedRobotsCache` has TtlCache's `get`: each origin's robots.txt is fetched once per run, by the
first worker that asks; the others wait for its answer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator

from curate.fetch.cache import TtlCache
from curate.fetch.host_table import HostTable
from curate.fetch.politeness import HostRefused, rate_limited_detail, unreachable_detail
from curate.fetch.reasons import HOST_UNREACHABLE, RATE_LIMITED
from curate.fetch.run_politeness import Grant

REPORT_GAP = 0.01  # seconds between two reports of ended requests


def _ray_get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


@dataclass
class _Host:
    """What this worker knows of one host."""

    waiting: int = 0  # threads waiting for a slot
    granted: int = 0  # slots granted and not yet taken by a thread
    asking: bool = False  # a thread is asking the service
    paused_until: float = 0.0
    skipped_until: float = 0.0

    def idle(self, now: float) -> bool:
        return not (self.waiting or self.granted or self.asking) and max(self.paused_until, self.skipped_until) <= now


@dataclass
class _Ended:
    """Requests to one host ended since the last report."""

    released: int = 0
    failures: int = 0  # failed in a row at the end
    succeeded_first: bool = False  # a success came before those failures


class SharedHostLimiter:
    """The run-wide per-host limits, as seen by the threads of one fetch worker.

    `service` is the run's PolitenessService actor; `get` waits for an actor call's result (ray.get).
    """

    def __init__(
        self,
        service: Any,
        max_wait: float,
        max_failures: int = 0,
        max_hosts: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        get: Callable[[Any], Any] = _ray_get,
    ):
        self.max_wait = max_wait
        self.max_failures = max_failures
        self._service = service
        self._get = get
        self._clock = clock
        self._hosts = HostTable(max_hosts, _Host, lambda state: state.idle(self._clock()))
        self._changed = threading.Condition()
        self._ended: dict[str, _Ended] = {}
        self._ended_ready = threading.Condition()  # taken after _changed when both are needed
        self._closed = False
        self._reporter = threading.Thread(target=self._report_loop, name="curate-politeness-report", daemon=True)
        self._reporter.start()

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        """Hold one request slot of `host`, waiting as politeness demands; raises HostRefused."""
        self._acquire(host)
        try:
            yield
        finally:
            self._end(host, released=1)

    def pause(self, host: str, seconds: float) -> None:
        """No new request to `host` for `seconds`, in every worker of the run; returns once the service has it."""
        with self._changed:
            state = self._state(host)
            state.paused_until = max(state.paused_until, self._clock() + seconds)
            self._give_back(host, state)
            self._changed.notify_all()
        self._get(self._service.pause.remote(host, seconds))

    def record(self, host: str, failed: bool) -> None:
        """Count a request to `host` that `failed` (could not connect, broke off or timed out) or did not."""
        with self._ended_ready:
            ended = self._ended.setdefault(host, _Ended())
            if failed:
                ended.failures += 1
            else:
                ended.failures, ended.succeeded_first = 0, True
            self._ended_ready.notify()

    def close(self) -> None:
        """Send what is still to report and stop the reporting thread."""
        with self._ended_ready:
            self._closed = True
            self._ended_ready.notify()
        self._reporter.join(timeout=5)

    def _acquire(self, host: str) -> None:
        with self._changed:
            state = self._state(host)
            state.waiting += 1
            try:
                while True:
                    now = self._clock()
                    if state.skipped_until > now:
                        raise HostRefused(HOST_UNREACHABLE,
                                          unreachable_detail(host, state.skipped_until - now, self.max_failures))
                    if state.paused_until - now > self.max_wait:
                        raise HostRefused(RATE_LIMITED, rate_limited_detail(host, state.paused_until - now,
                                                                            self.max_wait))
                    if state.paused_until > now:
                        self._changed.wait(state.paused_until - now)
                    elif state.granted:
                        state.granted -= 1
                        return
                    elif state.asking:
                        self._changed.wait()
                    else:
                        self._ask(host, state)
            finally:
                state.waiting -= 1
                if not state.waiting:
                    self._give_back(host, state)

    def _ask(self, host: str, state: _Host) -> None:
        """Ask the service for a slot for every waiting thread (caller holds the lock; released meanwhile)."""
        state.asking = True
        self._changed.release()
        try:
            grant: Grant = self._get(self._service.take.remote(host, state.waiting))
        finally:
            self._changed.acquire()
            state.asking = False
            self._changed.notify_all()
        now = self._clock()
        if grant.slots:
            state.granted += grant.slots
            if max(state.paused_until, state.skipped_until) > now:  # paused meanwhile: these are not to be used
                self._give_back(host, state)
        elif grant.refusal == HOST_UNREACHABLE:
            state.skipped_until = max(state.skipped_until, now + grant.wait)
        elif grant.wait:  # a pause (longer than max_wait: refused as rate_limited)
            state.paused_until = max(state.paused_until, now + grant.wait)

    def _give_back(self, host: str, state: _Host) -> None:
        """Return the granted slots no thread will take (caller holds the lock)."""
        if state.granted:
            self._end(host, released=state.granted)
            state.granted = 0

    def _end(self, host: str, released: int) -> None:
        with self._ended_ready:
            self._ended.setdefault(host, _Ended()).released += released
            self._ended_ready.notify()

    def _report_loop(self) -> None:
        while True:
            with self._ended_ready:
                while not self._ended and not self._closed:
                    self._ended_ready.wait()
                if not self._ended:
                    return
                ended, self._ended = self._ended, {}
            report = {host: (item.released, item.failures, item.succeeded_first) for host, item in ended.items()}
            with contextlib.suppress(Exception):  # the service is gone only once the run has ended
                self._service.report.remote(report)
            time.sleep(REPORT_GAP)

    def _state(self, host: str) -> _Host:
        """This worker's state of `host` (created if new); caller holds the lock."""
        return self._hosts.get(host)


class SharedRobotsCache:
    """robots.txt answers of the run, kept here too: `get(origin, compute)` like TtlCache's.

    The first worker of the run to ask for an origin runs `compute()` -> (rules, ttl) and tells the
    service; the others get that answer (and keep it for what is left of its ttl).
    """

    def __init__(self, service: Any, max_entries: int, get: Callable[[Any], Any] = _ray_get):
        self._service = service
        self._get = get
        self._known: TtlCache[Hashable, Any] = TtlCache(max_entries)  # one question per origin per worker

    def get(self, origin: Hashable, compute: Callable[[], tuple[Any, float]]) -> Any:
        """The rules of `origin`, from this worker's cache, the service, or fetched by `compute`."""
        return self._known.get(origin, lambda: self._ask(origin, compute))

    def _ask(self, origin: Hashable, compute: Callable[[], tuple[Any, float]]) -> tuple[Any, float]:
        known = self._get(self._service.robots.remote(origin))
        if known is not None:
            return known
        try:
            rules, ttl = compute()
        except BaseException:
            self._service.robots_abandon.remote(origin)
            raise
        self._service.robots_answer.remote(origin, rules, ttl)
        return rules, ttl
