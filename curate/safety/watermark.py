"""Watermark score: a head on the CLIP image embedding of image 0 (curate.models.watermark).

When an earlier stage stored the embedding of the same CLIP model (the `embeddings`
column written by clip_score, kept in the work area), it is reused and CLIP is never
loaded; otherwise the image is decoded and embedded here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from curate.models.clip import ClipSpec, ModelUnavailable, check_clip_available, load_clip
from curate.models.watermark import WatermarkSpec, check_watermark_available, load_watermark
from curate.ops.clip_stage import (
    ClipHeadStage,
    decode_drops,
    merge_scores,
    model_id,
    range_drops,
    score_values,
    torch_threads,
)
from curate.ops.image_embedding import embed_images
from curate.stage import Params, with_drops

WATERMARK = "watermark"


class WatermarkParams(Params):
    """CLIP model and head of the watermark stage, and its threshold."""

    clip: ClipSpec = ClipSpec()
    head: WatermarkSpec = WatermarkSpec()
    max_score: float | None = Field(None, ge=0.0, le=1.0)  # drop above (reason watermark)
    torch_threads: int | None = Field(None, ge=1)
    decode_threads: int = Field(2, ge=1)


class WatermarkStage(ClipHeadStage):
    """Fills scores.watermark, the probability that image 0 carries a watermark (`annotate`); optionally
    filters on it (`select`)."""

    name = "watermark"
    Params = WatermarkParams
    phase = "safety"
    head_role = "watermark_head"
    check_head = staticmethod(check_watermark_available)
    version = 1
    reads = frozenset({"images", "embeddings"})
    provides = frozenset({"scores"})
    reads_images = True  # the image is decoded when no embedding of the same CLIP is stored
    annotation_params = ClipHeadStage.annotation_params
    selection_params = frozenset({"max_score"})

    def setup(self) -> None:
        """Name the CLIP model whose stored embeddings can be reused; CLIP itself loads only when needed."""
        self.model_name = model_id(self.clip_spec, check_clip_available(self.clip_spec))
        self.head = None

    def _load_model(self) -> None:
        torch.set_num_threads(torch_threads(self.params.torch_threads))
        self.model = load_clip(self.clip_spec, device="auto")
        self.pool = ThreadPoolExecutor(self.params.decode_threads, thread_name_prefix=f"{self.name}-decode")

    def annotate(self, batch: pa.Table) -> pa.Table:
        """Fill scores.watermark; drop images CLIP cannot decode."""
        if not hasattr(self, "model_name"):
            self.setup()
        embeddings, errors = self._image_embeddings(batch)
        if self.head is None and len(embeddings):
            self.head = load_watermark(self.params.head, embeddings.shape[1])
        scores = self.head(np.nan_to_num(embeddings)) if len(embeddings) else np.zeros(0, np.float32)
        batch = merge_scores(batch, "watermark", [None if error else float(s) for s, error in zip(scores, errors)])
        return with_drops(batch, *decode_drops(errors))

    def select(self, batch: pa.Table) -> pa.Table:
        """Drop scores.watermark above max_score (reason watermark)."""
        drops = range_drops(score_values(batch, "watermark"), "watermark", None, self.params.max_score,
                            (WATERMARK, WATERMARK), digits=3)
        return with_drops(batch, *drops)

    def metrics(self) -> list:
        """scores.watermark."""
        from curate.metrics import Metric

        return [Metric(WATERMARK, f"scores.{WATERMARK}", "the watermark head's probability for image 0")]

    def thresholds(self) -> list:
        """max_score on watermark."""
        from curate.metrics import limits

        return limits(self.params, {"max_score": (WATERMARK, "max")})

    def _image_embeddings(self, batch: pa.Table) -> tuple[np.ndarray, list[str | None]]:
        """Stored embeddings of this CLIP model where present, the others computed; (rows x d, errors)."""
        stored = batch.column("embeddings").to_pylist()
        vectors: dict[int, np.ndarray] = {}
        for row, entry in enumerate(stored):
            if entry is not None and entry.get("model") == self.model_name and entry.get("image"):
                vector = np.asarray(entry["image"], dtype=np.float32)
                vectors[row] = vector / max(float(np.linalg.norm(vector)), 1e-12)  # renormalise after float16
        errors: list[str | None] = [None] * batch.num_rows
        missing = [row for row in range(batch.num_rows) if row not in vectors]
        if missing:
            if not hasattr(self, "model"):
                self._load_model()
            images = batch.column("images").to_pylist()
            data = [images[row][0]["bytes"] if images[row] else None for row in missing]
            computed, computed_errors = embed_images(self.model, data, self.pool, self.params.decode_threads)
            for row, vector, error in zip(missing, computed, computed_errors):
                vectors[row], errors[row] = vector, error
        if not vectors:
            return np.zeros((0, 0), dtype=np.float32), errors
        dim = max(len(v) for v in vectors.values())
        embeddings = np.full((batch.num_rows, dim), np.nan, dtype=np.float32)
        for row, vector in vectors.items():
            if len(vector) != dim:
                raise ModelUnavailable(f"stored {len(vector)}-d and {dim}-d embeddings of {self.model_name} disagree")
            embeddings[row] = vector
        return embeddings, errors
