"""Drive one phase of per-sample stages over all work shards on a Ray actor pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import ray

from curate import storage
from curate.engine.cluster import WorkerPlan
from curate.engine.crash import crash_if_asked
from curate.engine.worker import PhaseWorker, StageSpec
from curate.files import RunLayout, read_json
from curate.stage import StageContext, StageFailure

WORKER_DEATHS_PER_SHARD = 3
REPLACEMENT_WAIT = 600.0  # seconds without any running shard, waiting for a replacement worker


@dataclass
class PhaseSpec:
    """A phase: its name, the phase it reads from, and its stages."""

    name: str
    input_phase: str
    stages: list[StageSpec]
    corpus: StageSpec | None = None  # a corpus-wide stage decides first; `stages` then apply its decision


def run_phase(
    spec: PhaseSpec,
    layout: RunLayout,
    shards: int,
    plan: WorkerPlan,
    context: StageContext,
    batch_rows: int,
    on_progress: Callable[[int], None],
) -> list[dict[str, Any]]:
    """Run `spec` on every work shard that has no completion marker; return all shards' markers.

    Work shards finished by an earlier (killed) run are skipped, so a re-run resumes.
    """
    pending = [s for s in range(shards) if not layout.marker(spec.name, s).exists()]
    for shard in range(shards):
        if shard not in pending:
            on_progress(read_json(layout.marker(spec.name, shard))["rows_in"])
    if pending:
        remote_worker = ray.remote(PhaseWorker).options(
            num_cpus=plan.cpus_per_worker,
            num_gpus=plan.gpus_per_worker,
            memory=plan.memory_per_worker or None,
            max_restarts=0,
        )
        config = storage.current_config()
        pool = _WorkerPool(lambda: remote_worker.remote(spec.stages, context, batch_rows, config),
                           min(plan.workers, len(pending)))

        def submit(actor, shard):  # paths as strings: local paths, or URLs of the configured store
            return actor.run.remote(
                spec.name,
                shard,
                str(layout.shard_file(spec.input_phase, shard)),
                str(layout.shard_file(spec.name, shard)),
                str(layout.drops_file(spec.name, shard)),
                str(layout.marker(spec.name, shard)),
            )

        try:
            for marker in pool.run(pending, submit, phase=spec.name):
                on_progress(marker["rows_in"])
                crash_if_asked(spec.name, marker["shard"])
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            raise StageFailure(
                str(cause) if isinstance(cause, StageFailure) else f"phase {spec.name!r}: {error}"
            ) from None
        finally:
            _stop(pool.actors)
    return [read_json(layout.marker(spec.name, s)) for s in range(shards)]


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
