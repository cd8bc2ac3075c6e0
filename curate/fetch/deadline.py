"""Total deadlines of requests, enforced by one watchdog thread per fetcher.

A socket timeout bounds each single read; it cannot stop a host that sends one byte
every second, or a body that never ends. The watchdog can: when a request's deadline
passes it shuts the request's socket down, which makes the blocked read in the
requesting thread return at once; the fetcher then reports a timeout.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from typing import Any


class Watch:
    """The deadline of one request and the connection it uses."""

    __slots__ = ("deadline", "expired", "finished", "_connection", "_sock", "_lock")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self.finished = False
        self._connection: Any = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def attach(self, connection: Any) -> None:
        """Name the connection (an object with a `sock` attribute) to cut when the deadline passes.

        Its current socket is remembered too: a connection hands its socket over to the
        response of a "Connection: close" answer and forgets it, but the body is still read from it.
        """
        with self._lock:
            self._connection = connection
            sock = getattr(connection, "sock", None)
            if sock is not None:
                self._sock = sock

    def finish(self) -> None:
        """The request is over: from now on the watchdog leaves its connection alone."""
        with self._lock:
            self.finished = True

    def expire(self) -> None:
        """Mark the request late and shut its socket down (unless it finished meanwhile)."""
        with self._lock:
            if self.finished:
                return
            self.expired = True
            sock = getattr(self._connection, "sock", None) or self._sock
            if sock is not None:
                try:
                    # The plain socket's shutdown, also for an SSL socket: it wakes a blocked
                    # read without touching the TLS state another thread is using.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass


class Watchdog:
    """Expire watches when their deadlines pass; the thread starts on the first watch."""

    def __init__(self):
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._generation = 0

    def watch(self, seconds: float) -> Watch:
        """A new watch whose deadline is `seconds` from now."""
        watch = Watch(time.monotonic() + seconds)
        with self._changed:
            heapq.heappush(self._heap, (watch.deadline, next(self._order), watch))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(self._generation,), name="curate-fetch-deadlines", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is watch:
                self._changed.notify()
        return watch

    def close(self) -> None:
        """Stop the thread (a later watch starts a new one)."""
        with self._changed:
            thread, self._thread = self._thread, None
            self._generation += 1
            self._changed.notify_all()
        if thread is not None:
            thread.join()

    def _run(self, generation: int) -> None:
        with self._changed:
            while generation == self._generation:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].finished or self._heap[0][0] <= now):
                    heapq.heappop(self._heap)[2].expire()
                self._changed.wait(self._heap[0][0] - now if self._heap else None)
