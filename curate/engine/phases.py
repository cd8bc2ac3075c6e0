"""Drive one phase of per-sample stages over all work shards on a Ray actor pool."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.util import ActorPool

from curate.engine.cluster import WorkerPlan
from curate.files import RunLayout, read_json
from curate.engine.worker import PhaseWorker, StageFailure
from curate.stage import StageContext

CRASH_HOOK_ENV = "CURATE_TEST_CRASH_AFTER"


@dataclass
class PhaseSpec:
    """A phase: its name, the phase it reads from, and its stages as (name, params JSON)."""

    name: str
    input_phase: str
    stages: list[tuple[str, dict[str, Any]]]


def crash_if_asked(phase: str, shard: int) -> None:
    """Test-only crash hook: exit the process at once after `phase` finished work shard `shard`.

    Set CURATE_TEST_CRASH_AFTER=PHASE:SHARD (e.g. ``prepare:1``) to simulate a
    run killed mid-way; nothing is flushed or cleaned up, as with a real kill.
    """
    wanted = os.environ.get(CRASH_HOOK_ENV)
    if wanted and wanted == f"{phase}:{shard}":
        os._exit(86)


def run_phase(spec: PhaseSpec, layout: RunLayout, shards: int, plan: WorkerPlan, context: StageContext,
              batch_rows: int, on_progress: Callable[[int], None]) -> list[dict[str, Any]]:
    """Run `spec` on every work shard that has no completion marker; return all shards' markers.

    Work shards finished by an earlier (killed) run are skipped, so a re-run resumes.
    """
    pending = [s for s in range(shards) if not layout.marker(spec.name, s).exists()]
    for shard in range(shards):
        if shard not in pending:
            on_progress(read_json(layout.marker(spec.name, shard))["rows_in"])
    if pending:
        remote_worker = ray.remote(PhaseWorker).options(
            num_cpus=plan.cpus_per_worker, num_gpus=plan.gpus_per_worker, max_restarts=0)
        actors = [remote_worker.remote(spec.stages, context, batch_rows) for _ in range(min(plan.workers, len(pending)))]
        pool = ActorPool(actors)

        def submit(actor, shard):
            return actor.run.remote(spec.name, shard, str(layout.shard_file(spec.input_phase, shard)),
                                    str(layout.shard_file(spec.name, shard)), str(layout.drops_file(spec.name, shard)),
                                    str(layout.marker(spec.name, shard)))

        try:
            for marker in pool.map_unordered(submit, pending):
                on_progress(marker["rows_in"])
                crash_if_asked(spec.name, marker["shard"])
        except ray.exceptions.RayTaskError as error:
            cause = error.as_instanceof_cause() if hasattr(error, "as_instanceof_cause") else error
            if isinstance(cause, StageFailure) or isinstance(getattr(error, "cause", None), StageFailure):
                raise StageFailure(str(getattr(error, "cause", cause))) from None
            raise StageFailure(f"phase {spec.name!r}: {error}") from None
        finally:
            for actor in actors:
                ray.kill(actor)
    return [read_json(layout.marker(spec.name, s)) for s in range(shards)]
