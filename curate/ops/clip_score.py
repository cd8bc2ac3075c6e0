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
from curate.ops.clip_stage import ClipModelStage, merge_scores, set_struct_column
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
    """Scores every sample's first image against its caption; optionally filters on the score."""

    name = "clip_score"
    Params = ClipScoreParams
    clip_field = "model"

    def process(self, batch: pa.Table) -> pa.Table:
        """Fill scores.clip_score (and embeddings); drop unreadable images and out-of-range scores."""
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
        return self._filter(batch, scores, errors)

    def _write_scores(self, batch: pa.Table, scores: np.ndarray, errors: list[str | None]) -> pa.Table:
        return merge_scores(batch, "clip_score", [None if error else float(s) for s, error in zip(scores, errors)])

    def _write_embeddings(self, batch: pa.Table, image_emb: np.ndarray, text_emb: np.ndarray,
                          errors: list[str | None]) -> pa.Table:
        image_half, text_half = image_emb.astype(np.float16), text_emb.astype(np.float16)
        values = [None if error else {"model": self.model_name, "image": image_half[i].tolist(),
                                      "text": text_half[i].tolist()}
                  for i, error in enumerate(errors)]
        return set_struct_column(batch, "embeddings", values)

    def _filter(self, batch: pa.Table, scores: np.ndarray, errors: list[str | None]) -> pa.Table:
        low, high = self.params.min_score, self.params.max_score
        reasons, details = [], []
        for score, error in zip(scores, errors):
            if error:
                reasons.append("corrupt")
                details.append(f"cannot decode for CLIP: {error}")
            elif low is not None and score < low:
                reasons.append("clip_score_low")
                details.append(f"clip_score {score:.4f} < {low}")
            elif high is not None and score > high:
                reasons.append("clip_score_high")
                details.append(f"clip_score {score:.4f} > {high}")
            else:
                reasons.append(None)
                details.append(None)
        return with_drops(batch, reasons, details)
