"""A bounded table of per-host state: the politeness limiters keep one entry per host they talk to."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, TypeVar

State = TypeVar("State")


class HostTable(Generic[State]):
    """Per-host state made by `new()`, most recently used last. When `max_hosts` are held, a new host first
    makes room: up to a quarter of the hosts that are `idle(state)` are forgotten, least recently used first."""

    def __init__(self, max_hosts: int, new: Callable[[], State], idle: Callable[[State], bool]):
        self.max_hosts = max(1, max_hosts)
        self._new = new
        self._idle = idle
        self._hosts: OrderedDict[str, State] = OrderedDict()

    def get(self, host: str) -> State:
        """The state of `host`, created if new."""
        state = self._hosts.get(host)
        if state is not None:
            self._hosts.move_to_end(host)
            return state
        if len(self._hosts) >= self.max_hosts:
            idle = [name for name, old in self._hosts.items() if self._idle(old)]
            for name in idle[: len(self._hosts) // 4 + 1]:
                del self._hosts[name]
        state = self._hosts[host] = self._new()
        return state

    def __contains__(self, host: str) -> bool:
        return host in self._hosts

    def __len__(self) -> int:
        return len(self._hosts)
