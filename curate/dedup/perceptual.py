"""`dedup_perceptual`: near-identical images by their 64-bit DCT perceptual hash.

image_meta[0].phash (filled by fetch, see curate/fetch/image.py) of two samples within
Hamming distance `max_distance` (of 64 bits) makes them duplicates: re-encodings at
another quality, resized copies, small crops or colour shifts. Pairs are found with a
FAISS binary index (search.binary_pairs). Groups follow `policy` (SemDeDup-style greedy
keeping by default; `components` merges whole chains), visiting the samples in the order
of `keep` (curate/dedup/policy.py). Rows without a hash are not judged.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.dedup.common import decide_duplicates, first_image_field
from curate.dedup.policy import DEFAULT_KEEP, KeepCriteria
from curate.dedup.search import binary_pairs, phash_codes
from curate.stage import CorpusStage, Params


class DedupPerceptualParams(Params):
    """How close two hashes must be, how to group, which copy to keep, and when to leave the exact index."""

    max_distance: int = Field(6, ge=0, le=32)
    policy: Literal["semdedup", "components"] = "semdedup"
    keep: KeepCriteria = Field(default_factory=lambda: list(DEFAULT_KEEP))
    exact_below: int = Field(200_000, ge=0)  # IndexBinaryFlat up to this many rows, IndexBinaryMultiHash above


class DedupPerceptual(CorpusStage):
    """Drops perceptual near-duplicates (`duplicate_perceptual`) of a more preferred sample."""

    name = "dedup_perceptual"
    reads_image_fingerprints = True
    Params = DedupPerceptualParams
    columns = ("key", "image_meta", "scores", "meta")
    reads = frozenset({"image_meta", "scores", "meta"})
    provides = frozenset({"meta"})  # meta.dedup.perceptual.group of every group member
    reads_images = False
    annotation_params = frozenset()
    selection_params = frozenset({"max_distance", "policy", "keep", "exact_below"})

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict]:
        """Find pairs within `max_distance` bits and drop per `policy`."""
        params = self.params
        hashes = first_image_field(table, "phash") if table.num_rows else pa.array([], pa.int64())
        judged = np.asarray(hashes.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        values = np.asarray(hashes.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)

        def find_edges(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
            i, j, distance, index = binary_pairs(phash_codes(values[rows]), params.max_distance, params.exact_below)
            return i, j, [f"hamming {d}" for d in distance.tolist()], {"index": index}

        return decide_duplicates("perceptual", table, judged, params.policy, find_edges,
                                 {"threshold": f"hamming <= {params.max_distance} of 64 bits"}, keep=params.keep)
