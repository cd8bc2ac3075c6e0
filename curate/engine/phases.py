"""Drive a step over all work shards: on a pool of Ray actors (stages with models) or as Ray tasks."""

from __future__ import annotations

from typing import Any, Callable

import ray

from curate.stage import StageFailure

WORKER_DEATHS_PER_SHARD = 3
REPLACEMENT_WAIT = 600.0  # seconds without any running shard, waiting for a replacement worker


def run_actor_pool(
    name: str,
    pending: list[int],
    new_actor: Callable[[], Any],
    workers: int,
    submit: Callable[[Any, int], Any],
    on_marker: Callable[[dict[str, Any]], None],
) -> None:
    """Hand each pending work shard to the next free actor of a pool of `workers` actors made by `new_actor`.

    `submit(actor, shard)` starts the shard's work and returns its object ref; `on_marker` gets each finished
    shard's marker. Actors that die are replaced (see _WorkerPool); every actor is torn down at the end.
    """
    if not pending:
        return
    pool = _WorkerPool(new_actor, min(workers, len(pending)))
    try:
        for marker in pool.run(pending, submit, phase=name):
            on_marker(marker)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        raise StageFailure(str(cause) if isinstance(cause, StageFailure) else f"phase {name!r}: {error}") from None
    finally:
        _stop(pool.actors)


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
        self.actors = [new_actor() for _ in range(size)]

    def run(self, shards: list[int], submit: Callable[[Any, int], Any], phase: str):
        """Yield each shard's marker as it finishes."""
        todo = list(shards)
        deaths: dict[int, int] = {}
        idle = list(self.actors)
        running: dict[Any, tuple[Any, int]] = {}
        starting: dict[Any, Any] = {}  # readiness ref -> replacement worker not yet placed
        while todo or running:
            while todo and idle:
                actor, shard = idle.pop(), todo.pop(0)
                running[submit(actor, shard)] = (actor, shard)
            waiting = list(running) + list(starting)
            done, _ = ray.wait(waiting, num_returns=1, timeout=None if running else REPLACEMENT_WAIT)
            if not done:
                raise StageFailure(f"phase {phase!r}: no worker could be started for {REPLACEMENT_WAIT:.0f} s "
                                   "after workers died (not enough resources left in the cluster?)")
            if done[0] in starting:
                try:
                    ray.get(done[0])
                    idle.append(starting.pop(done[0]))
                except ray.exceptions.RayActorError:
                    starting.pop(done[0])
                    self._replace(None, starting)
                continue
            actor, shard = running.pop(done[0])
            try:
                marker = ray.get(done[0])
            except ray.exceptions.RayActorError as error:
                deaths[shard] = deaths.get(shard, 0) + 1
                if deaths[shard] > WORKER_DEATHS_PER_SHARD:
                    raise StageFailure(f"phase {phase!r}: work shard {shard:05d} lost its worker "
                                       f"{deaths[shard]} times ({error}); re-run to resume") from None
                self._replace(actor, starting)
                todo.insert(0, shard)
                continue
            idle.append(actor)
            yield marker

    def _replace(self, dead: Any, starting: dict[Any, Any]) -> None:
        """Start a new worker in place of `dead`; it takes work once Ray has placed it."""
        if dead is not None:
            self.actors.remove(dead)
        replacement = self.new_actor()
        self.actors.append(replacement)
        starting[replacement.__ray_ready__.remote()] = replacement


def _stop(actors: list) -> None:
    """Let every worker tear its stages down, then end it."""
    try:
        ray.get([actor.shutdown.remote() for actor in actors], timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        pass  # a dead or stuck worker has nothing left to release; it is killed below
    for actor in actors:
        ray.kill(actor)
