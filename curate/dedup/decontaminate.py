"""`decontaminate`: drop samples that copy an image (or caption) of an evaluation set.

Training on the test images makes benchmark numbers meaningless. Each evaluation image is
hashed and embedded once, the way the corpus was (fetch's sha256 / pixel sha256 / 64-bit
perceptual hash of the decoded image; the CLIP image embedding of the same model that
clip_score used), and every sample is compared with them through FAISS:

- exact: a sample image with the same bytes or the same decoded pixels;
- perceptual: a sample image within `max_distance` bits of an evaluation image's phash
  (IndexBinaryFlat);
- semantic: the sample's image embedding at cosine >= `threshold` of an evaluation
  image's (IndexFlatIP over the evaluation embeddings, k = 1, re-measured in float64);
- caption (optional): the sample's caption equal, after normalising case, punctuation and
  spaces, to an evaluation caption of at least `min_caption_chars` characters.

A matching sample is dropped with reason `contaminated`; the detail names the evaluation
item and the closeness. Work shards are read one at a time, so memory does not grow with
the corpus. The summary in the manifest counts matches per method and per set and lists
the matched evaluation items.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate import storage
from curate.dedup.eval_sets import EvalItem, EvalSetSpec, iter_items, open_image, resolve
from curate.dedup.search import phash_codes
from curate.fetch.config import EncodeParams, ResizeParams
from curate.fetch.image import ImageError, process_image
from curate.models.clip import ClipSpec, ModelUnavailable, check_clip_available, load_clip
from curate.ops.clip_stage import model_id
from curate.stage import CorpusStage, Params

REASON = "contaminated"
EXAMPLES = 20
MAX_PIXELS = 178_956_970
EMBED_BATCH = 64


class DecontaminateParams(Params):
    """Evaluation sets, the CLIP model that made the corpus's embeddings, and the match thresholds."""

    sets: list[EvalSetSpec] = Field(min_length=1)
    model: ClipSpec = ClipSpec()  # must be the model clip_score used
    exact: bool = True
    perceptual: bool = True
    max_distance: int = Field(6, ge=0, le=32)
    semantic: bool = True  # needs clip_score's image embeddings (keep_embeddings: true)
    threshold: float = Field(0.95, gt=-1.0, le=1.0)
    captions: bool = False
    min_caption_chars: int = Field(20, ge=1)


@dataclass
class EvalIndex:
    """Everything compared against: hashes, binary and float indexes, normalised captions."""

    labels: list[str]
    by_sha256: dict[str, int] = field(default_factory=dict)
    by_pixels: dict[str, int] = field(default_factory=dict)
    by_caption: dict[str, int] = field(default_factory=dict)
    phash_index: Any = None
    vectors: np.ndarray | None = None
    vector_index: Any = None
    model: str | None = None
    unreadable: list[str] = field(default_factory=list)
    items_per_set: dict[str, int] = field(default_factory=dict)


def normalise_caption(text: str) -> str:
    """Lower case, punctuation removed, runs of spaces collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class Decontaminate(CorpusStage):
    """Drops samples that are exact, perceptual or semantic copies of evaluation images."""

    name = "decontaminate"
    reads_image_fingerprints = True
    Params = DecontaminateParams
    columns = ("key", "image_meta", "embeddings", "captions")
    reads = frozenset({"image_meta", "embeddings", "captions"})
    provides = frozenset()  # drops only: nothing is annotated
    reads_images = False
    # the evaluation images, the model that embeds them and whether they are embedded at all change what is
    # compared against
    annotation_params = frozenset({"sets", "model", "semantic"})
    selection_params = frozenset({"exact", "perceptual", "max_distance", "threshold", "captions",
                                  "min_caption_chars"})

    def preflight(self) -> None:
        """Every evaluation set exists; the CLIP weights are there when semantic matching is on."""
        for spec in self.params.sets:
            resolve(spec, self.context.recipe_dir)
        if self.params.semantic:
            try:
                check_clip_available(self.params.model)
            except ModelUnavailable as error:
                error.path = error.path or f"stages.{self.name}.model"
                raise

    def model_info(self) -> list[dict]:
        """The CLIP model that embeds the evaluation images (when semantic matching is on)."""
        if not self.params.semantic:
            return []
        return [{"stage": self.name, "role": "clip", **check_clip_available(self.params.model)}]

    def build_index(self) -> EvalIndex:
        """Hash and embed every evaluation image once."""
        items = [item for spec in self.params.sets for item in iter_items(spec, self.context.recipe_dir)]
        index = EvalIndex(labels=[item.label for item in items])
        for spec in self.params.sets:
            index.items_per_set[spec.name] = sum(item.set_name == spec.name for item in items)
        codes, images, imaged = [], [], []
        for n, item in enumerate(items):
            self._index_captions(index, n, item)
            try:
                processed = process_image(item.data, ResizeParams(mode="none"), EncodeParams(format="png"), MAX_PIXELS)
            except ImageError:
                index.unreadable.append(item.label)
                continue
            index.by_sha256.setdefault(processed.sha256, n)
            index.by_pixels.setdefault(processed.pixel_sha256, n)
            codes.append((n, processed.phash))
            if self.params.semantic:
                images.append(open_image(item.data))
                imaged.append(n)
        if codes:
            index.phash_index = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(64))
            index.phash_index.add_with_ids(phash_codes(np.array([c for _, c in codes], dtype=np.int64)),
                                           np.array([n for n, _ in codes], dtype=np.int64))
        if self.params.semantic and images:
            self._embed(index, images, imaged)
        return index

    def _index_captions(self, index: EvalIndex, n: int, item: EvalItem) -> None:
        if not self.params.captions:
            return
        for caption in item.captions:
            text = normalise_caption(caption)
            if len(text) >= self.params.min_caption_chars:
                index.by_caption.setdefault(text, n)

    def _embed(self, index: EvalIndex, images: list, imaged: list[int]) -> None:
        model = load_clip(self.params.model, device="auto")
        index.model = model_id(self.params.model, model.describe())
        parts = [model.encode_images(model.preprocess_images(images[s:s + EMBED_BATCH]))
                 for s in range(0, len(images), EMBED_BATCH)]
        vectors = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        index.vectors = np.zeros((len(index.labels), vectors.shape[1]), dtype=np.float32)
        index.vectors[imaged] = vectors
        index.vector_index = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
        index.vector_index.add_with_ids(vectors, np.array(imaged, dtype=np.int64))

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict]:
        """Match one table of samples (all of the corpus) against the evaluation sets."""
        index = self.build_index()
        matches = self._match(table, index)
        return _decision(matches, index.labels), self._summary(index, matches)

    def decide_files(self, files: list[str], work_dir: str) -> tuple[pa.Table, dict, int]:
        """Match the work shards one at a time (bounded memory)."""
        started = time.perf_counter()
        index = self.build_index()
        indexed = time.perf_counter() - started
        matches: list[tuple[str, int, str, str]] = []
        rows = 0
        for path in files:
            table = storage.read_table(path, columns=list(self.columns))
            rows += table.num_rows
            matches.extend(self._match(table, index))
        summary = self._summary(index, matches)
        summary["index_seconds"] = round(indexed, 3)
        return _decision(matches, index.labels), summary, rows

    def _match(self, table: pa.Table, index: EvalIndex) -> list[tuple[str, int, str, str]]:
        """(key, evaluation item, method, measure) of the first match of every matching sample."""
        keys = table.column("key").to_pylist()
        found: dict[int, tuple[int, str, str]] = {}
        if self.params.exact or self.params.perceptual:
            self._match_hashes(table, index, found)
        if self.params.semantic and index.vector_index is not None:
            self._match_embeddings(table, index, found)
        if self.params.captions and index.by_caption:
            for row, captions in enumerate(table.column("captions").to_pylist()):
                for caption in captions or []:
                    item = index.by_caption.get(normalise_caption(caption.get("text") or ""))
                    if item is not None and row not in found:
                        found[row] = (item, "caption", "same caption")
        return [(keys[row], item, method, measure) for row, (item, method, measure) in sorted(found.items())]

    def _match_hashes(self, table: pa.Table, index: EvalIndex, found: dict[int, tuple[int, str, str]]) -> None:
        column = table.column("image_meta").combine_chunks()
        if len(column) == 0:
            return
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(column)
        sha = pc.struct_field(flat, "sha256").to_pylist()
        pixels = pc.struct_field(flat, "pixel_sha256").to_pylist()
        hashes = pc.struct_field(flat, "phash")
        if self.params.exact:
            for row, digest, pixel in zip(parents.tolist(), sha, pixels):
                if row in found:
                    continue
                if digest in index.by_sha256:
                    found[row] = (index.by_sha256[digest], "exact", "same bytes")
                elif pixel in index.by_pixels:
                    found[row] = (index.by_pixels[pixel], "exact", "same pixels")
        if not self.params.perceptual or index.phash_index is None:
            return
        present = np.asarray(hashes.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        if not present.any():
            return
        values = np.asarray(hashes.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)[present]
        distance, item = index.phash_index.search(phash_codes(values), 1)
        for row, d, n in zip(parents[present].tolist(), distance[:, 0].tolist(), item[:, 0].tolist()):
            if n >= 0 and d <= self.params.max_distance and row not in found:
                found[row] = (n, "perceptual", f"hamming {d}")

    def _match_embeddings(self, table: pa.Table, index: EvalIndex, found: dict[int, tuple[int, str, str]]) -> None:
        from curate.dedup.semantic import image_embeddings

        vectors, judged, models = image_embeddings(table)
        if not judged.any():
            return
        if models and models != [index.model]:
            raise ValueError(f"decontaminate: the corpus's image embeddings come from {models}, the evaluation "
                             f"images were embedded with {index.model}; set stages.decontaminate.model to the "
                             f"clip_score model")
        rows = np.flatnonzero(judged)
        _, item = index.vector_index.search(vectors[rows], 1)
        for row, n in zip(rows.tolist(), item[:, 0].tolist()):
            if n < 0 or row in found:
                continue
            cosine = float(np.dot(vectors[row].astype(np.float64), index.vectors[n].astype(np.float64)))
            if cosine >= self.params.threshold:
                found[row] = (n, "semantic", f"cosine {cosine:.4f}")

    def _summary(self, index: EvalIndex, matches: list[tuple[str, int, str, str]]) -> dict[str, Any]:
        per_method = {m: 0 for m in ("exact", "perceptual", "semantic", "caption")}
        per_set = {name: {"items": count, "matched_samples": 0, "matched_items": 0}
                   for name, count in index.items_per_set.items()}
        matched_items: dict[int, int] = {}
        for _, item, method, _ in matches:
            per_method[method] += 1
            per_set[index.labels[item].split("/", 1)[0]]["matched_samples"] += 1
            matched_items[item] = matched_items.get(item, 0) + 1
        for item in matched_items:
            per_set[index.labels[item].split("/", 1)[0]]["matched_items"] += 1
        return {
            "method": "decontaminate",
            "threshold": {"cosine": self.params.threshold if self.params.semantic else None,
                          "hamming": self.params.max_distance if self.params.perceptual else None},
            "model": index.model,
            "index": "IndexFlatIP + IndexBinaryFlat over the evaluation images",
            "sets": per_set,
            "unreadable_eval_images": index.unreadable,
            "matched": per_method,
            "removed": len(matches),
            "matched_items": [{"eval": index.labels[i], "samples": c}
                              for i, c in sorted(matched_items.items(), key=lambda x: (-x[1], x[0]))][:EXAMPLES],
            "examples": [{"key": key, "eval": index.labels[item], "measure": measure}
                         for key, item, _, measure in matches[:EXAMPLES]],
        }


def _decision(matches: list[tuple[str, int, str, str]], labels: list[str]) -> pa.Table:
    return pa.table({
        "key": pa.array([m[0] for m in matches], pa.string()),
        "reason": pa.array([REASON] * len(matches), pa.string()),
        "detail": pa.array([f"{m[2]} match of {labels[m[1]]} ({m[3]})" for m in matches], pa.string()),
    })

