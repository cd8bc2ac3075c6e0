"""Aesthetic score: a head (LAION improved predictor v2, v1 linear, or the project's tiny head)
on the L2-normalised CLIP image embedding.

When an earlier stage stored the embedding of the same CLIP model (the `embeddings`
column, written by clip_score), it is reused instead of decoding the image again.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.models.aesthetic import AestheticSpec, check_aesthetic_available, load_aesthetic
from curate.models.clip import ClipSpec
from curate.ops.clip_stage import ClipHeadStage, decode_drops, merge_scores, range_drops, score_values
from curate.ops.image_embedding import embed_images
from curate.stage import Params, with_drops


class AestheticParams(Params):
    """CLIP model and head of the aesthetic stage, and its thresholds."""

    clip: ClipSpec = ClipSpec()
    head: AestheticSpec = AestheticSpec()
    min_score: float | None = None  # drop below (reason aesthetic_low)
    max_score: float | None = None  # drop above (reason aesthetic_high)
    torch_threads: int | None = Field(None, ge=1)
    decode_threads: int = Field(2, ge=1)


class AestheticStage(ClipHeadStage):
    """Fills scores.aesthetic (`annotate`); optionally filters on it (`select`)."""

    name = "aesthetic"
    Params = AestheticParams
    head_role = "aesthetic_head"
    check_head = staticmethod(check_aesthetic_available)
    version = 1
    reads = frozenset({"images", "embeddings"})
    provides = frozenset({"scores"})
    reads_images = True  # the image is decoded when no embedding of the same CLIP is stored
    annotation_params = ClipHeadStage.annotation_params
    selection_params = frozenset({"min_score", "max_score"})

    def setup(self) -> None:
        """Load CLIP and the head once per worker (the head's input size is checked here)."""
        super().setup()
        self.head = load_aesthetic(self.params.head, self.model.embed_dim)

    def annotate(self, batch: pa.Table) -> pa.Table:
        """Fill scores.aesthetic; drop images CLIP cannot decode."""
        if not hasattr(self, "model"):
            self.setup()
        embeddings, errors = self._image_embeddings(batch)
        scores = self.head(np.nan_to_num(embeddings)) if len(embeddings) else np.zeros(0, np.float32)
        batch = merge_scores(batch, "aesthetic", [None if error else float(s) for s, error in zip(scores, errors)])
        return with_drops(batch, *decode_drops(errors))

    def select(self, batch: pa.Table) -> pa.Table:
        """Drop scores.aesthetic below min_score (aesthetic_low) or above max_score (aesthetic_high)."""
        drops = range_drops(score_values(batch, "aesthetic"), "aesthetic", self.params.min_score,
                            self.params.max_score, ("aesthetic_low", "aesthetic_high"), digits=3)
        return with_drops(batch, *drops)

    def metrics(self) -> list:
        """scores.aesthetic."""
        from curate.metrics import Metric

        return [Metric("aesthetic", "scores.aesthetic", "the aesthetic head's score of the CLIP image embedding")]

    def thresholds(self) -> list:
        """min_score and max_score on aesthetic."""
        from curate.metrics import limits

        return limits(self.params, {"min_score": ("aesthetic", "min"), "max_score": ("aesthetic", "max")})

    def _image_embeddings(self, batch: pa.Table) -> tuple[np.ndarray, list[str | None]]:
        stored = batch.column("embeddings").to_pylist()
        reusable = [e is not None and e.get("model") == self.model_name and e.get("image") for e in stored]
        embeddings = np.full((batch.num_rows, self.model.embed_dim), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * batch.num_rows
        for row, (ok, entry) in enumerate(zip(reusable, stored)):
            if ok:
                vector = np.asarray(entry["image"], dtype=np.float32)
                embeddings[row] = vector / max(float(np.linalg.norm(vector)), 1e-12)  # renormalise after float16
        missing = [row for row, ok in enumerate(reusable) if not ok]
        if missing:
            images = batch.column("images").to_pylist()
            data = [images[row][0]["bytes"] if images[row] else None for row in missing]
            computed, computed_errors = embed_images(self.model, data, self.pool, self.params.decode_threads)
            embeddings[missing] = computed
            for row, error in zip(missing, computed_errors):
                errors[row] = error
        return embeddings, errors
