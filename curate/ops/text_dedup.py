"""`dedup_text`: documents that are the same page (same URL) or nearly the same text, corpus-wide.

Two rules, both decided over the whole corpus at once (a CorpusStage), so the result does not
depend on how rows fall into work shards:

1. Same URL (`urls: true`): documents whose source.url is equal after normalisation (scheme
   and host lower-cased, default port, fragment and trailing slash dropped) are one group; all
   but the most preferred are dropped as `duplicate_url`.
2. Near-duplicate text: each remaining document's text (its text segments, lower-cased, words
   of letters and digits) is cut into word n-grams (`shingle_words`, default 5) and summarised
   by a MinHash of `num_perm` permutations (datasketch, fixed `seed`). MinHash-LSH with
   `threshold` (estimated Jaccard similarity, default 0.8) finds candidate pairs; a pair is a
   duplicate when its MinHash Jaccard estimate is at least `threshold`. Documents with fewer
   than `min_words` words are not judged. Dropped as `duplicate_text`, keeping per group as the
   dedup stages do (curate/dedup/policy.py: `semdedup` by default, or `components`).

Preference (which copy is kept): clip_score descending (the mean image-sentence similarity
for documents), then pixels of the first image, then key, as in curate/dedup. Kept group
members are annotated in meta.dedup.url / meta.dedup.text with the kept key.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.dedup.common import annotation, clip_scores, decide_duplicates, pixels
from curate.dedup.policy import preference_order
from curate.extract.document import texts_of
from curate.stage import CorpusStage, Params

DUPLICATE_URL = "duplicate_url"
_WORD = re.compile(r"\w+", re.UNICODE)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class TextDedupParams(Params):
    """MinHash-LSH settings and the URL rule."""

    threshold: float = Field(0.8, gt=0.0, le=1.0)  # estimated Jaccard similarity of word shingles
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_words: int = Field(5, ge=1)
    min_words: int = Field(10, ge=1)  # shorter texts are not judged
    seed: int = 1
    urls: bool = True  # also drop documents whose normalised source URL was already seen
    policy: Literal["semdedup", "components"] = "semdedup"


def normalize_url(url: str | None) -> str | None:
    """A URL in a canonical form for equality (None for anything that is not http(s))."""
    if not url:
        return None
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if port and port != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    path = parts.path.rstrip("/") or "/"
    return urlunsplit((scheme, host, path, parts.query, ""))


def shingles(text: str, size: int) -> set[bytes]:
    """The word n-grams of `text` (lower-cased words of letters and digits), as bytes."""
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)}


class TextDedup(CorpusStage):
    """Drops documents with an already-seen URL (`duplicate_url`) or near-duplicate text (`duplicate_text`)."""

    name = "dedup_text"
    Params = TextDedupParams
    params: TextDedupParams
    columns = ("key", "segments", "source", "scores", "image_meta", "meta")
    reads = frozenset(columns) - {"key"}
    provides = frozenset({"meta"})  # meta.dedup.url / meta.dedup.text of the kept group members
    reads_images = False
    annotation_params = frozenset({"num_perm", "shingle_words", "seed"})  # what the MinHashes are
    selection_params = frozenset({"threshold", "min_words", "urls", "policy"})

    def decide(self, table: pa.Table) -> tuple[pa.Table, dict]:
        """Decide URL duplicates, then near-duplicate texts among the rest; one decision table."""
        url_rows, url_summary, dropped = self._url_duplicates(table) if self.params.urls else ([], {}, set())
        texts = ["\n".join(texts_of(s)) for s in table.column("segments").to_pylist()]
        words = np.array([len(_WORD.findall(t)) for t in texts])
        judged = (words >= self.params.min_words) & np.array([r not in dropped for r in range(table.num_rows)],
                                                            dtype=bool)
        minhashes = self._minhashes(texts, judged)

        def find_edges(rows: np.ndarray):
            return self._near_duplicates(rows, minhashes)

        decision, summary = decide_duplicates(
            "text", table, judged, self.params.policy, find_edges,
            {"threshold": self.params.threshold, "num_perm": self.params.num_perm,
             "shingle_words": self.params.shingle_words})
        summary["urls"] = url_summary
        return _merge(url_rows, decision), summary

    def _url_duplicates(self, table: pa.Table) -> tuple[list[dict], dict[str, Any], set[int]]:
        """Decision rows of the URL rule, its summary, and the table rows it drops."""
        keys = table.column("key").to_pylist()
        urls = [normalize_url((s or {}).get("url")) for s in table.column("source").to_pylist()]
        metas = table.column("meta").to_pylist()
        order = preference_order(keys, clip_scores(table), pixels(table))
        kept: dict[str, int] = {}
        groups: dict[int, list[int]] = {}
        for row in order.tolist():
            if urls[row] is None:
                continue
            first = kept.setdefault(urls[row], row)
            if first != row:
                groups.setdefault(first, [first]).append(row)
        rows, dropped = [], set()
        for first, members in groups.items():
            for row in members:
                removed = row != first
                dropped.add(row) if removed else None
                rows.append({"key": keys[row], "reason": DUPLICATE_URL if removed else None,
                             "detail": f"same URL as {keys[first]}: {urls[row]}" if removed else None,
                             "annotation": annotation(metas[row], "url", keys[first])})
        return rows, {"groups": len(groups), "removed": len(dropped)}, dropped

    def _minhashes(self, texts: list[str], judged: np.ndarray) -> dict[int, Any]:
        from datasketch import MinHash

        p = self.params
        found = {}
        for row in np.flatnonzero(judged).tolist():
            minhash = MinHash(num_perm=p.num_perm, seed=p.seed)
            minhash.update_batch(list(shingles(texts[row], p.shingle_words)))
            found[row] = minhash
        return found

    def _near_duplicates(self, rows: np.ndarray, minhashes: dict[int, Any]):
        """Edges between ranks whose MinHash Jaccard estimate reaches the threshold (LSH candidates only)."""
        from datasketch import MinHashLSH

        p = self.params
        lsh = MinHashLSH(threshold=p.threshold, num_perm=p.num_perm)
        i, j, measures = [], [], []
        for rank, row in enumerate(rows.tolist()):
            minhash = minhashes[row]
            for other in sorted(lsh.query(minhash)):
                similarity = minhashes[rows[other]].jaccard(minhash)
                if similarity >= p.threshold:
                    i.append(other)
                    j.append(rank)
                    measures.append(f"jaccard {similarity:.3f}")
            lsh.insert(rank, minhash)
        return (np.array(i, dtype=np.int64), np.array(j, dtype=np.int64), measures,
                {"index": "MinHashLSH", "candidates_checked": len(measures)})


def _merge(url_rows: list[dict], decision: pa.Table) -> pa.Table:
    """The URL rule's rows and the text rule's table as one decision (annotations of a key merged)."""
    by_key: dict[str, dict] = {}
    for row in [*url_rows, *decision.to_pylist()]:
        previous = by_key.get(row["key"])
        if previous is None:
            by_key[row["key"]] = dict(row)
            continue
        merged = json.loads(previous["annotation"] or "{}")
        merged.setdefault("dedup", {}).update(json.loads(row["annotation"] or "{}").get("dedup", {}))
        previous["annotation"] = json.dumps(merged, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        if previous["reason"] is None and row["reason"] is not None:
            previous["reason"], previous["detail"] = row["reason"], row["detail"]
    names = ("key", "reason", "detail", "annotation")
    return pa.table({n: [r[n] for r in by_key.values()] for n in names}, schema=pa.schema([(n, pa.string()) for n in
                                                                                           names]))
