"""Stages used only by the engine tests (imported by Ray workers through PYTHONPATH)."""

from __future__ import annotations

import pyarrow as pa

from curate import schema
from curate.stage import Params, Stage


class ExplodeParams(Params):
    """Which caption makes the stage raise."""

    trigger: str = "explode"


class ExplodingStage(Stage):
    """Raises (a stage-level failure) when a batch holds a caption containing `trigger`."""

    name = "explode"
    Params = ExplodeParams
    phase = "prepare"

    def process(self, batch: pa.Table) -> pa.Table:
        for captions in batch.column("captions").to_pylist():
            if self.params.trigger in (schema.caption_text(captions) or ""):
                raise ValueError(f"cannot handle caption containing {self.params.trigger!r}")
        return batch


class RowEatingStage(Stage):
    """Breaks the contract: removes rows instead of marking them dropped."""

    name = "eat_rows"
    phase = "prepare"

    def process(self, batch: pa.Table) -> pa.Table:
        return batch.slice(0, batch.num_rows // 2)
