"""Run-wide services: one Ray actor per service a stage declares (Stage.services), shared by all its workers.

Each starts on the driver's node before any worker (a node lost mid-run never takes a service with it) and is
stopped when the run ends. Workers find theirs by the actor name the engine puts in StageContext.services.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from curate import registry
from curate.stage import Stage


@contextlib.contextmanager
def run_services(stages: list[Stage], enabled: bool = True) -> Iterator[tuple[dict[str, str], str | None]]:
    """Start the services `stages` declare; yield (`"stage.service"` -> actor name, the actors' namespace).

    Nothing starts when not `enabled` (a run in this process) or no stage declares one: stages then fall back to
    their in-process behaviour.
    """
    wanted = {f"{stage.name}.{name}": spec for stage in stages for name, spec in stage.services().items()}
    if not enabled or not wanted:
        yield {}, None
        return
    namespace = ray.get_runtime_context().namespace
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    token = uuid.uuid4().hex[:12]
    names: dict[str, str] = {}
    actors: list[Any] = []
    try:
        for key, spec in wanted.items():
            cls = registry.import_target(spec.target)
            name = f"curate-{key}-{token}"
            options = {} if spec.max_concurrency is None else {"max_concurrency": spec.max_concurrency}
            actor = ray.remote(cls).options(name=name, namespace=namespace, num_cpus=0, max_restarts=0,
                                             scheduling_strategy=here, **options).remote(**spec.params)
            actors.append(actor)
            names[key] = name
        ray.get([actor.__ray_ready__.remote() for actor in actors])
        yield names, namespace
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
