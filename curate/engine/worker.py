"""How a Ray worker rebuilds stages: from their name, import target and parameters as JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curate import registry
from curate.stage import Stage, StageContext


@dataclass(frozen=True)
class StageSpec:
    """What a worker needs to rebuild a stage: its name, import target and parameters as JSON."""

    name: str
    target: str
    params: dict[str, Any]


def build_stages(specs: list[StageSpec], context: StageContext) -> list[Stage]:
    """Instantiate stages from their specs."""
    stages = []
    for spec in specs:
        cls = registry.import_target(spec.target)
        stages.append(cls(cls.Params.model_validate(spec.params), context))
    return stages
