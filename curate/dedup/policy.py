"""Which sample of a group of duplicates to keep.

**Preference** (`keep:` of the dedup stages). The rows a method judges are put in an order
of preference by an ordered list of criteria; a tie on one criterion goes to the next.
Every criterion prefers one copy over another (missing values last):

- `original_pixels`: the original pixel count, image_meta original_width x original_height
  (of the sample's largest image when it has several), larger preferred;
- `rgb_upright`: every image of the sample was served in an RGB mode (RGB or RGBA, not
  CMYK, grayscale or a palette) and needed no EXIF rotation (image_meta.original_mode and
  exif_orientation), preferred over one that was not or did;
- `original_bytes`: the original byte size, image_meta.original_num_bytes (of the sample's
  largest file), larger preferred;
- `clip_score`, `aesthetic`: scores.clip_score / scores.aesthetic, higher preferred;
- `source_order`: the row's position in the corpus table (work-shard order, then row
  order), earlier preferred. It ends every list, listed or not, so the order is total.

DEFAULT_KEEP keeps the best copy: original_pixels, rgb_upright, original_bytes, source_order.
`keep: [clip_score, original_pixels, source_order]` asks for the score first.

**Grouping.** Samples are then identified by their rank in that order (0 = most preferred).
An edge (i, j, measure) says that samples i and j are duplicates under a method,
`measure` being the human-readable closeness ("hamming 3", "cosine 0.981").

- `semdedup_keep`: visit samples from the most preferred; a sample not yet removed is
  kept and removes its not-yet-visited neighbours. A removed sample removes nothing,
  so a chain A~B~C with A !~ C keeps A and C (B goes with A): chains of merely
  similar images do not collapse into one group.
- `components_keep`: connected components (union-find); the most preferred member of
  each component is kept and all others are removed, however long the chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import AfterValidator

RGB_MODES = frozenset({"RGB", "RGBA"})  # PIL modes of a source that needed no colour conversion
UPRIGHT = 1  # EXIF orientation of an image stored as displayed
OFFERED = ("original_pixels", "rgb_upright", "original_bytes", "clip_score", "aesthetic", "source_order")
DEFAULT_KEEP = ("original_pixels", "rgb_upright", "original_bytes", "source_order")
FINAL = "source_order"
# dedup_text's order (clip_score, pixels of image 0 as stored, key): the same as `preference_order`
LEGACY_KEEP = ("clip_score", "pixels", "key")


def keep_criteria(names: list[str]) -> list[str]:
    """`names` checked against the offered criteria, with `source_order` appended when not listed.

    Raises ValueError naming the allowed criteria for an unknown one, and for one listed twice.
    """
    for name in names:
        if name not in OFFERED:
            raise ValueError(f"unknown keep criterion {name!r}; allowed: {', '.join(OFFERED)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"keep criterion {repeated[0]!r} is listed twice")
    return [*names, FINAL] if FINAL not in names else list(names)


KeepCriteria = Annotated[list[str], AfterValidator(keep_criteria)]


# -- what each criterion reads -------------------------------------------------------------------


def _image_meta(table: pa.Table) -> tuple[pa.Array | None, np.ndarray]:
    """Every image_meta entry of the table, flattened, and the row each belongs to."""
    if "image_meta" not in table.column_names or table.num_rows == 0:
        return None, np.zeros(0, dtype=np.int64)
    column = table.column("image_meta").combine_chunks()
    parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
    return pc.list_flatten(column), np.asarray(parents, dtype=np.int64)


def _numbers(flat: pa.Array | None, name: str) -> np.ndarray:
    """Field `name` of each image_meta entry as float64 (NaN where null or not in the schema)."""
    if flat is None:
        return np.zeros(0)
    if flat.type.get_field_index(name) < 0:
        return np.full(len(flat), np.nan)
    values = pc.struct_field(flat, name).cast(pa.float64())
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)


def _modes(flat: pa.Array | None) -> tuple[np.ndarray, np.ndarray]:
    """Per image_meta entry: (original_mode known, original_mode is an RGB mode)."""
    if flat is None or flat.type.get_field_index("original_mode") < 0:
        size = 0 if flat is None else len(flat)
        return np.zeros(size, dtype=bool), np.zeros(size, dtype=bool)
    modes = pc.struct_field(flat, "original_mode")
    rgb = pc.fill_null(pc.is_in(modes, value_set=pa.array(sorted(RGB_MODES))), False)
    return (np.asarray(modes.is_valid().to_numpy(zero_copy_only=False), dtype=bool),
            np.asarray(rgb.to_numpy(zero_copy_only=False), dtype=bool))


def _largest(values: np.ndarray, parents: np.ndarray, rows: int) -> np.ndarray:
    """Per row, the largest known value among its images (NaN when none is known)."""
    out = np.full(rows, np.nan)
    np.fmax.at(out, parents, values)
    return out


def _metas(table: pa.Table, row: int) -> list[dict]:
    if "image_meta" not in table.column_names:
        return []
    return [meta for meta in table.column("image_meta")[row].as_py() or [] if meta]


def original_pixels(table: pa.Table) -> np.ndarray:
    """original_width x original_height of each row's largest image."""
    flat, parents = _image_meta(table)
    return _largest(_numbers(flat, "original_width") * _numbers(flat, "original_height"), parents, table.num_rows)


def _show_pixels(table: pa.Table, row: int, value: float) -> str:
    sizes = [(m["original_width"] * m["original_height"], m["original_width"], m["original_height"])
             for m in _metas(table, row) if m.get("original_width") and m.get("original_height")]
    if not sizes:
        return "unknown"
    _, width, height = max(sizes)
    return f"{width}x{height}"


def rgb_upright(table: pa.Table) -> np.ndarray:
    """1 when every image was served in an RGB mode with no EXIF rotation, 0 when one was not, NaN if unknown."""
    flat, parents = _image_meta(table)
    known_mode, rgb = _modes(flat)
    orientations = _numbers(flat, "exif_orientation")
    bad = (known_mode & ~rgb) | (~np.isnan(orientations) & (orientations != UPRIGHT))
    unknown = ~known_mode | np.isnan(orientations)
    out = np.full(table.num_rows, np.nan)
    has_images = np.zeros(table.num_rows, dtype=bool)
    has_images[parents] = True
    any_bad = np.zeros(table.num_rows, dtype=bool)
    any_bad[parents[bad]] = True
    any_unknown = np.zeros(table.num_rows, dtype=bool)
    any_unknown[parents[unknown]] = True
    out[has_images & ~any_unknown] = 1.0
    out[any_bad] = 0.0
    return out


def _show_rgb_upright(table: pa.Table, row: int, value: float) -> str:
    metas = _metas(table, row)
    problems: list[str] = []
    for meta in metas:
        mode, orientation = meta.get("original_mode"), meta.get("exif_orientation")
        if mode is not None and mode not in RGB_MODES:
            problems.append(mode)
        if orientation is not None and orientation != UPRIGHT:
            problems.append(f"EXIF orientation {orientation}")
    if problems:
        return ", ".join(dict.fromkeys(problems))
    return "unknown" if np.isnan(value) else f"{metas[0]['original_mode']}, upright"


def original_bytes(table: pa.Table) -> np.ndarray:
    """original_num_bytes of each row's largest file."""
    flat, parents = _image_meta(table)
    return _largest(_numbers(flat, "original_num_bytes"), parents, table.num_rows)


def score_field(name: str) -> Callable[[pa.Table], np.ndarray]:
    """The criterion reading scores.<name>."""

    def values(table: pa.Table) -> np.ndarray:
        if "scores" not in table.column_names or table.num_rows == 0:
            return np.full(table.num_rows, np.nan)
        column = pc.struct_field(table.column("scores").combine_chunks(), name).cast(pa.float64())
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)

    return values


def source_order(table: pa.Table) -> np.ndarray:
    """Minus the row's position: earlier rows score higher."""
    return -np.arange(table.num_rows, dtype=np.float64)


def stored_pixels(table: pa.Table) -> np.ndarray:
    """width x height of image 0 as stored, 0 where unknown (dedup_text's order)."""
    flat, parents = _image_meta(table)
    area = np.nan_to_num(_numbers(flat, "width") * _numbers(flat, "height"))
    first = np.ones(len(parents), dtype=bool)
    first[1:] = parents[1:] != parents[:-1]
    out = np.zeros(table.num_rows)
    out[parents[first]] = area[first]
    return out


def key_order(table: pa.Table) -> np.ndarray:
    """Minus the key's rank among the table's keys: smaller keys score higher."""
    keys = np.asarray(table.column("key").to_pylist(), dtype=object)
    rank = np.empty(len(keys), dtype=np.float64)
    rank[np.argsort(keys, kind="stable")] = np.arange(len(keys))
    return -rank


@dataclass(frozen=True)
class Criterion:
    """One way of preferring a copy: `values(table)` per row (higher preferred, NaN unknown) and its display."""

    values: Callable[[pa.Table], np.ndarray]
    show: Callable[[pa.Table, int, float], str]


def _number(digits: int, unit: str = "") -> Callable[[pa.Table, int, float], str]:
    return lambda table, row, value: "unknown" if np.isnan(value) else f"{value:.{digits}f}{unit}"


CRITERIA: dict[str, Criterion] = {
    "original_pixels": Criterion(original_pixels, _show_pixels),
    "rgb_upright": Criterion(rgb_upright, _show_rgb_upright),
    "original_bytes": Criterion(original_bytes, _number(0, " bytes")),
    "clip_score": Criterion(score_field("clip_score"), _number(4)),
    "aesthetic": Criterion(score_field("aesthetic"), _number(4)),
    "source_order": Criterion(source_order, lambda table, row, value: f"row {row}"),
    "pixels": Criterion(stored_pixels, _number(0, " px")),
    "key": Criterion(key_order, lambda table, row, value: table.column("key")[row].as_py()),
}


class Preference:
    """The criteria of a keep list, evaluated once over a corpus table."""

    def __init__(self, table: pa.Table, keep: Sequence[str]):
        self.table = table
        self.keep = tuple(keep)
        self.values = [CRITERIA[name].values(table) for name in self.keep]

    def order(self, rows: np.ndarray) -> np.ndarray:
        """`rows` (table row indices) from the most to the least preferred."""
        rows = np.asarray(rows, dtype=np.int64)
        sort_keys = [np.where(np.isnan(v[rows]), np.inf, -v[rows]) for v in self.values]
        return rows[np.lexsort(tuple(reversed(sort_keys)))] if sort_keys else rows

    def deciding(self, kept: int, removed: int) -> int | None:
        """Index in `keep` of the first criterion on which table rows `kept` and `removed` differ."""
        for n, values in enumerate(self.values):
            a, b = values[kept], values[removed]
            if not (a == b or (np.isnan(a) and np.isnan(b))):
                return n
        return None

    def explain(self, kept: int, removed: int) -> tuple[str | None, str | None]:
        """(criterion, "criterion: <kept's value> vs <removed's value>") of the deciding criterion."""
        n = self.deciding(kept, removed)
        if n is None:
            return None, None
        name, show, values = self.keep[n], CRITERIA[self.keep[n]].show, self.values[n]
        return name, f"{name}: {show(self.table, kept, values[kept])} vs {show(self.table, removed, values[removed])}"


def preference_order(keys: list[str], clip_scores: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Indices of the rows from the most to the least preferred by dedup_text's order (LEGACY_KEEP).

    clip_score descending (missing = NaN last), then pixels descending (missing = 0),
    then key ascending. Keys are unique, so the order depends only on the rows, never
    on the order they arrive in.
    """
    scores = np.asarray(clip_scores, dtype=np.float64)
    missing = np.isnan(scores)
    score_key = np.where(missing, np.inf, -np.nan_to_num(scores))
    key_rank = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    rank_of_key = np.empty(len(keys), dtype=np.int64)
    rank_of_key[key_rank] = np.arange(len(keys))
    pixel_key = -np.nan_to_num(np.asarray(pixels, dtype=np.float64))
    return np.lexsort((rank_of_key, pixel_key, score_key))


@dataclass(frozen=True)
class Removal:
    """Sample `rank` is removed as a duplicate of kept sample `kept`.

    `measure` is the closeness of `rank` to `via`: the kept sample itself, or (connected
    components only) the neighbour it is linked to the kept sample through.
    """

    rank: int
    kept: int
    measure: str
    via: int


def _adjacency(n: int, edges: list[tuple[int, int, str]]) -> list[dict[int, str]]:
    """Symmetric neighbour maps; with several edges between two samples the first is used."""
    neighbours: list[dict[int, str]] = [{} for _ in range(n)]
    for i, j, measure in edges:
        if i != j:
            neighbours[i].setdefault(j, measure)
            neighbours[j].setdefault(i, measure)
    return neighbours


def semdedup_keep(n: int, edges: list[tuple[int, int, str]]) -> list[Removal]:
    """Greedy keep in rank order: each kept sample removes its later, not yet removed neighbours."""
    neighbours = _adjacency(n, edges)
    removed = np.zeros(n, dtype=bool)
    removals = []
    for rank in range(n):
        if removed[rank]:
            continue
        for other in sorted(neighbours[rank]):
            if other > rank and not removed[other]:
                removed[other] = True
                removals.append(Removal(other, rank, neighbours[rank][other], rank))
    return sorted(removals, key=lambda r: r.rank)


def components_keep(n: int, edges: list[tuple[int, int, str]]) -> list[Removal]:
    """Connected components: keep the best-ranked member of each, remove every other member.

    A removed sample's `via` is the kept one when they are neighbours, else its
    best-ranked neighbour.
    """
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for i, j, _ in edges:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root is always the best-ranked member
    neighbours = _adjacency(n, edges)
    removals = []
    for rank in range(n):
        root = find(rank)
        if root == rank:
            continue
        via = root if root in neighbours[rank] else min(neighbours[rank])
        removals.append(Removal(rank, int(root), neighbours[rank][via], int(via)))
    return removals


def keep(policy: str, n: int, edges: list[tuple[int, int, str]]) -> list[Removal]:
    """Apply the named policy ("semdedup" or "components")."""
    if policy == "semdedup":
        return semdedup_keep(n, edges)
    if policy == "components":
        return components_keep(n, edges)
    raise ValueError(f"unknown dedup policy {policy!r}")
