"""Aesthetic score: a head (LAION improved predictor v2, v1 linear, or the project's tiny head)
on the L2-normalised CLIP image embedding.

When an earlier stage stored the embedding of the same CLIP model (the `embeddings`
column, written by clip_score), it is reused instead of decoding the image again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.models.aesthetic import AestheticSpec, check_aesthetic_available, load_aesthetic
from curate.models.clip import ClipSpec, ModelUnavailable, check_clip_available, load_clip
from curate.ops.clip_score import local_path, model_id, set_struct_column, torch_threads
from curate.ops.image_embedding import embed_images
from curate.stage import Params, Resources, Stage, with_drops


class AestheticParams(Params):
    """CLIP model and head of the aesthetic stage, and its thresholds."""

    clip: ClipSpec = ClipSpec()
    head: AestheticSpec = AestheticSpec()
    min_score: float | None = None  # drop below (reason aesthetic_low)
    max_score: float | None = None  # drop above (reason aesthetic_high)
    torch_threads: int | None = Field(None, ge=1)
    decode_threads: int = Field(2, ge=1)


class AestheticStage(Stage):
    """Fills scores.aesthetic; optionally filters on it."""

    name = "aesthetic"
    Params = AestheticParams
    phase = "model"
    resources = Resources(cpus=1.0, gpus=1.0)

    def __init__(self, params: AestheticParams, context=None):
        super().__init__(params, context)
        folder = self.context.recipe_dir
        clip = params.clip.model_copy(update={"checkpoint": local_path(params.clip.checkpoint, folder)})
        head = params.head.model_copy(update={"path": local_path(params.head.path, folder)})
        self.params = params.model_copy(update={"clip": clip, "head": head})

    def preflight(self) -> None:
        """Refuse missing or mismatched weights before any work."""
        try:
            self._clip_info = check_clip_available(self.params.clip)
        except ModelUnavailable as error:
            error.path = error.path or f"stages.{self.name}.clip"
            raise
        try:
            self._head_info = check_aesthetic_available(self.params.head)
        except ModelUnavailable as error:
            error.path = error.path or f"stages.{self.name}.head"
            raise

    def model_info(self) -> list[dict]:
        """What the manifest records about the CLIP model and the head."""
        if hasattr(self, "model"):  # loaded: device, precision and preprocessing are known too
            clip = self.model.describe()
        else:
            clip = getattr(self, "_clip_info", None) or check_clip_available(self.params.clip)
        head = getattr(self, "_head_info", None) or check_aesthetic_available(self.params.head)
        return [{"stage": self.name, "role": "clip", **clip}, {"stage": self.name, "role": "aesthetic_head", **head}]

    def setup(self) -> None:
        """Load CLIP and the head once per worker (the head's input size is checked here)."""
        import torch

        torch.set_num_threads(torch_threads(self.params.torch_threads))
        self.model = load_clip(self.params.clip, device="auto")
        self.head = load_aesthetic(self.params.head, self.model.embed_dim)
        self.model_name = model_id(self.params.clip, self.model.describe())
        self.pool = ThreadPoolExecutor(self.params.decode_threads, thread_name_prefix="aesthetic-decode")

    def teardown(self) -> None:
        """Stop the decode threads."""
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown()

    def process(self, batch: pa.Table) -> pa.Table:
        """Fill scores.aesthetic; drop unreadable images and out-of-range scores."""
        if not hasattr(self, "model"):
            self.setup()
        embeddings, errors = self._image_embeddings(batch)
        scores = self.head(np.nan_to_num(embeddings)) if len(embeddings) else np.zeros(0, np.float32)
        previous = batch.column("scores").to_pylist()
        merged = [{**(old or {}), "aesthetic": None if error else float(score)}
                  for old, score, error in zip(previous, scores, errors)]
        batch = set_struct_column(batch, "scores", merged)
        return with_drops(batch, *self._verdicts(scores, errors))

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
            computed, computed_errors = embed_images(self.model, data, self.pool, self.params.clip.batch_size)
            embeddings[missing] = computed
            for row, error in zip(missing, computed_errors):
                errors[row] = error
        return embeddings, errors

    def _verdicts(self, scores: np.ndarray, errors: list[str | None]) -> tuple[list, list]:
        low, high = self.params.min_score, self.params.max_score
        reasons, details = [], []
        for score, error in zip(scores, errors):
            reason = detail = None
            if error:
                reason, detail = "corrupt", f"cannot decode for CLIP: {error}"
            elif low is not None and score < low:
                reason, detail = "aesthetic_low", f"aesthetic {score:.3f} < {low}"
            elif high is not None and score > high:
                reason, detail = "aesthetic_high", f"aesthetic {score:.3f} > {high}"
            reasons.append(reason)
            details.append(detail)
        return reasons, details
