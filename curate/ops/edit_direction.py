"""CLIP direction consistency of image edits: does the image change the way the text says?

For each turn of an `edit` sample, the score is the cosine between the image change
E_img(output) - E_img(input) and a text change (InstructPix2Pix's "CLIP directional
similarity"):

  captions     E_txt(target caption) - E_txt(source caption), when the sample has both
               captions (`source`, `target`) and one turn: the definition InstructPix2Pix
               filtered its data with
  instruction  E_txt(instruction) itself, for datasets without captions (MagicBrush,
               OmniEdit) and for chains; a weaker signal, since an instruction names a
               change rather than describing an image

`text: auto` uses captions where the sample has them and the instruction otherwise. A
chain scores as its weakest turn: `scores.clip_direction` is the minimum over the
turns, each turn's value goes to `meta.edit.turns[t].clip_direction`, and
`min_score` drops samples below it (`edit_inconsistent`). An output identical to its
input has no direction and scores 0. Samples of other kinds pass unchanged.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.edit_sample import EDIT_KIND, Turn, read_turns, write_turns
from curate.models.clip import ClipSpec
from curate.ops.clip_stage import ClipModelStage, merge_scores, score_values, set_struct_column
from curate.ops.image_embedding import embed_images, embed_texts
from curate.stage import Params, with_drops

EDIT_INCONSISTENT = "edit_inconsistent"
EDIT_MISSING_IMAGE = "edit_missing_image"
CORRUPT = "corrupt"
SCORE = "clip_direction"
TINY_NORM = 1e-6  # an embedding change shorter than this has no direction


class EditDirectionParams(Params):
    """Model, text source, threshold and throughput settings of the direction score."""

    model: ClipSpec = ClipSpec()
    text: Literal["auto", "captions", "instruction"] = "auto"  # captions: samples without both captions get no score
    min_score: float | None = Field(None, ge=-1.0, le=1.0)  # drop below (edit_inconsistent)
    torch_threads: int | None = Field(None, ge=1)
    decode_threads: int = Field(2, ge=1)


def direction_cosine(image_change: np.ndarray, text_change: np.ndarray) -> float:
    """Cosine of two change vectors; 0 when either has (almost) no length."""
    image_norm, text_norm = float(np.linalg.norm(image_change)), float(np.linalg.norm(text_change))
    if image_norm < TINY_NORM or text_norm < TINY_NORM:
        return 0.0
    return float(np.dot(image_change, text_change) / (image_norm * text_norm))


class EditDirection(ClipModelStage):
    """Scores every edit turn's image change against its text change (`annotate`); optionally filters on
    the score (`select`)."""

    name = "edit_direction"
    Params = EditDirectionParams
    clip_field = "model"
    version = 1
    reads = frozenset({"kind", "images", "segments", "captions", "meta"})
    provides = frozenset({"scores", "meta"})
    annotation_params = ClipModelStage.annotation_params | {"text"}
    selection_params = frozenset({"min_score"})

    def annotate(self, batch: pa.Table) -> pa.Table:
        """Fill scores.clip_direction and meta.edit.turns[].clip_direction; drop missing or undecodable images."""
        if not hasattr(self, "model"):
            self.setup()
        rows = batch.select(["kind", "images", "segments", "captions", "meta"]).to_pylist()
        plans = [self._plan(row) for row in rows]
        flat_images = [data for plan in plans for data in plan.images]
        flat_texts = [text for plan in plans for text in plan.texts]
        image_emb, errors = embed_images(self.model, flat_images, self.pool, self.params.decode_threads)
        text_emb = embed_texts(self.model, flat_texts, self.params.model.batch_size)
        scores, metas, reasons, details = [], [], [], []
        image_at = text_at = 0
        for row, plan in zip(rows, plans):
            result = plan.score(image_emb[image_at:image_at + len(plan.images)],
                                errors[image_at:image_at + len(plan.images)],
                                text_emb[text_at:text_at + len(plan.texts)])
            image_at += len(plan.images)
            text_at += len(plan.texts)
            scores.append(result.score)
            metas.append(write_turns(row["meta"], plan.turns) if result.score is not None else row["meta"])
            reasons.append(result.reason)
            details.append(result.detail)
        batch = merge_scores(batch, SCORE, scores)
        batch = set_struct_column(batch, "meta", metas)
        return with_drops(batch, reasons, details)

    def select(self, batch: pa.Table) -> pa.Table:
        """Drop scores.clip_direction below min_score (edit_inconsistent), naming a chain's weakest turn."""
        limit = self.params.min_score
        reasons: list[str | None] = []
        details: list[str | None] = []
        segments, metas = batch.column("segments").to_pylist(), batch.column("meta").to_pylist()
        for score, row_segments, meta in zip(score_values(batch, SCORE), segments, metas):
            if limit is None or score is None or np.float32(score) >= limit:  # as stored: float32
                reasons.append(None)
                details.append(None)
                continue
            values = [turn.extra.get("clip_direction") for turn in read_turns(row_segments, meta)]
            where = f"turn {weakest_turn(values) + 1}: " if len(values) > 1 and None not in values else ""
            reasons.append(EDIT_INCONSISTENT)
            details.append(f"{where}clip_direction {score:.4f} < {limit}")
        return with_drops(batch, reasons, details)

    def metrics(self) -> list:
        """scores.clip_direction (a chain's weakest turn)."""
        from curate.metrics import Metric

        return [Metric(SCORE, f"scores.{SCORE}", "cosine of the image change and the text change, weakest turn")]

    def thresholds(self) -> list:
        """min_score on clip_direction."""
        from curate.metrics import limits

        return limits(self.params, {"min_score": (SCORE, "min")})

    def _plan(self, row: dict[str, Any]) -> "_Plan":
        if row["kind"] != EDIT_KIND:
            return _Plan([], [], [], [])
        turns = read_turns(row["segments"], row["meta"])
        captions = {c["name"]: c["text"] for c in row["captions"] or [] if c and c.get("text")}
        use_captions = (self.params.text != "instruction" and len(turns) == 1
                        and "source" in captions and "target" in captions)
        if self.params.text == "captions" and not use_captions:
            return _Plan([], [], [], [])  # not scored
        images = row["images"] or []
        needed = list(dict.fromkeys(index for turn in turns for index in (turn.input, turn.output)))
        data = [_bytes_at(images, index) for index in needed]
        texts = [captions["source"], captions["target"]] if use_captions else [t.instruction or "" for t in turns]
        return _Plan(turns, needed, data, texts, use_captions)


class _Result(NamedTuple):
    """A sample's score (None: not scored) and drop reason and detail (None: kept)."""

    score: float | None = None
    reason: str | None = None
    detail: str | None = None


class _Plan:
    """The images and texts one sample needs, and how its turns are scored from their embeddings."""

    def __init__(self, turns: list[Turn], indices: list[Any], images: list[bytes | None], texts: list[str],
                 use_captions: bool = False):
        self.turns, self.indices, self.images, self.texts = turns, indices, images, texts
        self.use_captions = use_captions

    def score(self, image_emb: np.ndarray, errors: list[str | None], text_emb: np.ndarray) -> _Result:
        if not self.turns:
            return _Result()
        position = {index: i for i, index in enumerate(self.indices)}
        for index, data, error in zip(self.indices, self.images, errors):
            if data is None:
                return _Result(None, EDIT_MISSING_IMAGE, f"image {index!r} has no bytes")
            if error:
                return _Result(None, CORRUPT, f"cannot decode image {index} for CLIP: {error}")
        values = []
        for number, turn in enumerate(self.turns):
            image_change = image_emb[position[turn.output]] - image_emb[position[turn.input]]
            text_change = text_emb[1] - text_emb[0] if self.use_captions else text_emb[number]
            value = direction_cosine(image_change, text_change)
            turn.extra["clip_direction"] = round(value, 4)
            values.append(value)
        return _Result(min(values))


def weakest_turn(values: list[float]) -> int:
    """The index of the first turn with the lowest value."""
    return values.index(min(values))


def _bytes_at(images: list[Any], index: Any) -> bytes | None:
    if not isinstance(index, int) or not 0 <= index < len(images) or images[index] is None:
        return None
    return images[index].get("bytes")
