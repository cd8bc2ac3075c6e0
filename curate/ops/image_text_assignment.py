"""CLIP similarity between each image of a document and its sentences, and an assignment of
images to sentences (MMC4's method).

For every interleaved document: its text segments are split into sentences (or taken whole
with `split_sentences: false`), every image and sentence is embedded with the CLIP model, and
the image x sentence cosine similarities form a matrix. Images are assigned to sentences by a
bipartite linear assignment that maximises the summed similarity with each sentence taking at
most one image (scipy.optimize.linear_sum_assignment, the Hungarian method, as MMC4 did). When
a document has more images than sentences, the images left over go to their most similar
sentence. Images whose best similarity to any sentence is below `min_image_similarity` are
removed from the document first (meta.removed_images, reason `low_image_text_similarity`).

Recorded in meta.image_text: the model, the sentences, the assignment ([{image, sentence,
similarity}] with image = index in `images`), and with `keep_matrix` the similarity matrix
(rounded to 4 decimals). scores.clip_score becomes the mean similarity of the assigned pairs.
With `reorder: true` the segments are rebuilt in sentence order with each image right after
the sentence it was assigned to (sentences of one paragraph joined by a space, paragraphs kept
apart), MMC4's layout. A document whose images cannot be decoded keeps them unassigned.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from pydantic import Field
from scipy.optimize import linear_sum_assignment

from curate.extract.document import KIND, dump_meta, load_meta, record_removed, remove_images, removed_counter
from curate.extract.text import split_sentences
from curate.models.clip import ClipSpec
from curate.ops.clip_stage import ClipModelStage, merge_scores, set_struct_column
from curate.ops.image_embedding import embed_images, embed_texts
from curate.stage import Params

LOW_SIMILARITY = "low_image_text_similarity"


class ImageTextAssignmentParams(Params):
    """Model, sentence handling and what to record."""

    model: ClipSpec = ClipSpec()
    split_sentences: bool = True  # false: every text segment is one sentence (MMC4's text_list already is)
    min_sentence_chars: int = Field(2, ge=1)
    min_image_similarity: float | None = None  # remove images less similar than this to every sentence
    reorder: bool = False  # place every image right after its assigned sentence
    keep_matrix: bool = True  # store the image x sentence similarity matrix in meta.image_text
    torch_threads: int | None = Field(None, ge=1)
    decode_threads: int = Field(2, ge=1)


def assign(similarity: np.ndarray) -> list[int]:
    """The sentence of each image (rows): a maximum-similarity one-to-one assignment, the rest to their best."""
    images, sentences = similarity.shape
    chosen = [-1] * images
    if images == 0 or sentences == 0:
        return chosen
    rows, columns = linear_sum_assignment(similarity, maximize=True)
    for row, column in zip(rows.tolist(), columns.tolist()):
        chosen[row] = column
    for row in range(images):
        if chosen[row] < 0:
            chosen[row] = int(np.argmax(similarity[row]))
    return chosen


class ImageTextAssignment(ClipModelStage):
    """Fills meta.image_text (similarities, assignment) and scores.clip_score of interleaved documents.

    One step (`process` only): `min_image_similarity` removes images from a document before the
    assignment is made, which changes the document rather than dropping it, so it cannot be a
    `select` criterion; every parameter is an annotation parameter.
    """

    name = "image_text_assignment"
    Params = ImageTextAssignmentParams
    params: ImageTextAssignmentParams
    clip_field = "model"
    version = 1
    reads = frozenset({"kind", "images", "image_meta", "segments", "meta", "scores"})
    provides = frozenset({"images", "image_meta", "segments", "meta", "scores"})
    annotation_params = ClipModelStage.annotation_params | {
        "split_sentences", "min_sentence_chars", "min_image_similarity", "reorder", "keep_matrix"}
    selection_params = frozenset()

    def process(self, batch: pa.Table) -> pa.Table:
        """Embed every document's images and sentences, assign, record; rows of other kinds pass unchanged."""
        if not hasattr(self, "model"):
            self.setup()
        kinds = batch.column("kind").to_pylist()
        rows = [i for i, kind in enumerate(kinds) if kind == KIND]
        if not rows:
            return batch
        images = batch.column("images").to_pylist()
        image_meta = batch.column("image_meta").to_pylist()
        segments = batch.column("segments").to_pylist()
        meta = batch.column("meta").to_pylist()
        sentences = {row: self._sentences(segments[row] or []) for row in rows}
        image_emb, errors, text_emb = self._embed(rows, images, sentences)
        scores = [None] * batch.num_rows
        for row in rows:
            similarity = image_emb[row] @ text_emb[row].T if len(text_emb[row]) else np.zeros((len(image_emb[row]), 0))
            images[row], image_meta[row], segments[row], meta[row], scores[row] = self._document(
                images[row] or [], image_meta[row] or [], segments[row] or [], meta[row], sentences[row],
                similarity, errors[row])
        for name, values in (("images", images), ("image_meta", image_meta), ("segments", segments)):
            batch = set_struct_column(batch, name, values)
        batch = batch.set_column(batch.schema.get_field_index("meta"), "meta", pa.array(meta, pa.string()))
        previous = [s.get("clip_score") if s else None for s in batch.column("scores").to_pylist()]
        return merge_scores(batch, "clip_score", [s if i in sentences else previous[i] for i, s in enumerate(scores)])

    def _sentences(self, segments: list[dict]) -> list[tuple[int, str]]:
        """(segment position, sentence) pairs in reading order."""
        found = []
        for position, segment in enumerate(segments):
            text = segment.get("text")
            if text is None:
                continue
            if self.params.split_sentences:
                found += [(position, s) for s in split_sentences(text, self.params.min_sentence_chars)]
            elif len(text.strip()) >= self.params.min_sentence_chars:
                found.append((position, text.strip()))
        return found

    def _embed(self, rows: list[int], images: list, sentences: dict[int, list[tuple[int, str]]]):
        """Per row: image embeddings (n x d, NaN where undecodable), decode errors, sentence embeddings."""
        flat_images = [image.get("bytes") if image else None for row in rows for image in images[row] or []]
        flat_texts = [text for row in rows for _, text in sentences[row]]
        image_emb, image_errors = embed_images(self.model, flat_images, self.pool, self.params.decode_threads)
        text_emb = embed_texts(self.model, flat_texts, self.params.model.batch_size)
        per_image, per_error, per_text = {}, {}, {}
        image_at = text_at = 0
        for row in rows:
            count = len(images[row] or [])
            per_image[row] = np.nan_to_num(image_emb[image_at:image_at + count])
            per_error[row] = image_errors[image_at:image_at + count]
            image_at += count
            per_text[row] = text_emb[text_at:text_at + len(sentences[row])]
            text_at += len(sentences[row])
        return per_image, per_error, per_text

    def _document(self, images, image_meta, segments, meta, sentences, similarity, errors):
        """Remove dissimilar images, assign, record and optionally reorder one document."""
        usable = [i for i, error in enumerate(errors) if error is None]
        low = []
        if self.params.min_image_similarity is not None and similarity.shape[1]:
            best = similarity.max(axis=1)
            low = [i for i in usable if best[i] < self.params.min_image_similarity]
        if low:
            removed = [{"index": i, "url": (image_meta[i] or {}).get("url"), "stage": self.name,
                        "reason": LOW_SIMILARITY,
                        "detail": f"best similarity {best[i]:.4f} < {self.params.min_image_similarity:g}"}
                       for i in low]
            images, image_meta, segments = remove_images(images, image_meta, segments, low)
            meta = record_removed(meta, removed)
            self.count(removed_counter(LOW_SIMILARITY), len(removed))  # the funnel's per-image counts
            keep = [i for i in range(similarity.shape[0]) if i not in set(low)]
            similarity, errors = similarity[keep], [errors[i] for i in keep]
            usable = [i for i, error in enumerate(errors) if error is None]
        chosen = assign(similarity[usable]) if usable else []
        assignment = [{"image": image, "sentence": sentence, "similarity": round(float(similarity[image, sentence]), 4)}
                      for image, sentence in zip(usable, chosen) if sentence >= 0]
        record = {"model": self.model_name, "sentences": [text for _, text in sentences], "assignment": assignment}
        if self.params.keep_matrix:
            record["similarity"] = np.round(similarity, 4).tolist()
        undecodable = [{"image": i, "error": errors[i]} for i in range(len(errors)) if errors[i] is not None]
        if undecodable:
            record["undecodable"] = undecodable
        data = load_meta(meta)
        data["image_text"] = record
        score = float(np.mean([a["similarity"] for a in assignment])) if assignment else None
        if self.params.reorder and assignment:
            segments = _reordered(segments, sentences, assignment, len(images))
        return images, image_meta, segments, dump_meta(data), (None if score is None or math.isnan(score) else score)


def _reordered(segments: list[dict], sentences: list[tuple[int, str]], assignment: list[dict],
               image_count: int) -> list[dict]:
    """Segments in sentence order, each image right after its assigned sentence (unassigned images at the end)."""
    after: dict[int, list[int]] = {}
    for entry in assignment:
        after.setdefault(entry["sentence"], []).append(entry["image"])
    placed = {entry["image"] for entry in assignment}
    rebuilt: list[dict] = []
    run: list[str] = []
    run_segment = None

    def close_run() -> None:
        if run:
            rebuilt.append({"text": " ".join(run), "image": None})
            run.clear()

    for index, (position, text) in enumerate(sentences):
        if position != run_segment:
            close_run()
            run_segment = position
        run.append(text)
        if index in after:
            close_run()
            rebuilt += [{"text": None, "image": image} for image in after[index]]
    close_run()
    rebuilt += [{"text": None, "image": i} for i in range(image_count) if i not in placed]
    return rebuilt
