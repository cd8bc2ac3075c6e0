"""`dedup_exact`: samples whose images are byte-for-byte or pixel-for-pixel the same.

Two samples are exact duplicates when the sha256 of the original bytes of all their
images are equal, or the sha256 of all their decoded pixels are (image_meta.sha256 and
image_meta.pixel_sha256, filled by fetch). Both relations are equivalences and equal
bytes decode to equal pixels, so the groups are connected components; the most
preferred member of each by `keep` is kept (see curate/dedup/policy.py). Rows without
hashes are not judged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.dedup.common import decide_duplicates
from curate.dedup.policy import DEFAULT_KEEP, KeepCriteria
from curate.stage import CorpusStage, Params

MEASURES = {"sha256": "same bytes", "pixel_sha256": "same pixels"}


class DedupExactParams(Params):
    """Which copy of a group is kept (exact duplicates are exact: nothing else to set)."""

    keep: KeepCriteria = Field(default_factory=lambda: list(DEFAULT_KEEP))


def image_hashes(table: pa.Table, field: str) -> list[str | None]:
    """Per row, the hashes `field` of all its images joined by "," (None if any is missing or no image)."""
    column = table.column("image_meta").combine_chunks()
    values = pc.struct_field(pc.list_flatten(column), field).to_pylist()
    parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
    per_row: list[list[str | None]] = [[] for _ in range(table.num_rows)]
    for parent, value in zip(parents.tolist(), values):
        per_row[parent].append(value)
    return [",".join(h) if h and all(h) else None for h in per_row]


class DedupExact(CorpusStage):
    """Drops byte or pixel copies (`duplicate_exact`), keeping the most preferred of each group."""

    name = "dedup_exact"
    reads_image_fingerprints = True
    Params = DedupExactParams
    columns = ("key", "image_meta", "scores", "meta")
    reads = frozenset({"image_meta", "scores", "meta"})
    provides = frozenset({"meta"})  # meta.dedup.exact.group of every group member
    reads_images = False
    annotation_params = frozenset()
    selection_params = frozenset({"keep"})

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict]:
        """Group rows by equal byte hashes or equal pixel hashes; drop all but one per group."""
        hashes = {field: image_hashes(table, field) for field in MEASURES} if table.num_rows else {}
        judged = np.array([any(hashes[f][r] for f in MEASURES) for r in range(table.num_rows)], dtype=bool)

        def find_edges(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
            i, j, measures = [], [], []
            for field, measure in MEASURES.items():
                first: dict[str, int] = {}
                for rank, row in enumerate(rows.tolist()):
                    value = hashes[field][row]
                    if value is None:
                        continue
                    if value in first:
                        i.append(first[value])
                        j.append(rank)
                        measures.append(measure)
                    else:
                        first[value] = rank
            return np.array(i, dtype=np.int64), np.array(j, dtype=np.int64), measures, {"index": "hash table"}

        return decide_duplicates("exact", table, judged, "components", find_edges,
                                 {"threshold": "equal sha256 of bytes or of pixels"}, keep=self.params.keep)
