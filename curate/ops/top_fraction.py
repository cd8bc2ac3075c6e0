"""Keep the top fraction of the corpus by a score (DataComp's "CLIP score top 30%" baseline).

The threshold is corpus-wide: computed over every sample that reaches this stage,
in all work shards, never per batch. The rule is DataComp's (baselines
`get_threshold`): with n scored samples, the threshold is the
``int(n * fraction)``-th score in descending order (0-based), and samples
scoring at least the threshold are kept. Ties at the threshold are all kept.
Samples without the score are dropped (`not_scored`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.stage import CorpusStage, Params


class TopFractionParams(Params):
    """Which score, and which fraction of the scored samples to keep."""

    score: Literal["clip_score", "aesthetic"] = "clip_score"
    fraction: float = Field(0.3, gt=0.0, le=1.0)


def top_fraction_threshold(scores: np.ndarray, fraction: float) -> float:
    """The score a sample needs to be in the top `fraction` (DataComp's rule); -inf keeps all."""
    n = int(len(scores) * fraction)
    if n >= len(scores):
        return float("-inf")
    return float(-np.sort(-scores)[n])


class TopFractionFilter(CorpusStage):
    """Drops samples below the corpus-wide top-`fraction` threshold of `score`."""

    name = "top_fraction"
    Params = TopFractionParams
    columns = ("key", "scores")
    reads = frozenset({"scores"})
    provides = frozenset()
    reads_images = False
    annotation_params = frozenset()
    selection_params = frozenset({"score", "fraction"})

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict]:
        """Drop rows below the threshold (`below_top_fraction`) or without the score (`not_scored`)."""
        score_name, fraction = self.params.score, self.params.fraction
        values = pc.struct_field(table.column("scores"), score_name) if table.num_rows else pa.array([], pa.float32())
        scores = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
        scored = ~np.isnan(scores)
        threshold = top_fraction_threshold(scores[scored], fraction)
        keys = np.asarray(table.column("key").to_pylist(), dtype=object)
        below = scored & (scores < threshold)
        reasons = np.where(below, "below_top_fraction", "not_scored")
        dropped = below | ~scored
        details = [
            f"{score_name} {score:.4f} < {threshold:.4f} (top {fraction:.0%})" if is_below else f"no {score_name}"
            for score, is_below in zip(scores[dropped], below[dropped])
        ]
        drops = pa.table({"key": keys[dropped].tolist(), "reason": reasons[dropped].tolist(), "detail": details})
        summary = {
            "score": score_name,
            "fraction": fraction,
            "threshold": None if np.isinf(threshold) else round(threshold, 6),
            "scored": int(scored.sum()),
            "kept": int(scored.sum() - below.sum()),
            "rule": "keep score >= the int(n * fraction)-th score in descending order (DataComp)",
        }
        return drops, summary
