"""A small thread-safe cache: bounded LRU, per-entry time to live, one computation per key at a time."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Map keys to values that expire; at most `max_entries` kept, the least recently used evicted first.

    `get(key, compute)` returns the cached value, or calls `compute()` -> (value, ttl seconds)
    once while other threads asking for the same key wait for that result. An exception of
    `compute` reaches every waiting caller and nothing is cached.
    """

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max(1, max_entries)
        self._clock = clock
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self._pending: dict[K, Future] = {}
        self._lock = threading.Lock()

    def get(self, key: K, compute: Callable[[], tuple[V, float]]) -> V:
        """The live value of `key`, computing (and caching) it when absent or expired."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[1] > self._clock():
                self._entries.move_to_end(key)
                return entry[0]
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = Future()
        if not owner:
            return pending.result()
        try:
            value, ttl = compute()
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            if ttl > 0:
                self._entries[key] = (value, self._clock() + ttl)
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        pending.set_result(value)
        return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
