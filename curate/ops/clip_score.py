"""CLIP score: cosine similarity of the image and caption embeddings (LAION / DataComp convention).

The score is the dot product of the L2-normalised embeddings, computed in float32
(not multiplied by 100). Thresholds belong to a checkpoint: LAION-5B kept English
pairs with OpenAI ViT-B/32 >= 0.28; another model needs its own threshold (the
presets in filters/ pin model, tag and threshold together).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate import schema
from curate.models.clip import ClipSpec, ModelUnavailable, check_clip_available, clip_scores, load_clip
from curate.ops.image_embedding import embed_images, embed_texts
from curate.stage import Params, Resources, Stage, with_drops


class ClipScoreParams(Params):
    """Model, thresholds and throughput settings of the CLIP score stage."""

    model: ClipSpec = ClipSpec()
    min_score: float | None = None  # drop below (reason clip_score_low)
    max_score: float | None = None  # drop above (reason clip_score_high): near-copies of the caption as text
    caption: str = "alt"  # which named caption is scored (falls back to the first caption)
    keep_embeddings: bool = True  # store float16 embeddings in the work area (dedup reuses them)
    torch_threads: int | None = Field(None, ge=1)  # default: the CPUs Ray gave the worker
    decode_threads: int = Field(2, ge=1)


def model_id(spec: ClipSpec, info: dict) -> str:
    """A short identity for embeddings: model name and pretrained tag or weights hash."""
    tag = spec.pretrained or (info.get("sha256") or "")[:12] or "default"
    return f"{spec.model}/{tag}"


def set_struct_column(batch: pa.Table, name: str, values: list) -> pa.Table:
    """Replace column `name` with `values` typed as in the sample schema."""
    field = schema.SAMPLE_SCHEMA.field(name)
    return batch.set_column(batch.schema.get_field_index(name), field, pa.array(values, field.type))


def local_path(location: str | None, recipe_dir: str) -> str | None:
    """A relative file path from a recipe, made absolute against the recipe's folder (URLs unchanged)."""
    if not location or "://" in location or os.path.isabs(os.path.expanduser(location)):
        return os.path.expanduser(location) if location else location
    return os.path.abspath(os.path.join(recipe_dir, location))


def torch_threads(requested: int | None) -> int:
    """Threads for torch: as asked, else what Ray's CPU share says (OMP_NUM_THREADS), at least 1."""
    if requested:
        return requested
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1)


class ClipScoreStage(Stage):
    """Scores every sample's first image against its caption; optionally filters on the score."""

    name = "clip_score"
    Params = ClipScoreParams
    phase = "model"
    resources = Resources(cpus=1.0, gpus=1.0)  # the GPU is asked for only when the cluster has one

    def __init__(self, params: ClipScoreParams, context=None):
        super().__init__(params, context)
        spec = params.model
        self.params = params.model_copy(update={"model": spec.model_copy(
            update={"checkpoint": local_path(spec.checkpoint, self.context.recipe_dir)})})

    def preflight(self) -> None:
        """Refuse, before any work, weights that are not available locally or do not match the pin."""
        try:
            self._info = check_clip_available(self.params.model)
        except ModelUnavailable as error:
            error.path = error.path or f"stages.{self.name}.model"
            raise

    def model_info(self) -> list[dict]:
        """What the manifest records about the model."""
        if hasattr(self, "model"):  # loaded: device, precision and preprocessing are known too
            return [{"stage": self.name, "role": "clip", **self.model.describe()}]
        info = getattr(self, "_info", None) or check_clip_available(self.params.model)
        return [{"stage": self.name, "role": "clip", **info}]

    def setup(self) -> None:
        """Load the model once per worker and size torch's threads."""
        import torch

        torch.set_num_threads(torch_threads(self.params.torch_threads))
        self.model = load_clip(self.params.model, device="auto")
        self.pool = ThreadPoolExecutor(self.params.decode_threads, thread_name_prefix="clip-decode")
        self.model_name = model_id(self.params.model, self.model.describe())

    def teardown(self) -> None:
        """Stop the decode threads."""
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown()

    def process(self, batch: pa.Table) -> pa.Table:
        """Fill scores.clip_score (and embeddings); drop unreadable images and out-of-range scores."""
        if not hasattr(self, "model"):
            self.setup()
        images = [row[0]["bytes"] if row else None for row in batch.column("images").to_pylist()]
        texts = [schema.caption_text(c, prefer=(self.params.caption,)) or "" for c in
                 batch.column("captions").to_pylist()]
        image_emb, errors = embed_images(self.model, images, self.pool, self.params.model.batch_size)
        text_emb = embed_texts(self.model, texts, self.params.model.batch_size)
        scores = clip_scores(np.nan_to_num(image_emb), text_emb)
        batch = self._write_scores(batch, scores, errors)
        if self.params.keep_embeddings:
            batch = self._write_embeddings(batch, image_emb, text_emb, errors)
        return self._filter(batch, scores, errors)

    def _write_scores(self, batch: pa.Table, scores: np.ndarray, errors: list[str | None]) -> pa.Table:
        previous = batch.column("scores").to_pylist()
        merged = [{**(old or {}), "clip_score": None if error else float(score)}
                  for old, score, error in zip(previous, scores, errors)]
        return set_struct_column(batch, "scores", merged)

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
