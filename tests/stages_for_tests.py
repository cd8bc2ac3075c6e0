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


def hash_score(key: str) -> float:
    """A deterministic score in [0, 1) from a sample key, with a few deliberate ties."""
    import hashlib

    value = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
    return round(value, 2)  # rounding to 2 decimals makes ties common


class HashScoreStage(Stage):
    """Sets scores.clip_score from the key, so corpus-wide tests know every score in advance."""

    name = "hash_score"
    provides = frozenset({"scores"})
    phase = "model"

    def process(self, batch: pa.Table) -> pa.Table:
        scores = [{"clip_score": hash_score(k), "aesthetic": None} for k in batch.column("key").to_pylist()]
        index = batch.schema.get_field_index("scores")
        return batch.set_column(index, schema.SAMPLE_SCHEMA.field("scores"),
                                pa.array(scores, schema.SAMPLE_SCHEMA.field("scores").type))
