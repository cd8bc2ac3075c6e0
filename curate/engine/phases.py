"""Drive one phase of per-sample stages over all work shards on a Ray actor pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.util import ActorPool

from curate.engine.cluster import WorkerPlan
from curate.engine.crash import crash_if_asked
from curate.engine.worker import PhaseWorker, StageSpec
from curate.files import RunLayout, read_json
from curate.stage import StageContext, StageFailure


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
        actors = [
            remote_worker.remote(spec.stages, context, batch_rows) for _ in range(min(plan.workers, len(pending)))
        ]
        pool = ActorPool(actors)

        def submit(actor, shard):
            return actor.run.remote(
                spec.name,
                shard,
                str(layout.shard_file(spec.input_phase, shard)),
                str(layout.shard_file(spec.name, shard)),
                str(layout.drops_file(spec.name, shard)),
                str(layout.marker(spec.name, shard)),
            )

        try:
            for marker in pool.map_unordered(submit, pending):
                on_progress(marker["rows_in"])
                crash_if_asked(spec.name, marker["shard"])
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            raise StageFailure(
                str(cause) if isinstance(cause, StageFailure) else f"phase {spec.name!r}: {error}"
            ) from None
        except ray.exceptions.RayActorError as error:
            raise StageFailure(f"phase {spec.name!r}: a worker died ({error}); re-run to resume") from None
        finally:
            _stop(actors)
    return [read_json(layout.marker(spec.name, s)) for s in range(shards)]


def _stop(actors: list) -> None:
    """Let every worker tear its stages down, then end it."""
    try:
        ray.get([actor.shutdown.remote() for actor in actors], timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        pass  # a dead or stuck worker has nothing left to release; it is killed below
    for actor in actors:
        ray.kill(actor)
