"""Drive steps over work shards: streamed through pools of Ray actors (stages with models), or as Ray tasks."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import ray

from curate.stage import StageFailure

WORKER_DEATHS_PER_SHARD = 3
REPLACEMENT_WAIT = 600.0  # seconds without any running shard, waiting for a replacement worker

@dataclass
class Step:
    """One step of a streamed pipeline: a pool of `workers` actors (made by `new_actor`), each taking one work
    shard at a time.

    `has_work(shard)` is asked when the shard reaches the step (every step before it is done with it); a shard
    without work passes on at once through `on_skip(shard)`. `submit(actor, shard)` starts the shard's work and
    returns its object ref; `on_done(shard, marker)` gets what it returned.
    """

    name: str
    new_actor: Callable[[], Any]
    workers: int
    submit: Callable[[Any, int], Any]
    on_done: Callable[[int, dict[str, Any]], None]
    has_work: Callable[[int], bool] = lambda shard: True
    on_skip: Callable[[int], None] = lambda shard: None


def run_pipeline(steps: list[Step], shards: list[int], max_in_flight: int,
                 before_others: Callable[[list[Any]], None] | None = None, first: list[int] | None = None) -> None:
    """Stream `shards` through `steps` in order: a shard moves to the next step as soon as it is done with one,
    so shard i can be in a later step while shard i+1 is still in an earlier one.

    At most `max_in_flight` shards are between entering the first step and leaving the last (backpressure).
    Each step's pool starts before any work and stops once no shard can reach it any more (a step of 0
    workers has none: it must have no work for any shard). The pools of the steps in `first` start before
    the others, and `before_others(actors)` runs in between (e.g. waiting for them to be placed, so that GPU
    nodes' CPUs go to the stages that need those nodes).
    """
    order = [*(first or []), *(i for i in range(len(steps)) if i not in (first or []))]
    pools: dict[int, _WorkerPool] = {}
    try:
        for count, index in enumerate(order):
            if count == len(first or []) and count and before_others is not None:
                before_others([actor for pool in pools.values() for actor in pool.actors])
            if steps[index].workers > 0:
                pools[index] = _WorkerPool(steps[index].new_actor, steps[index].workers)
        _Stream(steps, pools, max_in_flight).run(shards)
    finally:
        for pool in pools.values():
            pool.stop()


class _Stream:
    """The scheduling loop of run_pipeline: per-step queues, one wait over every pool's running work."""

    def __init__(self, steps: list[Step], pools: dict[int, _WorkerPool], max_in_flight: int):
        self.steps = steps
        self.pools = pools
        self.max_in_flight = max(1, max_in_flight)
        self.queues: list[deque[int]] = [deque() for _ in steps]
        self.position: dict[int, int] = {}  # shard in flight -> the step it is queued for or running in

    def run(self, shards: list[int]) -> None:
        waiting = deque(shards)
        while waiting or self.position:
            while waiting and len(self.position) < self.max_in_flight:
                self._advance(waiting.popleft(), 0)
            self._retire(waiting)
            for index, pool in self.pools.items():
                while self.queues[index] and pool.idle:
                    pool.start(self.queues[index].popleft(), self.steps[index].submit)
            if not self.position:
                continue
            refs = [ref for pool in self.pools.values() for ref in pool.refs()]
            running = any(pool.running for pool in self.pools.values())
            done, _ = ray.wait(refs, num_returns=1, timeout=None if running else REPLACEMENT_WAIT)
            if not done:
                raise StageFailure(f"no worker could be started for {REPLACEMENT_WAIT:.0f} s after workers "
                                   "died (not enough resources left in the cluster?)")
            index = next(i for i, pool in self.pools.items() if pool.owns(done[0]))
            finished = self.pools[index].finish(done[0], self.steps[index].name)
            if finished is None:
                continue
            shard, marker, retry = finished
            if retry:
                self.queues[index].appendleft(shard)
                continue
            self.steps[index].on_done(shard, marker)
            self._advance(shard, index + 1)

    def _advance(self, shard: int, index: int) -> None:
        """Queue `shard` for the first step from `index` on that has work for it; past the last, it is done."""
        while index < len(self.steps) and not self.steps[index].has_work(shard):
            self.steps[index].on_skip(shard)
            index += 1
        if index < len(self.steps) and index not in self.pools:
            raise StageFailure(f"phase {self.steps[index].name!r}: work shard {shard:05d} has work but the "
                               "step has no workers")
        if index == len(self.steps):
            self.position.pop(shard, None)
            return
        self.position[shard] = index
        self.queues[index].append(shard)

    def _retire(self, waiting: deque[int]) -> None:
        """Stop the pools no shard can reach any more, so their resources go to the steps still working."""
        if waiting:
            return
        lowest = min(self.position.values(), default=len(self.steps))
        for index in [i for i in self.pools if i < lowest]:
            self.pools.pop(index).stop()


def run_tasks(
    name: str,
    items: list[Any],
    submit: Callable[[Any], Any],
    max_in_flight: int,
    on_result: Callable[[Any, Any], None],
) -> None:
    """Run one Ray task per item (`submit(item)` returns its ref), at most `max_in_flight` at once, in order
    of submission; `on_result(item, result)` gets each as it finishes. A task's error stops the run."""
    waiting = list(items)
    in_flight: dict[Any, Any] = {}
    while waiting or in_flight:
        while waiting and len(in_flight) < max_in_flight:
            item = waiting.pop(0)
            in_flight[submit(item)] = item
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in done:
            item = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as error:
                cause = getattr(error, "cause", error)
                raise StageFailure(str(cause) if isinstance(cause, StageFailure)
                                   else f"{name}: {type(cause).__name__}: {cause}") from None
            on_result(item, result)


class _WorkerPool:
    """Workers that take work shards as they become free; a worker that dies is replaced.

    A work shard whose worker died (its node was lost, it was killed, it ran out of
    memory) is given to another worker, up to WORKER_DEATHS_PER_SHARD times: work shards
    are written atomically, so a retried shard is never half-written or counted twice.
    A replacement takes work only once Ray has placed it, so a cluster that shrank does
    not leave a shard queued on a worker that can never start.
    """

    def __init__(self, new_actor: Callable[[], Any], size: int):
        self.new_actor = new_actor
        self.actors = [new_actor() for _ in range(max(1, size))]
        self.idle = list(self.actors)
        self.running: dict[Any, tuple[Any, int]] = {}
        self.starting: dict[Any, Any] = {}  # readiness ref -> replacement worker not yet placed
        self.deaths: dict[int, int] = {}

    def start(self, shard: int, submit: Callable[[Any, int], Any]) -> None:
        """Give `shard` to an idle worker."""
        actor = self.idle.pop(0)  # the longest idle first: the first shards go to the first workers started
        self.running[submit(actor, shard)] = (actor, shard)

    def refs(self) -> list[Any]:
        """What to wait on: running work and replacements being placed."""
        return [*self.running, *self.starting]

    def owns(self, ref: Any) -> bool:
        return ref in self.running or ref in self.starting

    def finish(self, ref: Any, phase: str) -> tuple[int, dict[str, Any] | None, bool] | None:
        """Take a finished `ref`: (shard, marker, False) for done work, (shard, None, True) for a shard whose
        worker died and that must run again, None for a replacement worker now ready (or failed to start)."""
        if ref in self.starting:
            try:
                ray.get(ref)
                self.idle.append(self.starting.pop(ref))
            except ray.exceptions.RayActorError:
                self.starting.pop(ref)
                self._replace(None)
            return None
        actor, shard = self.running.pop(ref)
        try:
            marker = ray.get(ref)
        except ray.exceptions.RayActorError as error:
            self.deaths[shard] = self.deaths.get(shard, 0) + 1
            if self.deaths[shard] > WORKER_DEATHS_PER_SHARD:
                raise StageFailure(f"phase {phase!r}: work shard {shard:05d} lost its worker "
                                   f"{self.deaths[shard]} times ({error}); re-run to resume") from None
            self._replace(actor)
            return shard, None, True
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            raise StageFailure(str(cause) if isinstance(cause, StageFailure) else f"phase {phase!r}: {error}") \
                from None
        self.idle.append(actor)
        return shard, marker, False

    def _replace(self, dead: Any) -> None:
        """Start a new worker in place of `dead`; it takes work once Ray has placed it."""
        if dead is not None:
            self.actors.remove(dead)
        replacement = self.new_actor()
        self.actors.append(replacement)
        self.starting[replacement.__ray_ready__.remote()] = replacement

    def stop(self) -> None:
        """Let every worker tear its stages down, then end it."""
        _stop(self.actors)
        self.actors, self.idle = [], []


def _stop(actors: list) -> None:
    """Let every worker tear its stages down, then end it."""
    try:
        ray.get([actor.shutdown.remote() for actor in actors], timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        pass  # a dead or stuck worker has nothing left to release; it is killed below
    for actor in actors:
        ray.kill(actor)
