"""Which sample of a group of duplicates to keep.

Samples are identified by their rank in the order of preference (0 = most preferred).
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

import numpy as np


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


def preference_order(keys: list[str], clip_scores: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Indices of the rows from the most to the least preferred.

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
