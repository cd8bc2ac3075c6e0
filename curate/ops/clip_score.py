"""CLIP score: cosine similarity of the image and caption embeddings (LAION / DataComp convention).

The score is the dot product of the L2-normalised embeddings, computed in float32
(not multiplied by 100). Thresholds belong to a checkpoint: LAION-5B kept English
pairs with OpenAI ViT-B/32 >= 0.28; another model needs its own threshold (the
presets in filters/ pin model, tag and threshold together).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate import schema
from curate.models.clip import ClipSpec, clip_scores
from curate.ops.clip_stage import (
    ClipModelStage,
    decode_drops,
    merge_scores,
    range_drops,
    score_values,
    set_struct_column,
)
from curate.ops.image_embedding import collect_embeddings, embed_texts, submit_decodes
from curate.stage import Params, with_drops


class ClipScoreParams(Params):
    """Model, thresholds and throughput settings of the CLIP score stage."""

    model: ClipSpec = ClipSpec()
    min_score: float | None = None  # drop below (reason clip_score_low)
    max_score: float | None = None  # drop above (reason clip_score_high): near-copies of the caption as text
    caption: str = "alt"  # which named caption is scored (falls back to the first caption)
    keep_embeddings: bool = True  # store float16 embeddings in the work area (dedup reuses them)
    torch_threads: int | None = Field(None, ge=1)  # default: the CPUs Ray gave the worker
    decode_threads: int = Field(2, ge=1)


class ClipScoreStage(ClipModelStage):
    """Scores every sample's first image against its caption; optionally filters on the score.

    `annotate` fills scores.clip_score and (with keep_embeddings) embeddings, dropping only images
    CLIP cannot decode; `select` applies min_score / max_score to scores.clip_score.
    """

    name = "clip_score"
    Params = ClipScoreParams
    clip_field = "model"
    version = 1
    reads = frozenset({"images", "captions"})
    provides = frozenset({"scores", "embeddings"})
    annotation_params = ClipModelStage.annotation_params | {"caption", "keep_embeddings"}
    selection_params = frozenset({"min_score", "max_score"})

    def annotate(self, batch: pa.Table) -> pa.Table:
        """Fill scores.clip_score (and embeddings); drop images CLIP cannot decode."""
        if not hasattr(self, "model"):
            self.setup()
        images = [row[0]["bytes"] if row else None for row in batch.column("images").to_pylist()]
        texts = [schema.caption_text(c, prefer=(self.params.caption,)) or "" for c in
                 batch.column("captions").to_pylist()]
        pending = submit_decodes(self.model, images, self.pool, self.params.decode_threads)
        text_emb = embed_texts(self.model, texts, self.params.model.batch_size)  # while the images decode
        image_emb, errors = collect_embeddings(self.model, pending, len(images))
        scores = clip_scores(np.nan_to_num(image_emb), text_emb)
        batch = self._write_scores(batch, scores, errors)
        if self.params.keep_embeddings:
            batch = self._write_embeddings(batch, image_emb, text_emb, errors)
        return with_drops(batch, *decode_drops(errors))

    def select(self, batch: pa.Table) -> pa.Table:
        """Drop scores.clip_score below min_score (clip_score_low) or above max_score (clip_score_high)."""
        drops = range_drops(score_values(batch, "clip_score"), "clip_score", self.params.min_score,
                            self.params.max_score, ("clip_score_low", "clip_score_high"), digits=4)
        return with_drops(batch, *drops)

    def metrics(self) -> list:
        """scores.clip_score."""
        from curate.metrics import Metric

        return [Metric("clip_score", "scores.clip_score", "cosine of the image and caption embeddings")]

    def thresholds(self) -> list:
        """min_score and max_score on clip_score."""
        from curate.metrics import limits

        return limits(self.params, {"min_score": ("clip_score", "min"), "max_score": ("clip_score", "max")})

    def _write_scores(self, batch: pa.Table, scores: np.ndarray, errors: list[str | None]) -> pa.Table:
        return merge_scores(batch, "clip_score", [None if error else float(s) for s, error in zip(scores, errors)])

    def _write_embeddings(self, batch: pa.Table, image_emb: np.ndarray, text_emb: np.ndarray,
                          errors: list[str | None]) -> pa.Table:
        image_half, text_half = image_emb.astype(np.float16), text_emb.astype(np.float16)
        values = [None if error else {"model": self.model_name, "image": image_half[i].tolist(),
                                      "text": text_half[i].tolist()}
                  for i, error in enumerate(errors)]
        return set_struct_column(batch, "embeddings", values)
